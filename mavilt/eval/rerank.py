"""Report decoding by reranking: draw N candidate reports per image and keep the one whose findings best agree
with what a CXR classifier sees in the image.

An option (``generate.rerank_candidates``), off in the default MAViLT configuration: it adds a second network
to decoding. The classifier is phi, the bundle's in-house encoder, never the evaluation's judge (reports are
scored against their references by the labeler; synthesised images by the judge). It reads the image the
model read: the VQ-GAN's decoding of the codes.

Agreement is the log-likelihood of the candidate's findings under the classifier's probabilities,
sum over the 14 observations of ``y log p + (1 - y) log(1 - p)``, where ``y`` is 1 for a finding the
candidate states (the rule-based labeler; uncertain and unmentioned count as absent). The greedy (or beam)
report is always the first candidate, so a tie keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def agreement(candidate_labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """[C] log-likelihood of each candidate's binary findings [C, 14] under the probabilities [14]."""
    p = np.clip(probabilities, eps, 1 - eps)
    y = candidate_labels.astype(np.float64)
    return (y * np.log(p) + (1 - y) * np.log(1 - p)).sum(-1)


def pick_by_agreement(candidates: Sequence[Sequence[str]], probabilities: np.ndarray) -> list[str]:
    """Per image, the candidate report (of its list) that agrees best with the classifier's probabilities
    [B, 14]; the first candidate wins ties."""
    from mavilt.data.labeler import label_reports
    from mavilt.eval.clinical import binarize_labels

    if len(candidates) != len(probabilities):
        raise ValueError(f"{len(candidates)} candidate lists for {len(probabilities)} images")
    out = []
    for texts, p in zip(candidates, probabilities):
        scores = agreement(binarize_labels(label_reports(list(texts)), "negative"), p)
        out.append(texts[int(np.argmax(scores))])  # argmax: the first of equal scores
    return out


def rerank_reports(first: Sequence[str], sample: Callable[[int], list[str]], n: int,
                   probabilities: np.ndarray) -> list[str]:
    """``first``: the greedy/beam report per image; ``sample(k)``: the k-th round of sampled reports (one per
    image, each round with its own seed); ``n``: candidates per image in all."""
    rounds = [list(first)] + [sample(k) for k in range(1, n)]
    return pick_by_agreement([list(c) for c in zip(*rounds)], probabilities)
