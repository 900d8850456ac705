"""`jobs/ablation.py`: each lever of the model on and off, over seeds, in one table (``ablation.md``).

A row is the preset's default configuration with some settings changed. Rows that retrain run the main job
(:func:`mavilt.pipeline.run_pipeline`) in a folder of their own, reusing the data, tokenizer and encoders of a
base run (``--reuse``, e.g. the demo's run): only the LLM stages and the evaluation run again. Rows that change
decoding only evaluate the default row's bundle again with their settings. Seed ``s`` of a row sets the LLM
stages' seeds (``stage1.seed``, ``stage2.seed``) and the sampling seed to ``s``; the tokenizer and encoders are
shared by every seed.

The table gives, per row, the mean and standard deviation over its seeds and, for one seed, the evaluation's
bootstrap 95% CI; the split is the one the rows were evaluated on. Choices (which lever is on by default) are
made on the validation split, never on the test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mavilt.config import Config
from mavilt.console import progress
from mavilt.errors import ConfigError
from mavilt.hashing import config_hash
from mavilt.storage import Location

FIVE = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")


@dataclass(frozen=True)
class Row:
    name: str
    what: str  # the lever, in words
    overrides: Callable[[Config], list[str]] = field(default=lambda cfg: [])
    kind: str = "lever"  # lever: a candidate for the default; option: changes the method (off by default); seed:
    # the seed paper's ablations; default: the row the others are compared with
    retrain: bool = True  # False: only decoding changes; the default row's bundle is evaluated again


def _both_stages(**settings: Any) -> Callable[[Config], list[str]]:
    return lambda cfg: [f"{s}.{k}={v}" for s in ("stage1", "stage2") for k, v in settings.items()]


def _joint_stage(cfg: Config) -> list[str]:
    """One joint stage of the same total steps: stage 1 reduced to a single step (it still adds the image
    tokens and theta_0), stage 2 given the rest."""
    total = cfg.stage1.max_steps + cfg.stage2.max_steps
    return ["stage1.max_steps=1", "stage1.eval_every=1", f"stage2.max_steps={total - 1}",
            f"stage2.eval_every={max((total - 1) // 2, 1)}"]


def _flip_weight(key: str, on: float) -> Callable[[Config], list[str]]:
    """The weight ``key`` of both stages off (1) when the default has it on, else on at ``on``."""
    def overrides(cfg: Config) -> list[str]:
        value = 1.0 if getattr(cfg.stage2, key) != 1.0 else on
        return _both_stages(**{key: value})(cfg)
    return overrides


def _flip_rehearsal(cfg: Config) -> list[str]:
    from mavilt.llm.stages import get_stage

    out = []
    for name in ("stage1", "stage2"):
        weights = get_stage(name).task_weights(cfg.section(name).task_weights)
        weights["report_text"] = 0.0 if weights.get("report_text") else 0.25
        out.append(f"{name}.task_weights={{{', '.join(f'{k}: {v}' for k, v in weights.items())}}}")
    return out


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("default", "the preset's default configuration", kind="default"),
    Row("clinical_weight", "loss weight of clinical report tokens (finding, negation, hedge, side, size) flipped: "
        "1 if the default weights them, else 3", _flip_weight("clinical_token_weight", 3.0)),
    Row("image_weight", "loss weight of image codes as the response flipped: 1 if the default weights them, else 2",
        _flip_weight("image_token_weight", 2.0)),
    Row("report_subsets", "synthesis trained on random sentence subsets of the report half of the time (prompts of "
        "every length) flipped: 0 if the default does, else 0.5",
        lambda cfg: [f"stage2.report_subsets={0.0 if cfg.stage2.report_subsets else 0.5}"]),
    Row("rehearsal", "plain report text rehearsed in both stages (task report_text at weight 0.25) flipped: off if "
        "the default rehearses", _flip_rehearsal),
    Row("no_lambda_reg", "lambda_reg = 0 in both stages (no pull toward the pretrained LM)", _both_stages(lambda_reg=0.0),
        kind="seed"),
    Row("joint_stage", "one joint stage of the same total steps instead of two stages", _joint_stage, kind="seed"),
    Row("beam3", "reports by beam search, width 3 (default: greedy; contrastive decoding off, it is greedy)",
        lambda cfg: ["generate.num_beams=3", "generate.image_contrast=0"], retrain=False),
    Row("image_contrast", "visual contrastive decoding of reports (the image against random codes) flipped: off if "
        "the default contrasts, else at 3 against 4 draws, greedy",
        lambda cfg: ["generate.image_contrast=0"] if cfg.generate.image_contrast and cfg.generate.num_beams == 1
        and not cfg.generate.do_sample else ["generate.image_contrast=3", "generate.image_contrast_draws=4",
                                             "generate.num_beams=1", "generate.do_sample=false"],
        retrain=False),
    Row("rerank8", "8 report candidates (greedy + 7 sampled at temperature 0.7), the one phi agrees with kept",
        lambda cfg: ["generate.rerank_candidates=8", "generate.temperature=0.7", "generate.top_p=1.0"],
        kind="option", retrain=False),
    Row("cfg1", "synthesis without classifier-free guidance (scale 1)", lambda cfg: ["generate.cfg_scale=1.0"], retrain=False),
    Row("cfg5", "synthesis guidance scale 5", lambda cfg: ["generate.cfg_scale=5.0"], retrain=False),
)}


def seed_overrides(seed: int) -> list[str]:
    return [f"stage1.seed={seed}", f"stage2.seed={seed}", f"generate.seed={seed}"]


def run_ablation(cfg: Config, out: Location, rows: list[str], seeds: int, default_seeds: int,
                 reuse: list[str] | None = None) -> dict[str, Any]:
    """Run every row (``seeds`` seeds; the default row ``default_seeds``), then write ablation.md and
    ablation.json in ``out``. A row's run folder is ``out/<row>-seed<s>``; a finished one is not run again.
    ``reuse``: finished runs whose steps the rows share; the default row's first seed is searched after them,
    so the judge, the data and the tokenizer are made at most once."""
    from mavilt.pipeline import run_pipeline
    from mavilt.runs import finish

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"--rows {','.join(unknown)}: no such row; rows are {', '.join(ROWS)}")
    if "default" not in rows:
        rows = ["default", *rows]
    t0 = time.perf_counter()
    out.mkdir()
    runs: dict[str, list[dict[str, Any]]] = {}

    def default_run(seed: int) -> Location:
        return out / f"default-seed{seed}"

    for name in rows:
        row = ROWS[name]
        n = default_seeds if name == "default" else seeds
        for s in range(n):
            folder = out / f"{name}-seed{s}"
            over = row.overrides(cfg) + seed_overrides(s)
            progress(f"ablation: {name}, seed {s} ({row.what})")
            if row.retrain:
                shared = [*(reuse or []), default_run(0)]
                done = run_pipeline(cfg.with_overrides(over, source=f"ablation row {name}"), folder, reuse=shared)
                evaluated = done["metrics"]["evaluate"]  # its own evaluation, or a reused one
                trained = folder
            else:
                trained = default_run(s)
                evaluated = _evaluate_decoding(cfg, name, over, trained, folder / "evaluate")
            runs.setdefault(name, []).append(row_metrics(evaluated, folder, trained))
    table = {name: summarize(rs) for name, rs in runs.items()}
    md = ablation_markdown(table, runs, cfg)
    (out / "ablation.md").write_text(md)
    (out / "ablation.json").write_json({"rows": {n: {"what": ROWS[n].what, "kind": ROWS[n].kind, "runs": runs[n],
                                                     "summary": table[n]} for n in runs}})
    progress(f"ablation: {(out / 'ablation.md').uri}")
    picked = {n: {k: v for k, v in t.items() if k in ("f1_micro_14", "vqa_accuracy", "label_fidelity_f1")} for n, t in table.items()}
    return finish("ablation", out, None, {"rows": table, "seconds": round(time.perf_counter() - t0, 1)},
                  config_hash([rows, seeds, default_seeds, cfg.to_dict()]), picked=picked)


def _evaluate_decoding(cfg: Config, name: str, overrides: list[str], base: Location, out: Location) -> dict[str, Any]:
    """A decoding row: the default row's bundle in ``base`` evaluated again at ``out`` with the command's
    evaluation and decoding settings (every ``eval.*`` and ``generate.*`` of ``cfg``) and the row's. An
    evaluation already there is kept only if it was made with exactly these settings."""
    from mavilt.config import parse_overrides
    from mavilt.eval.evaluate import evaluation_config, evaluation_hash, evaluation_settings, run_evaluate
    from mavilt.runs import read_metrics, read_result

    chain = {k: read_result(base / k) for k in ("prepare", "judge", "stage2")}
    if not all(chain.values()):
        raise ConfigError(f"ablation row {name} evaluates the default row's bundle in {base.uri}, which is not "
                          f"finished there: run the default row with as many seeds")
    settings = evaluation_settings(cfg)
    for section, values in parse_overrides([o for o in overrides if o.startswith(("generate.", "eval."))]).items():
        settings[section].update(values)
    bundle, data, judge = chain["stage2"]["checkpoint"], chain["prepare"]["output"], chain["judge"]["checkpoint"]
    previous = read_result(out)
    if not previous or previous.get("config_hash") != evaluation_hash(bundle, data, evaluation_config(bundle, settings),
                                                                      judge):
        run_evaluate(bundle, data, out, settings, judge_checkpoint=judge)
    return read_metrics(out)


def row_metrics(m: dict[str, Any], folder: Location, trained: Location) -> dict[str, Any]:
    """One run's figures from its evaluation's metrics, and the held-out perplexity of the run that trained
    its bundle (``trained``: the row's own pipeline run, or the default row's for a decoding row)."""
    from mavilt.runs import read_metrics

    rep = m.get("reports", {}).get("systems", {})
    model = rep.get("model", {})
    lf = m.get("images", {}).get("label_fidelity", {}).get("synthesized", {})
    out: dict[str, Any] = {
        "folder": folder.uri, "split": m.get("split"),
        "f1_micro_14": model.get("f1_micro_14"), "f1_micro_14_ci95": model.get("ci95", {}).get("f1_micro_14"),
        "f1_micro_5": model.get("f1_micro_5"),
        **{f"f1/{o}": model.get("per_observation_f1", {}).get(o) for o in FIVE},
        "retrieval_f1_micro_14": rep.get("retrieval", {}).get("f1_micro_14"),
        "vqa_accuracy": m.get("vqa", {}).get("model", {}).get("accuracy"),
        "vqa_accuracy_ci95": m.get("vqa", {}).get("ci95", {}).get("model"),
        "label_fidelity_f1": lf.get("f1"), "label_fidelity_f1_ci95": lf.get("f1_ci95"),
        "fid": m.get("images", {}).get("fid", {}).get("synthesized", {}).get("fid"),
        "judge": m.get("images", {}).get("judge"),
    }
    chain = read_metrics(trained)  # the pipeline's metrics: every step's, reused ones too
    s2, pt = chain.get("stage2") or {}, chain.get("pretrain_text") or {}
    out["ppl_stage2"], out["ppl_pretrained"] = s2.get("heldout_text_ppl"), pt.get("heldout_text_ppl")
    if out.get("ppl_stage2") and out.get("ppl_pretrained"):
        out["ppl_ratio"] = out["ppl_stage2"] / out["ppl_pretrained"]
    return out


SUMMARY_KEYS = ("f1_micro_14", "f1_micro_5", *(f"f1/{o}" for o in FIVE), "vqa_accuracy", "label_fidelity_f1", "fid",
                "ppl_ratio")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (ddof 1; 0 for one seed) over a row's seeds, per figure."""
    out: dict[str, Any] = {"seeds": len(runs)}
    for k in SUMMARY_KEYS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = float(np.mean(vals))
            out[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


def _cell(t: dict[str, Any], runs: list[dict[str, Any]], key: str, digits: int = 3) -> str:
    if key not in t:
        return "–"
    if len(runs) > 1:
        return f"{t[key]:.{digits}f} ± {t[key + '_std']:.{digits}f}"
    ci = runs[0].get(f"{key}_ci95")
    return f"{t[key]:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def ablation_markdown(table: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]], cfg: Config) -> str:
    first = next(iter(runs.values()))[0]
    split = first.get("split")
    lines = [
        "# MAViLT ablations", "",
        f"Preset `{cfg.preset}`; every row evaluated on the **{split}** split. A cell is the mean ± standard deviation "
        "over the row's seeds, or for one seed its value with the evaluation's bootstrap 95% CI. Kinds: *lever* (a "
        "candidate for the default), *option* (changes the method: off in the default MAViLT configuration), *seed* "
        "(the seed paper's own ablations). Reports are scored by the rule-based labeler against the references; "
        f"synthesised images by {first.get('judge') or 'the in-house encoder'}. Perplexity ratio: held-out report "
        "text perplexity after stage 2 over the pretrained LM's.", "",
        "| row | kind | what | seeds | F1 micro-14 | F1 micro-5 | " + " | ".join(FIVE) +
        " | VQA acc | label fidelity F1 | FID | ppl ratio |",
        "|---|---|---|---|---|---|" + "---|" * len(FIVE) + "---|---|---|---|",
    ]
    for name, t in table.items():
        rs = runs[name]
        row = ROWS[name]
        cells = [_cell(t, rs, "f1_micro_14"), _cell(t, rs, "f1_micro_5"), *(_cell(t, rs, f"f1/{o}", 2) for o in FIVE),
                 _cell(t, rs, "vqa_accuracy"), _cell(t, rs, "label_fidelity_f1"), _cell(t, rs, "fid", 2),
                 _cell(t, rs, "ppl_ratio", 2)]
        lines.append(f"| {name} | {row.kind} | {row.what} | {t['seeds']} | " + " | ".join(cells) + " |")
    retrieval = [r.get("retrieval_f1_micro_14") for rs in runs.values() for r in rs if r.get("retrieval_f1_micro_14")]
    if retrieval:
        lines += ["", f"Nearest-neighbour retrieval by phi's features (the baseline to beat): F1 micro-14 "
                      f"{float(np.mean(retrieval)):.3f} on the same studies."]
    lines += ["", "Run folders: " + ", ".join(f"`{r['folder']}`" for rs in runs.values() for r in rs), ""]
    return "\n".join(lines)
