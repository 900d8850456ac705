"""The main job: prepare -> encoder -> judge -> vqgan -> pretrain_text -> stage1 -> stage2 -> evaluate, in one Ray
session. The judge is a second CXR encoder trained independently of phi (another seed): the evaluation scores
synthesised images with it, never with the network the tokenizer was trained against.

Each step writes ``<run>/<step>/result.json`` (the job's JSON result line), last. The run folder may be local
or a URI (:mod:`mavilt.storage`); steps chain across URIs exactly as across folders. A step is skipped when
that file exists with the same config hash; the hash of a step covers its own config sections and the hashes of the
steps it reads from, so changing the VQ-GAN re-runs everything downstream of it and nothing upstream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mavilt.config import Config
from mavilt.console import progress
from mavilt.errors import ConfigError, InputError
from mavilt.hashing import config_hash
from mavilt.runs import StepOutput, read_metrics, read_result, result_line, write_json
from mavilt.storage import Location

log = logging.getLogger(__name__)

Results = dict[str, dict[str, Any]]


@dataclass
class Step:
    name: str
    sections: tuple[str, ...]  # config sections the step depends on
    needs: tuple[str, ...]  # earlier steps whose outputs it reads
    run: Callable[[Config, Location, Results], dict[str, Any]]  # (cfg, step dir, upstream results) -> result
    derived: Callable[[Config], Any] | None = None  # settings the step derives from the config, hashed too


@dataclass(frozen=True)
class DataSource:
    """Where the run's data comes from: a source converted by the prepare step (``source``, rooted at
    ``root``), or a dataset already prepared by ``jobs/prepare.py`` (``data``), which the run uses as it is."""

    source: str = "synthetic"
    root: str | None = None
    data: str | None = None

    def check(self) -> "DataSource":
        from mavilt.data.prepare import SOURCES
        from mavilt.data.shards import check_dataset

        if self.data is not None:
            if self.root is not None or self.source != "synthetic":
                raise InputError("--data (a prepared dataset) replaces --source/--root: pass one or the other")
            check_dataset(self.data)  # names what is missing and who writes it
            return self
        if self.source not in SOURCES:
            raise InputError(f"--source {self.source}: use one of {', '.join(sorted(SOURCES))}")
        if self.source != "synthetic" and self.root is None:
            raise InputError(f"--source {self.source} needs --root (the dataset's top folder; for csv, the CSV file)")
        if self.source == "synthetic" and self.root is not None:
            raise InputError("--root is for a real source (--source mimic-cxr, mimic-cxr-jpg, iu-xray or csv)")
        return self

    def identity(self) -> dict[str, Any]:
        """What the prepare step's hash covers (with the data config): another source re-runs everything."""
        if self.data is not None:
            from mavilt.data.shards import read_manifest

            return {"data": Location.of(self.data).uri, "manifest": config_hash(read_manifest(self.data))}
        return {"source": self.source, "root": self.root}


