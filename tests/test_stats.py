"""Bootstrap confidence intervals and paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from mavilt.eval.stats import CI, bootstrap_ci, paired_bootstrap_diff


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def _accuracy(truth, pred) -> float:  # works on lists and arrays alike
    return sum(t == p for t, p in zip(truth, pred)) / len(truth)


def test_ci_contains_point_and_is_deterministic() -> None:
    x = np.random.default_rng(1).normal(loc=2.0, scale=1.0, size=200)
    ci = bootstrap_ci(_mean, x, n_boot=500, seed=3)
    point, low, high = ci  # unpacks as a tuple
    assert isinstance(ci, CI)
    assert point == pytest.approx(x.mean())
    assert low < point < high
    assert 0.1 < high - low < 0.5  # about 2 * 1.96 / sqrt(200) = 0.28
    assert bootstrap_ci(_mean, x, n_boot=500, seed=3) == ci
    assert bootstrap_ci(_mean, x, n_boot=500, seed=4) != ci


def test_ci_shrinks_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap_ci(_mean, rng.normal(size=50), n_boot=400)
    large = bootstrap_ci(_mean, rng.normal(size=2000), n_boot=400)
    assert (large.high - large.low) < 0.3 * (small.high - small.low)  # width ~ 1/sqrt(n): ratio ~0.16


def test_lists_of_strings_and_several_inputs() -> None:
    truth = ["effusion", "normal", "normal", "edema"] * 25
    pred = ["effusion", "normal", "edema", "edema"] * 25
    point, low, high = bootstrap_ci(_accuracy, truth, pred, n_boot=300)
    assert point == pytest.approx(0.75)
    assert low < 0.75 < high and low > 0.5
    # An NLG metric on resampled corpora.
    from mavilt.eval.nlg import score

    refs = ["the heart is normal in size", "small left pleural effusion", "no pneumothorax"] * 4
    hyps = ["the heart is normal", "small right pleural effusion", "no pneumothorax"] * 4
    ci = bootstrap_ci(lambda r, h: score(r, h, include_meteor=False)["BLEU-1"], refs, hyps, n_boot=30)
    assert ci.low <= ci.point <= ci.high <= 1.0


def test_paired_difference() -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, size=300)
    good = np.where(rng.random(300) < 0.9, truth, 1 - truth)
    bad = np.where(rng.random(300) < 0.6, truth, 1 - truth)
    diff = paired_bootstrap_diff(_accuracy, (truth, good), (truth, bad), n_boot=500)
    assert diff.point == pytest.approx(_accuracy(truth, good) - _accuracy(truth, bad))
    assert diff.low > 0 and diff.excludes_zero  # A ahead beyond the CI
    same = paired_bootstrap_diff(_accuracy, (truth, good), (truth, good.copy()), n_boot=200)
    assert same == (0.0, 0.0, 0.0) and not same.excludes_zero
    # Two systems of equal quality: the CI straddles 0.
    other = np.where(rng.random(300) < 0.9, truth, 1 - truth)
    tie = paired_bootstrap_diff(_accuracy, (truth, good), (truth, other), n_boot=500)
    assert tie.low < 0 < tie.high
    reverse = paired_bootstrap_diff(_accuracy, (truth, bad), (truth, good), n_boot=500)
    assert reverse.high < 0 and reverse.excludes_zero


def test_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ci(_accuracy, [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(_mean, np.array([]))
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci(_mean)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(_mean, np.ones(3), n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(_mean, np.ones(3), alpha=1.5)
    with pytest.raises(TypeError, match="tuples"):
        paired_bootstrap_diff(_mean, np.ones(3), np.ones(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_diff(_accuracy, ([1, 2], [1, 2]), ([1, 2, 3], [1, 2, 3]))
