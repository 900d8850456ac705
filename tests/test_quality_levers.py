"""The model-quality levers without Ray: loss weights on clinical tokens and image codes, reranking report
candidates by the CXR encoder's view, label fidelity's bootstrap CI, and the ablation table's summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mavilt.config import load_config
from mavilt.errors import ConfigError
from mavilt.llm.sequences import IGNORE
from mavilt.llm.vocab import JointVocab
from mavilt.llm.weighting import is_clinical_token, token_loss_weights
from mavilt.train.llm_loop import masked_lm_loss


class PieceTokenizer:
    """A tokenizer as far as the weights need one: id -> piece."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


PIECES = ["ĠNo", "Ġpleural", "Ġeffu", "sion", "Ġthe", "Ġleft", "Ġmoderate", "Ġwith", "Ġpossible", ".", "Ġheart", "ion"]


def vocab(n_text: int) -> JointVocab:
    return JointVocab(text_vocab_size=n_text, codebook_size=4, tokens_per_image=2, pad_id=0, bos_id=None, eos_id=1)


def test_clinical_tokens_are_findings_cues_sides_and_sizes_not_phrasing():
    assert [is_clinical_token(p) for p in PIECES] == [True, True, True, False, False, True, True, False, True, False,
                                                       True, False]
    assert is_clinical_token("▁effusion") and is_clinical_token("Pneumothorax")  # SentencePiece, no marker
    assert not is_clinical_token("Ġwithin") and not is_clinical_token("Ġ123")


def test_token_weights_by_id_and_off_when_both_are_one():
    tok, v = PieceTokenizer(PIECES), vocab(len(PIECES))
    assert token_loss_weights(tok, v) is None
    w = token_loss_weights(tok, v, clinical=3.0, image=2.0)
    assert w.shape == (v.size,)
    assert w[:len(PIECES)].tolist() == [3.0 if is_clinical_token(p) else 1.0 for p in PIECES]
    assert w[v.first_image_id : v.first_image_id + 4].tolist() == [2.0] * 4 and w[v.boi_id] == 1.0
    with pytest.raises(ValueError, match="must be positive"):
        token_loss_weights(tok, v, clinical=0.0)


def test_weighted_loss_is_the_weighted_token_mean_and_unit_weights_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, 3, 4, 5, IGNORE], [IGNORE, IGNORE, 6, 2, 3]])
    plain, per_task = masked_lm_loss(logits, labels, ["report", "vqa"])
    same, _ = masked_lm_loss(logits, labels, ["report", "vqa"], token_weight=torch.ones(7))
    assert same.item() == pytest.approx(plain.item(), rel=1e-6)
    w = torch.ones(7)
    w[3] = 4.0
    weighted, per_task_w = masked_lm_loss(logits, labels, ["report", "vqa"], token_weight=w)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none",
                                           ignore_index=IGNORE).view(2, 4)
    tw = torch.where(labels[:, 1:] == IGNORE, torch.zeros(()), w[labels[:, 1:].clamp(min=0)])
    assert weighted.item() == pytest.approx(float((ce * tw).sum() / tw.sum()), rel=1e-6)
    assert per_task_w == pytest.approx(per_task)  # the logged per-task losses stay unweighted (comparable)


def test_a_stage_weight_must_be_positive():
    with pytest.raises(ConfigError, match="stage2.clinical_token_weight must be > 0"):
        load_config("tiny", ["stage2.clinical_token_weight=0"])


def test_rerank_keeps_the_candidate_the_encoder_agrees_with_and_the_first_on_a_tie():
    from mavilt.data.labels import OBSERVATIONS
    from mavilt.eval.rerank import pick_by_agreement, rerank_reports

    p = np.full((2, len(OBSERVATIONS)), 0.05)
    p[0, OBSERVATIONS.index("Pleural Effusion")] = 0.95
    candidates = [["No pleural effusion or pneumothorax.", "Moderate left pleural effusion. No pneumothorax."],
                  ["The lungs are clear.", "The lungs are clear."]]
    assert pick_by_agreement(candidates, p) == [candidates[0][1], candidates[1][0]]
    rounds = {1: ["Large right pneumothorax.", "Large right pneumothorax."]}
    assert rerank_reports(["The lungs are clear.", "The lungs are clear."], rounds.__getitem__, 2, p[[1, 1]]) == \
        ["The lungs are clear."] * 2
    with pytest.raises(ValueError, match="2 candidate lists for 1 images"):
        pick_by_agreement(candidates, p[:1])