def _prepare(source: DataSource, cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.data.prepare import run_prepare
    from mavilt.data.shards import read_manifest
    from mavilt.runs import finish

    if source.data is None:
        return run_prepare(source.source, out, cfg, root=source.root)
    # A dataset prepared earlier: this step only records where it is (its result's output is the dataset).
    progress(f"prepare: using the dataset at {source.data} as it is (--data)")
    m = read_manifest(source.data)
    metrics = {"given": 1, "total_images": m.get("total_images"), "counts": m.get("counts"),
               "skipped_total": m.get("skipped_total")}
    return finish("prepare", Location.of(source.data), None, metrics, config_hash(source.identity()), folder=out)


def _encoder(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.train.steps import run_encoder

    return run_encoder(cfg, results["prepare"]["output"], out.parent, out.name)


def _judge(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.train.steps import judge_config, run_encoder

    progress(f"judge: a second CXR encoder (seed {cfg.tune.judge_seed}), trained independently of phi: the "
             "evaluation scores synthesised images with it")
    return run_encoder(judge_config(cfg, cfg.eval.judge_steps), results["prepare"]["output"], out.parent, out.name)


def _vqgan(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.train.steps import run_vqgan

    return run_vqgan(cfg, results["prepare"]["output"], out.parent, out.name, results["encoder"]["checkpoint"])


def _pretrain_text(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.train.steps import run_pretrain_text

    return run_pretrain_text(cfg, results["prepare"]["output"], out.parent, out.name)


def _stage1(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.train.steps import run_stage

    init = results["pretrain_text"]["checkpoint"] or cfg.llm.base  # a real LM needs no text pretraining
    return run_stage("stage1", cfg, results["prepare"]["output"], results["vqgan"]["checkpoint"], init, out.parent, out.name)


def _stage2(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.train.steps import run_stage

    return run_stage("stage2", cfg, results["prepare"]["output"], results["vqgan"]["checkpoint"],
                     results["stage1"]["checkpoint"], out.parent, out.name, encoder_checkpoint=results["encoder"]["checkpoint"])


def _evaluate(cfg: Config, out: Location, results: Results) -> dict[str, Any]:
    from mavilt.eval.evaluate import evaluation_settings, run_evaluate

    # This run's evaluation settings, not the bundle's: a reused stage 2 was trained under other ones.
    return run_evaluate(results["stage2"]["checkpoint"], results["prepare"]["output"], out, evaluation_settings(cfg),
                        judge_checkpoint=results["judge"]["checkpoint"])


TRAINING = ("data", "compute")
STEPS: list[Step] = [
    Step("prepare", ("data",), (), lambda cfg, out, results: _prepare(DataSource(), cfg, out, results)),
    Step("encoder", TRAINING + ("encoder",), ("prepare",), _encoder),
    Step("judge", TRAINING, ("prepare",), _judge, derived=lambda cfg: _judge_encoder_section(cfg)),
    Step("vqgan", TRAINING + ("vqgan",), ("prepare", "encoder"), _vqgan),
    Step("pretrain_text", TRAINING + ("llm", "pretrain_text"), ("prepare",), _pretrain_text),
    Step("stage1", TRAINING + ("llm", "stage1"), ("prepare", "vqgan", "pretrain_text"), _stage1),
    Step("stage2", TRAINING + ("llm", "stage2", "generate"), ("prepare", "vqgan", "encoder", "stage1"), _stage2),
    Step("evaluate", ("eval", "generate"), ("prepare", "stage2", "judge"), _evaluate),
]


def _judge_encoder_section(cfg: Config) -> dict[str, Any]:
    from mavilt.train.steps import judge_config

    return judge_config(cfg, cfg.eval.judge_steps).to_dict()["encoder"]


def step_hash(cfg: Config, step: Step, results: Results, source: DataSource | None = None) -> str:
    """The step's own config sections, the hashes of the steps it reads from, and for the first step the data."""
    upstream = {n: results[n]["config_hash"] for n in step.needs}
    data = (source or DataSource()).identity() if not step.needs else None
    derived = {"derived": step.derived(cfg)} if step.derived else {}
    return config_hash({"step": step.name, "config": cfg.hash(*step.sections), "upstream": upstream, **derived,
                        **({"source": data} if data != DataSource().identity() else {})})


def run_pipeline(cfg: Config, run_dir: str | Path | Location, force: list[str] | None = None,
                 steps: list[Step] | None = None, source: DataSource | None = None,
                 reuse: str | Path | Location | list | None = None) -> dict[str, Any]:
    """Run (or resume) every step; prints a progress line per step and a summary table at the end. ``source``:
    where the data comes from (default: the synthetic phantoms of the config's ``data`` section). ``reuse``:
    other run folders (one or a list, searched in order) whose finished steps are taken as they are where their
    hash matches (ablations and seed runs share the data, tokenizer and encoders of one run)."""
    from mavilt.eval.evaluate import evaluate_headline
    from mavilt.raycluster import ensure_ray
    from mavilt.runs import finish

    force = set(force or [])
    source = (source or DataSource()).check()
    steps = [dataclasses.replace(s, run=lambda c, o, r: _prepare(source, c, o, r)) if s.name == "prepare" else s
             for s in (steps or STEPS)]
    unknown = force - {s.name for s in steps}
    if unknown:
        raise InputError(f"--force {sorted(unknown)}: no such step; steps are {[s.name for s in steps]}")
    if any(s.name == "evaluate" for s in steps) and cfg.eval.report_section != cfg.stage2.report_section:
        raise ConfigError(f"eval.report_section={cfg.eval.report_section} but stage2.report_section="
                          f"{cfg.stage2.report_section}: the evaluation would score one section against another; set "
                          "both to the same section")
    reuse_from = [Location.of(r) for r in ([] if reuse is None else reuse if isinstance(reuse, list) else [reuse])]
    run_dir = Location.of(run_dir).mkdir()
    cfg.save(run_dir / "config.yaml")
    ensure_ray()
    results: Results = {}
    summary = []
    t_all = time.perf_counter()
    for i, step in enumerate(steps, 1):
        out = run_dir / step.name
        h = step_hash(cfg, step, results, source)
        previous = read_result(out)
        if previous and previous.get("config_hash") == h and step.name not in force:
            results[step.name] = previous
            progress(f"[{i}/{len(steps)}] {step.name}: done earlier, skipped")
            summary.append((step.name, "skipped", 0.0, previous))
            continue
        shared = None if step.name in force else _reusable(reuse_from, step.name, h)
        if shared:
            # The run folder names what it took (the output and checkpoint stay where they are): the run reads
            # as a whole, and running it again skips the step as done.
            _clear_if_stale(out, h)
            write_json(StepOutput(out).result, shared)
            results[step.name] = shared
            progress(f"[{i}/{len(steps)}] {step.name}: the same step of {Location.of(shared['reused_from']).parent.uri}, reused")
            summary.append((step.name, "reused", 0.0, shared))
            continue
        progress(f"[{i}/{len(steps)}] {step.name}: running ...")
        _clear_if_stale(out, h)
        t0 = time.perf_counter()
        result = step.run(cfg, out, results)
        # The step's own job hash covers its inputs; the pipeline's covers the chain, so it wins here.
        result["config_hash"] = h
        line = {**result.pop("line", result_line(result)), "config_hash": h}
        write_json(StepOutput(out).result, line)
        seconds = time.perf_counter() - t0
        results[step.name] = result
        progress(json.dumps(line))
        not_needed = (result.get("metrics") or {}).get("not_needed")
        if not_needed:  # a step that does not apply to this config (text pretraining for a real LM)
            summary.append((step.name, "not needed", seconds, result))
            progress(f"[{i}/{len(steps)}] {step.name}: not needed: {not_needed}")
            continue
        summary.append((step.name, "ran", seconds, result))
        progress(f"[{i}/{len(steps)}] {step.name}: finished in {seconds:.0f} s")
    total = time.perf_counter() - t_all
    table = _summary_table(summary, total)
    progress(table)
    # Every step's full metrics (a step skipped now: from its metrics.json), its status and time.
    metrics = {name: (read_metrics(Location.of(r["reused_from"]) if r.get("reused_from") else run_dir / name)
                      if status in ("skipped", "reused") else r.get("metrics", {}))
               for name, status, _, r in summary}
    metrics["steps"] = {name: {"status": status, "seconds": round(sec, 1)} for name, status, sec, _ in summary}
    metrics["seconds"] = round(total, 1)
    evaluated = next((r for name, _, _, r in summary if name == "evaluate"), {})
    # A reused evaluation's report stays where it was made; this run's folder holds only its result.json.
    report = (Location.of(evaluated["reused_from"]) if evaluated.get("reused_from") else run_dir / "evaluate") / "report.md"
    metrics["report"] = str(report) if report.is_file() else None
    if metrics["report"]:
        progress(f"report: {report}")
    final = results.get(steps[-1].name, {})
    picked = {"steps": {name: f"{status} {sec:.0f} s" for name, status, sec, _ in summary}}
    if "evaluate" in metrics:
        picked["evaluate"] = evaluate_headline(metrics["evaluate"])
    return finish("pipeline", run_dir, final.get("checkpoint"), metrics, step_hash(cfg, steps[-1], results, source),
                  picked=picked)


STEP_HASH_FILE = ".pipeline_step_hash"


def _reusable(runs: list[Location], step: str, h: str) -> dict[str, Any] | None:
    """The finished ``step`` of the first run in ``runs`` whose hash is ``h`` (its result, and where it is)."""
    for run in runs:
        found = read_result(run / step)
        if found and found.get("config_hash") == h:
            return {**found, "reused_from": found.get("reused_from") or (run / step).uri}  # the step's own folder
    return None


def _clear_if_stale(out: Location, h: str) -> None:
    """An interrupted step with the same config resumes (Ray Train restores its checkpoint); one left by an
    older config must not: clear it, so the new config trains from scratch."""
    marker = out / STEP_HASH_FILE
    if out.exists() and (not marker.is_file() or marker.read_text().strip() != h):
        if out.iterdir():
            log.info("clearing %s: it holds a run of another config", out)
        out.remove()
    out.mkdir()
    marker.write_text(h + "\n")



HEADLINES = {
    "prepare": ("total_images", "skipped_total"),
    "encoder": ("val_auroc_mean",),
    "judge": ("val_auroc_mean",),
    "vqgan": ("val_psnr", "val_ssim", "val_usage"),
    "pretrain_text": ("heldout_text_ppl",),
    "stage1": ("val_loss", "drift", "heldout_text_ppl"),
    "stage2": ("val_loss", "drift", "heldout_text_ppl"),
}


def _headline(name: str, result: dict[str, Any]) -> str:
    from mavilt.eval.evaluate import evaluate_headline

    m = result.get("metrics", {})
    if m.get("not_needed"):
        return str(m["not_needed"])
    if name == "evaluate":
        h = evaluate_headline(m)
        found = {"F1 micro-14": h.get("f1_micro_14"), "BLEU-4": h.get("BLEU-4"), "VQA acc": h.get("vqa_accuracy"),
                 "FID": h.get("fid")}
    else:
        found = {k: m.get(k) for k in HEADLINES.get(name, ())}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in found.items() if v is not None)


def _summary_table(summary: list, total: float) -> str:
    lines = ["", "| step | status | seconds | headline metrics |", "|---|---|---|---|"]
    for name, status, seconds, result in summary:
        lines.append(f"| {name} | {status} | {seconds:.0f} | {_headline(name, result)} |")
    lines.append(f"| total | | {total:.0f} | |")
    return "\n".join(lines)
