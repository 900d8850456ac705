"""Driver side of every training step: resolve inputs, build Ray datasets, fit, hand off, write the result.

Each ``run_*`` function is what one job file calls; ``jobs/pipeline.py`` calls the same functions.
The step's output directory is ``<storage>/<name>`` (Ray Train's run directory, holding the checkpoints),
with ``config.yaml``, ``metrics.json`` and ``result.json`` beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mavilt.config import Config
from mavilt.runs import finish
from mavilt.train.trainer import FitOutcome, fit

log = logging.getLogger(__name__)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_out(storage: str | Path, name: str, cfg: Config, data: str | Path | None = None) -> Path:
    """Check the inputs a user gives before anything slow starts, then make the output folder."""
    if data is not None:
        from mavilt.data.shards import check_dataset

        check_dataset(data)
    out = Path(storage).resolve() / name
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    return out


def _numeric(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("done",)}


# ---- resolving hand-offs -------------------------------------------------------------------------------


def find_model_dir(path: str | Path, sub: str, marker: str, what: str, hint: str) -> Path:
    """``path`` itself, or ``path/sub``, whichever holds ``marker`` (a checkpoint or the model folder), made
    absolute: train workers run in their own working directory, where a relative path means nothing."""
    p = Path(path)
    for cand in (p / sub, p):
        if (cand / marker).exists():
            return cand.resolve()
    raise FileNotFoundError(f"{what} {p} holds no {sub}/{marker}; {hint}")


def vqgan_dir_of(path: str | Path) -> Path:
    return find_model_dir(path, "vqgan", "vqgan.json", "tokenizer checkpoint",
                          "pass a VQ-GAN checkpoint written by jobs/vqgan.py (or its vqgan/ folder)")


def encoder_dir_of(path: str | Path) -> Path:
    return find_model_dir(path, "encoder", "encoder.json", "encoder checkpoint",
                          "pass a checkpoint written by jobs/encoder.py (or its encoder/ folder)")


# ---- encoder ------------------------------------------------------------------------------------------


def run_encoder(cfg: Config, data: str | Path, storage: str | Path, name: str = "encoder") -> dict[str, Any]:
    from mavilt.train.loops import encoder_loop, vision_datasets

    out = _prepare_out(storage, name, cfg, data)
    outcome = fit(encoder_loop, {"cfg": cfg.to_dict(), "output": str(out)}, cfg.compute, storage=Path(storage).resolve(), name=name,
                  score=("val_auroc_mean", "max"), datasets=vision_datasets(data))
    metrics = {"best_step": outcome.best_metrics.get("step"), **_numeric(outcome.best_metrics)}
    return finish("encoder", out, outcome.best_checkpoint, metrics, _hash(cfg.to_dict()["encoder"], str(data)))


# ---- VQ-GAN -------------------------------------------------------------------------------------------


def run_vqgan(cfg: Config, data: str | Path, storage: str | Path, name: str = "vqgan",
              encoder_checkpoint: str | Path | None = None) -> dict[str, Any]:
    from mavilt.train.loops import vision_datasets, vqgan_loop

    out = _prepare_out(storage, name, cfg, data)
    encoder_dir = None
    if cfg.vqgan.feature_encoder == "inhouse" and (cfg.vqgan.lambda_feat > 0 or cfg.vqgan.lambda_perceptual > 0 or encoder_checkpoint):
        if encoder_checkpoint is None:
            raise ValueError("vqgan.feature_encoder=inhouse needs --encoder-checkpoint (train one with jobs/encoder.py), "
                             "or set vqgan.lambda_feat=0 and vqgan.lambda_perceptual=0")
        encoder_dir = str(encoder_dir_of(encoder_checkpoint))
    outcome = fit(vqgan_loop, {"cfg": cfg.to_dict(), "encoder_dir": encoder_dir, "output": str(out)}, cfg.compute,
                  storage=Path(storage).resolve(), name=name, score=("val_loss", "min"), datasets=vision_datasets(data))
    if outcome.best_checkpoint is not None and encoder_dir is not None:
        # The VQ-GAN checkpoint carries its phi, so later steps (bundle, FID) find it without another argument.
        target = outcome.best_checkpoint / "encoder"
        if not target.exists():
            shutil.copytree(encoder_dir, target)
    metrics = {"best_step": outcome.best_metrics.get("step"), **_numeric(outcome.best_metrics)}
    return finish("vqgan", out, outcome.best_checkpoint, metrics,
                  _hash(cfg.to_dict()["vqgan"], cfg.data.image_size, str(data), encoder_dir))


# ---- text pretraining ---------------------------------------------------------------------------------


def run_pretrain_text(cfg: Config, data: str | Path, storage: str | Path, name: str = "pretrain_text",
                      iu_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the tiny LM's BPE tokenizer and pretrain it on text; for a real LM (llm.base = a path) only
    record where it is (there is nothing to pretrain)."""
    import ray.data

    from mavilt.llm.textdata import DEFAULT_IU_REPORTS, pretraining_corpus, train_bpe_tokenizer
    from mavilt.train.loops import llm_loop

    out = _prepare_out(storage, name, cfg, data)
    tc = cfg.pretrain_text
    train_texts, heldout = pretraining_corpus(data, iu_dir or DEFAULT_IU_REPORTS, tc.heldout_fraction, tc.seed)
    corpus = {"train_documents": len(train_texts), "heldout_documents": len(heldout)}
    h = _hash(cfg.to_dict()["llm"], cfg.to_dict()["pretrain_text"], str(data), corpus)
    if cfg.llm.base != "tiny":
        return finish("pretrain_text", out, None, {**corpus, "base": cfg.llm.base, "skipped": 1}, h)
    if tc.max_steps <= 0:
        raise ValueError("the tiny LM must be pretrained: set pretrain_text.max_steps > 0")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_bpe_tokenizer(train_texts, cfg.llm.text_vocab_size, tok_dir)
    datasets = {"train": ray.data.from_items([{"text": t} for t in train_texts]),
                "heldout_text": ray.data.from_items([{"text": t} for t in heldout])}
    outcome = fit(llm_loop, {"cfg": cfg.to_dict(), "stage": "pretrain_text", "tokenizer_dir": str(tok_dir), "output": str(out)},
                  cfg.compute, storage=Path(storage).resolve(), name=name, score=("val_loss", "min"),
                  datasets=datasets, split=())
    metrics = {**corpus, "best_step": outcome.best_metrics.get("step"), **_numeric(outcome.best_metrics)}
    return finish("pretrain_text", out, outcome.best_checkpoint, metrics, h)