def test_label_fidelity_has_a_bootstrap_ci_around_its_f1():
    from mavilt.data.labels import OBSERVATIONS
    from mavilt.eval.fidelity import label_fidelity

    class Fixed(torch.nn.Module):
        """An 'encoder' that sees cardiomegaly in the first 30 images only."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.full((x.shape[0], len(OBSERVATIONS)), -5.0)
            out[:, OBSERVATIONS.index("Cardiomegaly")] = torch.where(x.flatten(1)[:, 0] > 0.5, 5.0, -5.0)
            return out

    images = torch.zeros(60, 1, 8, 8)
    images[:30] = 1.0
    labels = [{"Cardiomegaly": 1 if i < 30 or i % 3 == 0 else 0} for i in range(60)]
    m = label_fidelity(Fixed(), images, labels, n_boot=200, seed=0)
    assert m["precision"] == 1.0 and m["hit_rate"] == pytest.approx(30 / 40)
    lo, hi = m["f1_ci95"]
    assert lo < m["f1"] < hi and hi - lo < 0.3
    assert "f1_ci95" not in label_fidelity(Fixed(), images, labels)


def test_ablation_summary_is_mean_and_std_over_seeds_and_one_seed_shows_its_ci():
    from mavilt.eval.ablation import ROWS, ablation_markdown, summarize

    runs = {"default": [{"f1_micro_14": 0.5, "vqa_accuracy": 0.7, "split": "validate", "folder": "a"},
                        {"f1_micro_14": 0.7, "vqa_accuracy": 0.9, "split": "validate", "folder": "b"}],
            "beam3": [{"f1_micro_14": 0.65, "f1_micro_14_ci95": [0.6, 0.7], "split": "validate", "folder": "c",
                       "retrieval_f1_micro_14": 0.9}]}
    table = {k: summarize(v) for k, v in runs.items()}
    assert table["default"]["f1_micro_14"] == pytest.approx(0.6)
    assert table["default"]["f1_micro_14_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    md = ablation_markdown(table, runs, load_config("tiny"))
    assert "| default | default | the preset's default configuration | 2 | 0.600 ± 0.141 |" in md
    assert f"| beam3 | lever | {ROWS['beam3'].what} | 1 | 0.650 [0.600, 0.700] |" in md
    assert "**validate** split" in md and "F1 micro-14 0.900" in md


def test_ablation_rows_flip_the_defaults_lever_and_the_joint_stage_keeps_the_total_steps():
    from mavilt.eval.ablation import ROWS

    cfg = load_config("tiny")
    assert ROWS["clinical_weight"].overrides(cfg)[-1] == (
        "stage2.clinical_token_weight=3.0" if cfg.stage2.clinical_token_weight == 1.0 else "stage2.clinical_token_weight=1.0")
    for base in (cfg, cfg.with_overrides(["generate.image_contrast=0"]), load_config("base")):
        flipped = base.with_overrides(ROWS["image_contrast"].overrides(base))  # a valid config either way
        assert (flipped.generate.image_contrast > 0) != (base.generate.image_contrast > 0)
        if flipped.generate.image_contrast:  # on, it decodes greedily (the base preset's beams would ignore it)
            assert flipped.generate.num_beams == 1 and not flipped.generate.do_sample
    beam = cfg.with_overrides(ROWS["beam3"].overrides(cfg))  # beam search with the default's contrast off
    assert beam.generate.num_beams == 3 and beam.generate.image_contrast == 0
    joint = cfg.with_overrides(ROWS["joint_stage"].overrides(cfg))
    assert joint.stage1.max_steps == 1
    assert joint.stage1.max_steps + joint.stage2.max_steps == cfg.stage1.max_steps + cfg.stage2.max_steps


def test_synthesis_prompts_of_every_length_are_sentence_subsets_in_order():
    from mavilt.llm.tasks import sentence_subset

    report = "Cardiomegaly. Moderate right pleural effusion. No pneumothorax. The osseous structures are intact."
    rng = np.random.default_rng(0)
    draws = [sentence_subset(report, rng) for _ in range(200)]
    sentences = report.split(". ")
    for d in draws:
        kept = [x.rstrip(".") for x in d.split(". ")]
        assert kept and all(k.rstrip(".") in [x.rstrip(".") for x in sentences] for k in kept)
        assert [x.rstrip(".") for x in sentences if x.rstrip(".") in kept] == kept  # in the report's order
    lengths = {len(d.split(". ")) for d in draws}
    assert lengths == {1, 2, 3, 4}  # one finding alone up to the whole report
    assert sentence_subset("One sentence only.", rng) == "One sentence only."


def test_rehearsal_is_an_optional_stage_task_in_the_format_of_held_out_text():
    from mavilt.eval.ablation import ROWS
    from mavilt.llm.stages import get_stage
    from mavilt.llm.tasks import REPORT_TEXT, ExampleSettings

    assert "report_text" not in get_stage("stage2").task_weights()  # off unless configured
    cfg = load_config("tiny")
    on = cfg.with_overrides(ROWS["rehearsal"].overrides(cfg))
    assert on.stage2.task_weights == {**cfg.stage2.task_weights, "report_text": 0.25}
    assert on.stage1.task_weights["report_text"] == 0.25

    class Codec:
        def encode(self, text):
            return [5 + len(w) for w in text.split()]

    s = ExampleSettings(JointVocab(text_vocab_size=50, codebook_size=4, tokens_per_image=2, pad_id=0, bos_id=2,
                                   eos_id=1), Codec(), max_length=6)
    ex = REPORT_TEXT.example({"findings": "No acute findings here.", "impression": "Normal study."}, s, None)
    assert ex.input_ids[0] == 2 and ex.input_ids[-1] == 1 and len(ex) == 6  # cut to max_length, eos kept
    assert ex.loss_mask == [False] + [True] * 5


def test_a_field_at_its_neutral_value_leaves_the_step_hashes_of_earlier_runs_as_they_were():
    """generate.image_contrast(_draws) came after runs were made: off, they are left out of the hash (their
    stage 2 and evaluation are not made again); on, the hash changes."""
    from mavilt.hashing import config_hash

    cfg = load_config("tiny", ["generate.image_contrast=0", "generate.image_contrast_draws=1"])
    before = cfg.to_dict()
    for key in ("image_contrast", "image_contrast_draws"):  # the section as a run made before them saved it
        del before["generate"][key]
    assert cfg.hash("generate", "eval") == config_hash({"generate": before["generate"], "eval": before["eval"]})
    assert cfg.with_overrides(["generate.image_contrast=2"]).hash("generate") != cfg.hash("generate")
    assert cfg.with_overrides(["generate.image_contrast_draws=4"]).hash("generate") != cfg.hash("generate")
    assert "image_contrast" in cfg.to_dict()["generate"]  # saved configs still name it
