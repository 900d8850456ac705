"""The embedded default dataset: seeded phantom frontal chest X-rays with reports, CheXpert labels and VQA.

Every image is drawn from a :class:`Case`: anatomy parameters, a view (PA/AP) and a list of :class:`Finding`
specs. ``sample_case(seed, index)`` is a pure function of its arguments, ``render(case, size)`` turns a case
into pixels at any size, and the text side (``write_report``, ``case_labels``, ``case_vqa``) describes the same
case, so images, reports, labels and answers always agree.

Modules:

- :mod:`~mavilt.data.synthetic.anatomy`: normal anatomy, its sampling, lung and heart geometry;
- :mod:`~mavilt.data.synthetic.case`: :class:`Case` and :func:`sample_case` (the order of every draw);
- :mod:`~mavilt.data.synthetic.findings`: one module per finding (its prevalence, sampling, drawing, wording
  and VQA phrases) and the registry;
- :mod:`~mavilt.data.synthetic.canvas` and :mod:`~mavilt.data.synthetic.render`: the pixel grid, the density
  layers and the render loop;
- :mod:`~mavilt.data.synthetic.wording`, :mod:`~mavilt.data.synthetic.report`: report sentences and labels;
- :mod:`~mavilt.data.synthetic.vqa`: questions and answers;
- :mod:`~mavilt.data.synthetic.source`: ``scan``/``convert`` for :mod:`mavilt.data.prepare`, which imports
  this package by name.
"""

from __future__ import annotations

from mavilt.data.synthetic.anatomy import AP_MAGNIFICATION, CTR_NORMAL, Anatomy
from mavilt.data.synthetic.case import Case, sample_case
from mavilt.data.synthetic.findings import (
    FINDING_OBSERVATION,
    FINDINGS,
    HEDGED,
    IMPORTANCE,
    KINDS,
    PLAIN_NAMES,
    PRESENT,
    SIZE_CHOICES,
    Finding,
    FindingKind,
)
from mavilt.data.synthetic.findings.cardiomegaly import CTR_ENLARGED
from mavilt.data.synthetic.render import finding_region, render
from mavilt.data.synthetic.report import case_labels, write_report
from mavilt.data.synthetic.source import assign_splits, case_row, convert, make_rows, scan
from mavilt.data.synthetic.vqa import ABNORMALITY_CHOICES, LATERALITY_CHOICES, case_vqa

__all__ = [
    "ABNORMALITY_CHOICES", "AP_MAGNIFICATION", "CTR_ENLARGED", "CTR_NORMAL", "FINDINGS", "FINDING_OBSERVATION",
    "HEDGED", "IMPORTANCE", "KINDS", "LATERALITY_CHOICES", "PLAIN_NAMES", "PRESENT", "SIZE_CHOICES", "Anatomy",
    "Case", "Finding", "FindingKind", "assign_splits", "case_labels", "case_row", "case_vqa", "convert",
    "finding_region", "make_rows", "render", "sample_case", "scan", "write_report",
]