# ---- stage 1 and stage 2 ------------------------------------------------------------------------------


def llm_datasets(data: str | Path, codes_dir: Path, heldout: list[str]) -> dict[str, Any]:
    """Training and validation rows with their cached codes attached by Ray Data, plus held-out text.

    Materialised on the driver before training starts: the rows are small (ids and text), every worker pulls
    them once, and the train workers then never compete with Ray Data for CPUs."""
    import ray.data

    from mavilt.data.shards import ray_dataset

    cols = ["study_id", "image_id", "view", "findings", "impression", "vqa"]
    out = {}
    for split in ("train", "validate"):
        ds = ray_dataset(data, split, columns=cols)
        out[split] = ds.map_batches(_AttachCodes, fn_constructor_kwargs={"cache": str(codes_dir), "split": split},
                                    batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1)).materialize()
    out["heldout_text"] = ray.data.from_items([{"text": t} for t in heldout]).materialize()
    return out


class _AttachCodes:
    """Ray Data actor: image_id -> codes from the code cache (a small in-memory map per split)."""

    def __init__(self, cache: str, split: str):
        from mavilt.data.codes import load_codes

        self.codes = load_codes(cache, split)

    def __call__(self, batch):
        import pyarrow as pa

        ids = batch.column("image_id").to_pylist()
        missing = [i for i in ids if i not in self.codes]
        if missing:
            raise KeyError(f"{len(missing)} images have no codes in the cache (first: {missing[0]}); delete the cache folder and re-run")
        codes = pa.array([self.codes[i].tolist() for i in ids], type=pa.list_(pa.int16()))
        return batch.append_column("codes", codes)


