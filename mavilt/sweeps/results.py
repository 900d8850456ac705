"""What a sweep leaves: one row per trial (CSV and markdown), plots, the Pareto front of a stage sweep, the best
trial's config and ``best.json``, the seed re-runs as mean ± std, and the job's result line.

Everything is written to a local folder and published at ``<sweep>/results`` with ``result.json`` last, so a
reader (a serving config pointing at ``best.json``) never sees half of it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mavilt.config import Config
from mavilt.console import progress
from mavilt.hashing import config_hash
from mavilt.runs import finish, read_result, write_json
from mavilt.storage import Location, publish_dir
from mavilt.sweeps.objectives import pareto_front, task_quality
from mavilt.sweeps.spec import SweepSpec

# Tune's own bookkeeping in every result: not a metric of the trial.
_TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
              "pid", "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore",
              "checkpoint_path", "experiment_tag"}
COMPLETE, STOPPED, ERROR = "complete", "stopped early", "error"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, float]
    status: str  # complete | stopped early | error
    stopped_at: int  # the step of its last report
    objective: float  # its last report's objective (nan when it reported none)
    metrics: dict[str, float] = field(default_factory=dict)  # every numeric metric of the last report
    checkpoint: str | None = None  # the step's hand-off (stage 2: its bundle); None unless it finished
    seed_offset: int = 0
    label: str = ""  # seed re-runs: best | preset


def collect(grid, spec: SweepSpec, steps: int, experiment: Location) -> list[TrialRow]:
    """Rows of a finished Tune experiment (its trials' steps ran under ``experiment/trials``), in trial order."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = str(m.get("trial_id") or Path(str(r.path)).name)
        point = dict(r.config.get("rerun", r.config))
        offset, label = int(point.pop("seed_offset", 0)), str(point.pop("label", ""))
        step = int(m.get("step") or 0)
        status = ERROR if r.error else (COMPLETE if step >= steps else STOPPED)
        trial_dir = experiment / "trials" / trial_id / spec.step
        done = read_result(trial_dir) if status == COMPLETE else None
        objective = m.get(spec.metric)
        rows.append(TrialRow(
            trial_id=trial_id, params={p.key: float(point[p.key]) for p in spec.params if p.key in point},
            status=status, stopped_at=step, objective=float(objective) if objective is not None else math.nan,
            metrics={k: float(v) for k, v in m.items() if k not in _TUNE_KEYS and isinstance(v, (int, float))
                     and not isinstance(v, bool)},
            checkpoint=(done or {}).get("checkpoint"), seed_offset=offset, label=label))
    return sorted(rows, key=lambda t: t.trial_id)


def best_trial(rows: list[TrialRow]) -> TrialRow | None:
    """The lowest objective among complete trials (trials stopped early never reached the last report)."""
    scored = [t for t in rows if t.status == COMPLETE and math.isfinite(t.objective)]
    return min(scored, key=lambda t: t.objective) if scored else None


def _preset_trial(rows: list[TrialRow], preset: dict[str, float]) -> TrialRow | None:
    return next((t for t in rows if all(math.isclose(t.params.get(k, math.nan), v, rel_tol=1e-9)
                                        for k, v in preset.items())), None)


def rerun_points(rows: list[TrialRow], spec: SweepSpec, preset: dict[str, float], seeds: int) -> list[dict[str, Any]]:
    """The seed re-runs: the best trial's point and the preset's, each with ``seeds`` more seeds (and with its
    own seed too when the sweep stopped that trial early)."""
    best = best_trial(rows)
    if seeds <= 0 or best is None:
        return []
    out = []
    preset_row = _preset_trial(rows, preset)
    labels = [("best", best.params, best)]
    if preset_row is not best:
        labels.append(("preset", preset, preset_row))
    for label, point, row in labels:
        offsets = list(range(1, seeds + 1))
        if row is None or row.status != COMPLETE:
            offsets.insert(0, 0)
        out.extend({**point, "seed_offset": o, "label": label} for o in offsets)
    return out


def seed_summary(rows: list[TrialRow], reruns: list[TrialRow], preset: dict[str, float], keys: list[str]) -> dict[str, Any]:
    """Mean ± std over seeds of the best point and the preset's, from the original trial and its re-runs."""
    best = best_trial(rows)
    if best is None:
        return {}
    groups = {"best": [best] + [t for t in reruns if t.label == "best"]}
    preset_row = _preset_trial(rows, preset)
    if preset_row is best:
        groups["preset"] = groups["best"]
    else:
        groups["preset"] = ([preset_row] if preset_row and preset_row.status == COMPLETE else []) + \
                           [t for t in reruns if t.label == "preset"]
    out = {}
    for label, group in groups.items():
        group = [t for t in group if t.status == COMPLETE]
        stats = {}
        for k in keys:
            vals = [t.objective if k == "objective" else t.metrics.get(k, math.nan) for t in group]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                stats[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            "n": len(vals)}
        out[label] = {"params": group[0].params if group else {}, "seeds": [t.seed_offset for t in group], **stats}
    return out


# ---- files ------------------------------------------------------------------------------------------------


def _columns(spec: SweepSpec, rows: list[TrialRow]) -> list[str]:
    metric_keys = sorted({k for t in rows for k in t.metrics if k != spec.metric})
    return ["trial", *[p.key for p in spec.params], "objective", "status", "stopped_at", *metric_keys]


def _cells(spec: SweepSpec, t: TrialRow) -> dict[str, Any]:
    return {"trial": t.trial_id + (f" ({t.label}, seed +{t.seed_offset})" if t.label else ""),
            **t.params, "objective": t.objective, "status": t.status, "stopped_at": t.stopped_at, **t.metrics}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(spec: SweepSpec, rows: list[TrialRow], columns: list[str] | None = None) -> str:
    cols = columns or _columns(spec, rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in rows:
        c = _cells(spec, t)
        lines.append("| " + " | ".join(_fmt(c.get(k, "")) for k in cols) + " |")
    return "\n".join(lines)


def csv_table(spec: SweepSpec, rows: list[TrialRow]) -> str:
    cols = _columns(spec, rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for t in rows:
        w.writerow({k: _fmt(v) for k, v in _cells(spec, t).items()})
    return buf.getvalue()


def _plots(spec: SweepSpec, cfg: Config, rows: list[TrialRow], out: Path) -> tuple[list[str], list[str]]:
    """PNG plots: the objective against each searched key, and for stage sweeps the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, front_ids = [], []
    colours = {COMPLETE: "tab:blue", STOPPED: "tab:orange", ERROR: "tab:red"}
    for p in spec.params:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for status, colour in colours.items():
            pts = [(t.params[p.key], t.objective) for t in rows if t.status == status and math.isfinite(t.objective)]
            if pts:
                ax.scatter(*zip(*pts), c=colour, label=status)
        ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"{spec.metric} (last report)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"objective_vs_{p.key.replace('.', '_')}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    if spec.step != "vqgan":
        usable = [t for t in rows if "val_loss" in t.metrics and "heldout_ppl_ratio" in t.metrics]
        points = [(task_quality(t.metrics, cfg.tune), t.metrics["heldout_ppl_ratio"]) for t in usable]
        front = pareto_front(points)
        front_ids = [usable[i].trial_id for i in front]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if points:
            ax.scatter(*zip(*points), c="tab:gray", label="trials (last report)")
            ax.plot(*zip(*[points[i] for i in front]), "o-", c="tab:green", label="Pareto front")
        ax.set_xlabel("task: val_loss - f1_weight * clinical F1 (lower is better)")
        ax.set_ylabel("held-out ppl / start's (lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=100)
        plt.close(fig)
        names.append("pareto.png")
    return names, front_ids


def write_results(spec: SweepSpec, cfg: Config, root: Location, trials: list[TrialRow], reruns: list[TrialRow],
                  preset: dict[str, float], *, seconds: float) -> dict[str, Any]:
    best = best_trial(trials)
    headline = ["objective", *(["judge_drift", "edge_error", "psnr", "ssim", "usage"] if spec.step == "vqgan" else
                               ["val_loss", "clinical_f1", "heldout_ppl_ratio", "drift"])]
    keys = [k if k == "objective" else (f"val_{k}" if spec.step == "vqgan" else k) for k in headline]
    seeds = seed_summary(trials, reruns, preset, keys)
    results = root / "results"
    with tempfile.TemporaryDirectory(prefix="mavilt-sweep-") as tmp:
        out = Path(tmp)
        all_rows = trials + reruns
        (out / "table.csv").write_text(csv_table(spec, all_rows))
        (out / "table.md").write_text(markdown_table(spec, all_rows) + "\n")
        plots, front = _plots(spec, cfg, trials, out)
        best_cfg = best_json = None
        if best is not None:
            (out / "best.yaml").write_text(spec.export_config(cfg, best.params).to_yaml())
            best_cfg = (results / "best.yaml").uri
            best_json = {"job": spec.job, "step": spec.step, "metric": spec.metric, "mode": "min",
                         "trial_id": best.trial_id, "params": best.params, "objective": best.objective,
                         "config": best_cfg, "checkpoint": best.checkpoint}
            write_json(out / "best.json", best_json)
        metrics = {
            "metric": spec.metric, "trials": len(trials),
            "complete": sum(t.status == COMPLETE for t in trials),
            "stopped_early": sum(t.status == STOPPED for t in trials),
            "errored": sum(t.status == ERROR for t in trials),
            "best": best_json, "preset": preset, "seeds": seeds, "pareto_front": front,
            "table": (results / "table.md").uri, "plots": [(results / p).uri for p in plots],
            "seconds": round(seconds, 1),
        }
        # The line: the best point and each re-run's objective (mean, std); the full tables in metrics.json.
        picked = {"seeds": {label: {k: s[k] for k in ("objective",) if k in s} for label, s in seeds.items()}}
        result = finish(spec.job, results, best.checkpoint if best else None, metrics,
                        config_hash([spec.job, spec.step, cfg.to_dict()]), folder=out, picked=picked)
        publish_dir(out, results, "result.json")
    compact = ["trial", *[p.key for p in spec.params], "objective", *keys[1:], "status", "stopped_at"]
    progress(markdown_table(spec, trials + reruns, compact))
    if front:
        progress(f"Pareto front (task quality vs held-out perplexity ratio): {', '.join(front)}")
    for label, s in seeds.items():
        progress(f"{label} {s.get('params')}: " + ", ".join(
            f"{k} {v['mean']:.4g} ± {v['std']:.2g} (n={v['n']})" for k, v in s.items() if k not in ("params", "seeds")))
    if best is not None:
        progress(f"best: {best.trial_id} {best.params} -> {results / 'best.yaml'}, {results / 'best.json'}")
    return json.loads(json.dumps(result))
