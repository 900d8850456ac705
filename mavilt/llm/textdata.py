"""Text available offline for the tiny LM: the training split's reports plus the real IU X-ray (OpenI) report
texts, with a fixed held-out part for perplexity (forgetting is measured on it in every stage)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

def _heldout(text: str, seed: int, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def report_documents(data_dir: str | Path, split: str = "train") -> list[str]:
    from mavilt.data.shards import read_table

    t = read_table(data_dir, split, columns=["findings", "impression"]).to_pydict()
    docs = []
    for f, i in zip(t["findings"], t["impression"]):
        parts = [p.strip() for p in (f, i) if p and p.strip()]
        if parts:
            docs.append(" ".join(parts))
    return docs


def iu_documents(iu_dir: str | Path | None) -> list[str]:
    if iu_dir is None or not Path(iu_dir).is_dir():
        log.warning("no IU X-ray report folder at %s: text pretraining uses the dataset's reports only "
                    "(run `make setup` to fetch them)", iu_dir)
        return []
    from mavilt.data.sources.iu_xray import iter_openi_reports

    docs = []
    for rep in iter_openi_reports(iu_dir):
        parts = [p.strip() for p in (rep.get("findings"), rep.get("impression")) if p and p.strip()]
        if parts:
            docs.append(" ".join(parts))
    return docs


def pretraining_corpus(
    data_dir: str | Path, iu_dir: str | Path | None, heldout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents); deterministic, de-duplicated, sorted."""
    docs = sorted(set(report_documents(data_dir)) | set(iu_documents(iu_dir)))
    train = [d for d in docs if not _heldout(d, seed, heldout_fraction)]
    held = [d for d in docs if _heldout(d, seed, heldout_fraction)]
    return train, held


def train_bpe_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """A byte-level BPE tokenizer trained on ``texts`` (the ``tokenizers`` library), saved as a Hugging Face
    fast tokenizer with <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Lowercase training text would lose nothing for metrics, but the model should write proper reports.
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast
