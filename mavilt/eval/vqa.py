"""VQA metrics: accuracy overall and per question type, AUROC of yes/no questions, and the majority baseline.

An item is a dict with ``type``, ``answer`` (gold), ``predicted``, optionally ``probabilities`` (answer -> prob,
for closed questions) and ``choices``. Answers are compared after normalisation (lower case, surrounding
whitespace and a trailing period removed), so "Yes." and "yes" match.

Yes/no questions are the items whose choices are exactly {yes, no} (or, without choices, whose gold answer is
yes or no). Their AUROC scores P(yes) against gold == yes over those that carry probabilities.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

YES, NO = "yes", "no"


def normalize_answer(text: Any) -> str:
    s = "" if text is None else str(text).strip().lower()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _is_yes_no(item: Mapping[str, Any]) -> bool:
    choices = item.get("choices")
    if choices:
        return {normalize_answer(c) for c in choices} == {YES, NO}
    return normalize_answer(item.get("answer")) in (YES, NO)


def _p_yes(item: Mapping[str, Any]) -> float | None:
    probs = item.get("probabilities")
    if not probs:
        return None
    for k, v in probs.items():
        if normalize_answer(k) == YES:
            return float(v)
    return None


def _auroc(pairs: list[tuple[float, int]]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not pairs:
        return None
    scores, gold = zip(*pairs)
    if len(set(gold)) < 2:
        return None
    return float(roc_auc_score(np.asarray(gold), np.asarray(scores)))


def vqa_metrics(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``accuracy``, ``accuracy/<type>``, ``n``, ``n/<type>``, ``auroc_yes_no`` (and ``auroc_yes_no/<type>``),
    ``n_yes_no_scored``. AUROC is None where the scored yes/no items hold only one gold class."""
    if not items:
        raise ValueError("vqa_metrics: no items to score")
    correct: dict[str, list[bool]] = defaultdict(list)
    yn: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for i, it in enumerate(items):
        for key in ("answer", "predicted"):
            if key not in it:
                raise ValueError(f"vqa_metrics: item {i} has no '{key}' (each item needs type, answer, predicted)")
        t = str(it.get("type") or "unknown")
        correct[t].append(normalize_answer(it["predicted"]) == normalize_answer(it["answer"]))
        if _is_yes_no(it):
            p = _p_yes(it)
            if p is not None:
                yn[t].append((p, int(normalize_answer(it["answer"]) == YES)))
    all_correct = [c for v in correct.values() for c in v]
    out: dict[str, Any] = {"accuracy": float(np.mean(all_correct)), "n": len(all_correct)}
    for t in sorted(correct):
        out[f"accuracy/{t}"] = float(np.mean(correct[t]))
        out[f"n/{t}"] = len(correct[t])
    all_yn = [p for v in yn.values() for p in v]
    out["auroc_yes_no"] = _auroc(all_yn)
    out["n_yes_no_scored"] = len(all_yn)
    for t in sorted(yn):
        out[f"auroc_yes_no/{t}"] = _auroc(yn[t])
    return out


def _majority(counts: Counter, candidates: Sequence[str] | None = None) -> str | None:
    """Most frequent normalised answer (among ``candidates`` when given); ties broken alphabetically."""
    pool = list(candidates) if candidates is not None else list(counts)
    if not pool:
        return None
    return min(pool, key=lambda a: (-counts.get(a, 0), a))


def majority_baseline(train_items: Sequence[Mapping[str, Any]], test_items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The majority answer per question type, learned on ``train_items``, applied to ``test_items``.

    Returns copies of the test items with ``predicted`` and ``probabilities`` filled in, ready for
    :func:`vqa_metrics`. Ties are broken alphabetically. For an item with ``choices`` the prediction is the most
    frequent training answer (of its type) among its choices, and ``probabilities`` are the training frequencies
    of those choices renormalised over them (uniform when none was seen), so AUROC works for the baseline too.
    Open items get the type's majority answer and no probabilities. A type unseen in training falls back to the
    counts over all types.
    """
    if not train_items:
        raise ValueError("majority_baseline: no training items")
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    surface: dict[str, str] = {}  # normalised -> first spelling seen, so predictions read like answers
    for it in train_items:
        a = normalize_answer(it.get("answer"))
        surface.setdefault(a, str(it.get("answer")).strip())
        by_type[str(it.get("type") or "unknown")][a] += 1
        overall[a] += 1
    out = []
    for it in test_items:
        t = str(it.get("type") or "unknown")
        counts = by_type.get(t)
        if counts is None:
            log.debug("question type %s unseen in training: majority over all types", t)
            counts = overall
        choices = list(it.get("choices") or [])
        pred = dict(it)
        if choices:
            norm = [normalize_answer(c) for c in choices]
            best = _majority(counts, sorted(set(norm)))
            pred["predicted"] = choices[norm.index(best)]
            freq = np.array([counts.get(n, 0) for n in norm], dtype=np.float64)
            freq = freq / freq.sum() if freq.sum() > 0 else np.full(len(norm), 1.0 / len(norm))
            pred["probabilities"] = {c: float(p) for c, p in zip(choices, freq)}
        else:
            best = _majority(counts)
            pred["predicted"] = surface.get(best, best) if best is not None else ""
            pred["probabilities"] = None
        out.append(pred)
    return out