def resolve_init(path: str | Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) from a text-pretraining checkpoint or a plain Hugging Face model folder."""
    p = Path(path).resolve()
    if (p / "llm" / "config.json").exists():
        return p / "llm", (p / "tokenizer" if (p / "tokenizer").exists() else p / "llm")
    if (p / "config.json").exists():
        return p, p
    raise FileNotFoundError(f"--init-checkpoint {p} is neither a text-pretraining checkpoint (llm/ + tokenizer/) "
                            "nor a Hugging Face model folder (config.json)")


def run_stage(stage: str, cfg: Config, data: str | Path, tokenizer_checkpoint: str | Path, init_checkpoint: str | Path,
              storage: str | Path, name: str | None = None, encoder_checkpoint: str | Path | None = None,
              iu_dir: str | Path | None = None, loop_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 1 (from a pretrained LM) or stage 2 (from a stage-1 checkpoint); stage 2 writes a model bundle.

    ``loop_overrides`` reach the worker loop unchanged (tests use it to inject a failure)."""
    from mavilt.data.codes import build_code_cache
    from mavilt.llm.checkpoint import load_tokenizer, read_vocab
    from mavilt.llm.model import extend_vocabulary, load_lm, save_theta0
    from mavilt.llm.textdata import DEFAULT_IU_REPORTS, pretraining_corpus
    from mavilt.llm.vocab import JointVocab
    from mavilt.tokenizer.model import VQGAN
    from mavilt.train.loops import llm_loop

    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be stage1 or stage2, got {stage}")
    name = name or stage
    vqgan_dir_of(tokenizer_checkpoint)  # fail fast on a wrong path
    out = _prepare_out(storage, name, cfg, data)
    vqgan_dir = vqgan_dir_of(tokenizer_checkpoint)
    vq = VQGAN.from_pretrained(vqgan_dir)
    k, n = vq.codebook_size, vq.num_tokens(cfg.data.image_size)
    codes_dir = build_code_cache(data, vqgan_dir)
    tc = getattr(cfg, stage)
    _, heldout = pretraining_corpus(data, iu_dir or DEFAULT_IU_REPORTS, cfg.pretrain_text.heldout_fraction, cfg.pretrain_text.seed)

    loop_cfg: dict[str, Any] = {"cfg": cfg.to_dict(), "stage": stage, "output": str(out), **(loop_overrides or {})}
    if stage == "stage1":
        model_dir, tok_dir = resolve_init(init_checkpoint)
        theta0_dir = out / "theta0"
        if not (theta0_dir / "theta0.json").exists():
            tok = load_tokenizer(tok_dir)
            vocab = JointVocab.for_tokenizer(tok, k, n)
            model, _ = load_lm(model_dir, cfg.llm.dtype, with_tokenizer=False)
            extend_vocabulary(model, vocab, seed=tc.seed)
            save_theta0(theta0_dir, model_dir, model, vocab)
            del model
        loop_cfg.update(theta0_dir=str(theta0_dir), tokenizer_dir=str(tok_dir))
    else:
        init = Path(init_checkpoint).resolve()
        if not (init / "vocab.json").exists():
            raise FileNotFoundError(f"--init-checkpoint {init} is not a stage-1 checkpoint (no vocab.json)")
        vocab = read_vocab(init)
        if (vocab.codebook_size, vocab.tokens_per_image) != (k, n):
            raise ValueError(f"stage-1 checkpoint {init} was trained with K={vocab.codebook_size}, N={vocab.tokens_per_image} "
                             f"but the tokenizer checkpoint gives K={k}, N={n}: pass the VQ-GAN stage 1 used")
        loop_cfg.update(theta0_dir=str(init / "theta0"), tokenizer_dir=str(init / "tokenizer"), init_dir=str(init))
    outcome: FitOutcome = fit(llm_loop, loop_cfg, cfg.compute, storage=Path(storage).resolve(), name=name,
                              score=("val_loss", "min"), datasets=llm_datasets(data, codes_dir, heldout), split=())
    metrics = {"best_step": outcome.best_metrics.get("step"), **_numeric(outcome.best_metrics),
               "final": _numeric(outcome.metrics)}
    checkpoint = outcome.best_checkpoint
    h = _hash(cfg.to_dict()["llm"], cfg.to_dict()[stage], str(data), str(tokenizer_checkpoint), str(init_checkpoint))
    if stage == "stage2" and checkpoint is not None:
        from mavilt.bundle import write_bundle

        enc = encoder_checkpoint or (vqgan_dir.parent if (vqgan_dir.parent / "encoder").exists() else None)
        checkpoint = write_bundle(out / "bundle", checkpoint, vqgan_dir, encoder_dir_of(enc) if enc else None, cfg)
    return finish(stage, out, checkpoint, metrics, h)
