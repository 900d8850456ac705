"""Atelectasis: thin plate-like (lens-shaped) bands just above the diaphragm at one or both lung bases."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.synthetic.anatomy import heart_geometry, lung_dome_at, pick, sgn, smoothstep, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Wording, cap

if TYPE_CHECKING:
    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case


def _base_phrase(side: str, w: Wording) -> tuple[str, str]:
    """(noun phrase for the base(s) with its article, adjective), e.g. ("the left lung base", "left basilar")."""
    if side == "bilateral":
        return w.once(("base", side), ["both lung bases", "the lung bases bilaterally"]), "bibasilar"
    return w.once(("base", side), [f"the {side} lung base", f"the {side} base"]), f"{side} basilar"


class Atelectasis(FindingKind):
    name = "atelectasis"
    observation = "Atelectasis"
    plain_name = "atelectasis"
    presence_np = "atelectasis"
    prevalence = 0.15
    lateralised = True
    noun = "atelectasis"

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        an = case.anatomy
        f.side = pick(rng, ("right", "left", "bilateral"), (0.35, 0.35, 0.3))
        f.zone = "lower"
        half = an.thorax_width / 2
        hx, _, _, a_r, _ = heart_geometry(case)
        for s in f.sides:
            hl = uniform(rng, 0.07, 0.095)  # half length
            # Lateral to the heart shadow on the left, where the band stays visible.
            lo = 0.45 * half if s == "right" else max(0.45 * half, hx + a_r - an.midline + 0.5 * hl)
            dx = uniform(rng, min(lo, 0.78 * half), 0.8 * half)
            f.params[f"x_{s}"] = an.midline + sgn(s) * dx
            f.params[f"y_{s}"] = lung_dome_at(an, s, dx) - uniform(rng, 0.04, 0.06)
            f.params[f"length_{s}"] = hl
            f.params[f"tilt_{s}"] = uniform(rng, -0.15, 0.15)
        f.params["thickness"] = uniform(rng, 0.016, 0.021)  # half thickness

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        x, y, e = ctx.x, ctx.y, ctx.e
        k = f.strength
        p = f.params
        support = np.zeros(x.shape, bool)
        alpha = np.zeros(x.shape, np.float32)
        ht = p["thickness"]
        for s in f.sides:
            ca, sa = math.cos(p[f"tilt_{s}"]), math.sin(p[f"tilt_{s}"])
            dx, dy = x - p[f"x_{s}"], y - p[f"y_{s}"]
            t = np.abs(dx * ca + dy * sa)
            nrm = np.abs(-dx * sa + dy * ca)
            hl = p[f"length_{s}"]
            lung = ctx.lung(s)
            sup = (nrm < ht + e) & (t < hl + e) & (lung > 0)
            # A thin lens: full thickness in the middle, tapering to the ends.
            hte = ht * np.sqrt(np.clip(1.0 - (t * (1.0 / (hl + e))) ** 2, 0.0, 1.0)) + 0.3 * e
            prof = smoothstep(hte + e, np.maximum(hte - e, 0.25 * hte), nrm)
            alpha += np.where(sup, 0.95 * k * prof * lung, 0.0)
            support |= sup
        return Effect(support, opacity=alpha, hide=alpha, add=0.06 * alpha)

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        base, adj = _base_phrase(f.side, w)
        if f.certainty != PRESENT:
            return w.choice([f"Questionable subsegmental atelectasis at {base}.", f"Possible {adj} atelectasis.",
                             f"Subsegmental atelectasis at {base} cannot be excluded."])
        if impression:
            return f"{cap(adj)} atelectasis."
        return w.choice([f"Plate-like atelectasis at {base}.", f"Linear atelectasis at {base}.",
                         f"{cap(adj)} atelectasis.", f"Subsegmental atelectasis at {base}."])


ATELECTASIS = Atelectasis()
