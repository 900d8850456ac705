"""Pneumothorax: air between the chest wall and a lung collapsed towards its medial base, bounded by a thin
bright visceral pleural line."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.synthetic.anatomy import dome_y, lung_mask, pick, sgn, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Wording, cap

if TYPE_CHECKING:
    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case


class Pneumothorax(FindingKind):
    name = "pneumothorax"
    observation = "Pneumothorax"
    plain_name = "pneumothorax"
    presence_np = "a pneumothorax"
    prevalence = 0.15
    lateralised = True
    noun = "pneumothorax"
    size_choices = ("small", "large")
    negations = ("No pneumothorax.", "There is no pneumothorax.")

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        f.side = pick(rng, ("right", "left"), (0.5, 0.5))
        f.size = pick(rng, self.size_choices, (0.6, 0.4)) if f.certainty == PRESENT else "small"
        # The lung collapses towards its medial base: apical and lateral gaps.
        f.params["scale"] = uniform(rng, 0.8, 0.86) if f.size == "small" else uniform(rng, 0.55, 0.68)

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        x, y, e, an = ctx.x, ctx.y, ctx.e, ctx.an
        k = f.strength
        s = f.side
        sc = float(f.params["scale"])
        cx, cy = an.midline + sgn(s) * (an.mediastinum_width + 0.01), dome_y(an, s)
        el = max(e, 0.9 * ctx.px)
        collapsed = lung_mask(an, s, cx + (x - cx) / sc, cy + (y - cy) / sc, el, scale=sc)
        lung = ctx.lung(s)
        space = lung * (1.0 - collapsed)
        support = (lung > 0) & (collapsed < 1)
        line = 4.0 * collapsed * (1.0 - collapsed) * lung  # the visceral pleural line
        return Effect(support, hide=space * k, extra_air=0.13 * k * space, add=0.12 * k * line)

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        side, size = f.side, f.size
        if f.certainty != PRESENT:
            return w.choice([f"Possible small {side} apical pneumothorax.",
                             f"A small {side} apical pneumothorax cannot be excluded.",
                             f"Questionable small {side} pneumothorax."])
        if impression:
            return w.choice([f"{cap(size)} {side} pneumothorax.", f"{cap(size)} {side}-sided pneumothorax."])
        options = [f"There is a {size} {side} pneumothorax.", f"A {size} {side} pneumothorax is present.",
                   f"{cap(size)} {side}-sided pneumothorax with a visible visceral pleural line."]
        if size == "small":
            options.append(f"Small {side} apical pneumothorax.")
        return w.choice(options)


PNEUMOTHORAX = Pneumothorax()
