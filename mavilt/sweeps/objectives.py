"""What the sweeps score, defined once: none of it depends on the λs being searched, and none of it is scored by
a network the trial trains.

Tokenizer (``val_tokenizer_objective``, minimised)
    ``diagnosis drift + tune.edge_weight · edge error`` on the validation split. The diagnosis drift is the mean
    absolute difference of the judge's probabilities on the reconstruction and on the original, over the
    observations the judge reads (validation AUROC ≥ ``tune.judge_min_auroc``): does the reconstruction keep
    what a reader would diagnose? The judge is a second CXR encoder trained with another seed, never by the
    trial, so a large λ_feat (which pulls φ's features together) earns nothing by construction. The edge error
    (mean absolute difference of Sobel gradient magnitudes) keeps the lesion edges in view. Both are in the
    units of the image or of a probability, so they add without a scale.

Stage (``stage_objective``, minimised)
    ``val_loss + tune.retention_weight · ln(held-out ppl / start's) − tune.f1_weight · clinical F1``. The
    validation loss is the stage's task loss (λ_reg's penalty is not in it); the log perplexity ratio is the
    held-out text loss gained since the stage's start, in the same nats per token as the task loss; the clinical
    F1 (micro over the 14 observations) is that of reports generated for a fixed validation subset at the last
    report only, so trials stopped early carry none.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mavilt.config import TuneConfig

TOKENIZER_METRIC = "val_tokenizer_objective"
STAGE_METRIC = "stage_objective"


def tokenizer_objective(metrics: Mapping[str, float], tune: TuneConfig) -> float:
    return float(metrics["judge_drift"] + tune.edge_weight * metrics["edge_error"])


def stage_objective(metrics: Mapping[str, float], tune: TuneConfig) -> float:
    return float(task_quality(metrics, tune) + tune.retention_weight * math.log(metrics["heldout_ppl_ratio"]))


def task_quality(metrics: Mapping[str, float], tune: TuneConfig) -> float:
    """The task part of the stage objective (lower is better): validation loss minus weighted clinical F1."""
    return float(metrics["val_loss"] - tune.f1_weight * float(metrics.get("clinical_f1") or 0.0))


class DiagnosisDrift:
    """The judge's view of a reconstruction: per image, the mean |p(x̂) − p(x)| over the observations it reads."""

    def __init__(self, judge: torch.nn.Module, observations: Sequence[str]):
        from mavilt.data.labels import OBSERVATIONS

        unknown = sorted(set(observations) - set(OBSERVATIONS))
        if unknown or not observations:
            raise ValueError(f"the judge must read some of the 14 observations; got {list(observations)}")
        self.judge = judge.eval()
        self.index = torch.tensor([OBSERVATIONS.index(o) for o in observations])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        p, pr = (torch.sigmoid(self.judge(v).float())[:, self.index.to(v.device)] for v in (x, xr))
        return (pr - p).abs().mean(dim=1)


def judge_observations(judge_metrics: Mapping[str, Any], min_auroc: float) -> tuple[str, ...]:
    """The observations a trained judge reads well enough to score by (from its step's metrics)."""
    from mavilt.data.labels import OBSERVATIONS

    aucs = {k.split("/", 1)[1]: v for k, v in judge_metrics.items() if k.startswith("val_auroc/") and v is not None}
    return tuple(o for o in OBSERVATIONS if o in aucs and aucs[o] >= min_auroc)


def fixed_report_studies(rows: list[dict[str, Any]], n: int, section: str) -> list[dict[str, Any]]:
    """The same ``n`` validation studies in every trial: one image per study, the first ``n`` by study id among
    those with a report section to compare against."""
    from mavilt.data.shards import one_image_per_study, report_text

    studies = [r for r in one_image_per_study(rows) if report_text(r, section).strip()]
    return sorted(studies, key=lambda r: str(r["study_id"]))[:n]


@torch.no_grad()
def validation_report_f1(model: torch.nn.Module, stage, vocab, codec, rows: list[dict[str, Any]], n: int,
                         section: str, max_new_tokens: int, batch_size: int = 25) -> float:
    """Micro F1 (14 observations, uncertain = negative) of greedy reports for :func:`fixed_report_studies`,
    written with the stage's own report prompt, against the studies' reference labels."""
    from mavilt.data.labeler import label_reports
    from mavilt.eval.clinical import binarize_labels, f1_from_matrices, reference_labels
    from mavilt.llm.generate import generate_text
    from mavilt.llm.tasks import IMAGE_TO_REPORT, REPORT

    studies = fixed_report_studies(rows, n, section)
    if not studies:
        return 0.0
    task = REPORT if "report" in stage.tasks else IMAGE_TO_REPORT
    was_training = model.training
    model.eval()
    texts: list[str] = []
    for s in range(0, len(studies), batch_size):
        part = studies[s : s + batch_size]
        prompts = [task.prompt(vocab, codec, np.asarray(r["codes"]), section=section) for r in part]
        ids = generate_text(model, vocab, prompts, max_new_tokens=max_new_tokens, num_beams=1)
        texts.extend(codec.decode(x) for x in ids)
    model.train(was_training)
    y_true = binarize_labels([reference_labels(r) for r in studies])
    y_pred = binarize_labels(label_reports(texts))
    return f1_from_matrices(y_true, y_pred)["f1_micro_14"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both minimised), by the first."""
    front = []
    for i, (a, b) in enumerate(points):
        if any(not math.isfinite(v) for v in (a, b)):
            continue
        dominated = any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])
