"""One study to draw and describe: the :class:`Case`, and :func:`sample_case`, which fixes the order of every
random draw (view, anatomy, then each finding in registry order, then the noise and report seeds)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mavilt.data.synthetic.anatomy import Anatomy, sample_anatomy
from mavilt.data.synthetic.findings import KINDS, Finding

AP_FRACTION = 0.35  # share of portable AP studies; the rest are PA


@dataclass
class Case:
    """Everything needed to render and describe one image."""

    seed: int
    index: int
    view: str  # "PA" | "AP"
    anatomy: Anatomy
    findings: list[Finding]
    noise_seed: int
    report_seed: int

    def finding(self, name: str) -> Finding | None:
        for f in self.findings:
            if f.name == name:
                return f
        return None

    def without(self, name: str) -> Case:
        return dataclasses.replace(self, findings=[f for f in self.findings if f.name != name])


def sample_case(seed: int, index: int) -> Case:
    """The case at ``index`` of the dataset drawn with ``seed``: a pure function of (seed, index)."""
    rng = np.random.default_rng([int(seed), int(index)])
    view = "AP" if rng.random() < AP_FRACTION else "PA"
    anatomy = sample_anatomy(rng, view)
    case = Case(seed=int(seed), index=int(index), view=view, anatomy=anatomy, findings=[], noise_seed=0, report_seed=0)
    for kind in KINDS.values():
        if rng.random() < kind.chance(view):
            # Appended one by one: nodules and consolidation are placed off the (possibly enlarged) heart.
            case.findings.append(kind.sample(rng, case))
    case.noise_seed = int(rng.integers(2**31))
    case.report_seed = int(rng.integers(2**31))
    return case
