"""The findings, one module each, and their registry.

Each module defines one :class:`~mavilt.data.synthetic.findings.base.FindingKind`: its vocabulary and
prevalence, how it is drawn at random, how it changes the pixels, how the report words it and how VQA asks
about it. :data:`KINDS` lists them in the fixed order in which a case draws them; changing that order changes
every dataset.
"""

from __future__ import annotations

from mavilt.data.synthetic.findings.atelectasis import ATELECTASIS
from mavilt.data.synthetic.findings.base import HEDGED, PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.findings.cardiomegaly import CARDIOMEGALY
from mavilt.data.synthetic.findings.consolidation import CONSOLIDATION
from mavilt.data.synthetic.findings.devices import DEVICES
from mavilt.data.synthetic.findings.edema import EDEMA
from mavilt.data.synthetic.findings.effusion import EFFUSION
from mavilt.data.synthetic.findings.nodule import NODULE
from mavilt.data.synthetic.findings.pneumothorax import PNEUMOTHORAX

KINDS: dict[str, FindingKind] = {
    k.name: k for k in (CARDIOMEGALY, EFFUSION, PNEUMOTHORAX, NODULE, CONSOLIDATION, EDEMA, ATELECTASIS, DEVICES)
}
FINDINGS: tuple[str, ...] = tuple(KINDS)
# Impression order (most urgent first) and the answer to "what is the main abnormality?"; devices are no
# abnormality.
IMPORTANCE: tuple[str, ...] = ("pneumothorax", "effusion", "consolidation", "nodule", "edema", "cardiomegaly",
                               "atelectasis")
FINDING_OBSERVATION: dict[str, str] = {n: k.observation for n, k in KINDS.items()}
PLAIN_NAMES: dict[str, str] = {n: k.plain_name for n, k in KINDS.items()}  # VQA answer words
SIZE_CHOICES: dict[str, list[str]] = {n: list(k.size_choices) for n, k in KINDS.items() if k.size_choices}


def kind(name: str) -> FindingKind:
    """The kind of finding called ``name``."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown finding '{name}'; known findings: {list(FINDINGS)}") from None


__all__ = [
    "ATELECTASIS", "CARDIOMEGALY", "CONSOLIDATION", "DEVICES", "EDEMA", "EFFUSION", "FINDINGS", "FINDING_OBSERVATION",
    "HEDGED", "IMPORTANCE", "KINDS", "NODULE", "PLAIN_NAMES", "PNEUMOTHORAX", "PRESENT", "SIZE_CHOICES", "Effect",
    "Finding", "FindingKind", "kind",
]
