"""Pleural effusion: fluid at one or both lung bases, its surface climbing the lateral chest wall (meniscus)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.synthetic.anatomy import dome_y, pick, sgn, smoothstep, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Wording, cap

if TYPE_CHECKING:
    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case

# Fluid height above the costophrenic sulcus per size: (medial range, lateral range, i.e. the meniscus).
FLUID_HEIGHT: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "small": ((0.005, 0.02), (0.095, 0.12)),
    "moderate": ((0.09, 0.13), (0.17, 0.21)),
    "large": ((0.2, 0.27), (0.3, 0.37)),
}


class Effusion(FindingKind):
    name = "effusion"
    observation = "Pleural Effusion"
    plain_name = "pleural effusion"
    presence_np = "a pleural effusion"
    prevalence = 0.16
    lateralised = True
    noun = "pleural effusion"
    size_choices = ("small", "moderate", "large")
    negations = ("No pleural effusion.", "There is no pleural effusion.")

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        f.side = pick(rng, ("right", "left", "bilateral"), (0.35, 0.3, 0.35))
        # Hedged effusions are small: a blunted angle that might be fluid.
        f.size = pick(rng, self.size_choices, (0.45, 0.35, 0.2)) if f.certainty == PRESENT else "small"
        med, lat = FLUID_HEIGHT[f.size]
        for s in f.sides:
            f.params[f"medial_{s}"] = uniform(rng, *med)
            f.params[f"lateral_{s}"] = uniform(rng, *lat)

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        x, y, e, an = ctx.x, ctx.y, ctx.e, ctx.an
        k = f.strength
        support = np.zeros(x.shape, bool)
        opacity = np.zeros(x.shape, np.float32)
        half = an.thorax_width / 2
        for s in f.sides:
            y_cp = dome_y(an, s) + an.cp_depth
            u = np.clip(((x - an.midline) * sgn(s) - an.mediastinum_width) / (half - an.mediastinum_width), 0.0, 1.0)
            med, lat = f.params[f"medial_{s}"], f.params[f"lateral_{s}"]
            y_f = y_cp - med - (lat - med) * u**2  # fluid surface, climbing the lateral wall (meniscus)
            lung = ctx.lung(s)
            sup = (y > y_f - e) & (lung > 0)
            opacity += np.where(sup, 0.95 * k * smoothstep(y_f - e, y_f + e + 0.012, y) * lung, 0.0)
            support |= sup
        return Effect(support, opacity=opacity, hide=opacity, add=0.03 * opacity)

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        side, size = f.side, f.size
        bil = side == "bilateral"
        eff = "pleural effusions" if bil else "pleural effusion"
        angle = "costophrenic angles" if bil else "costophrenic angle"
        side_w = "bilateral" if bil else side
        if f.certainty != PRESENT:
            return w.choice([f"Possible small {side_w} {eff}.",
                             f"Blunting of the {side_w} {angle} may represent small {eff}." if bil else
                             f"Blunting of the {side} {angle} may represent a small {eff}.",
                             f"Small {side_w} {eff} cannot be excluded."])
        if impression:
            return f"{cap(size)} {side_w} {eff}."
        if bil:
            return w.choice([f"There are {size} bilateral {eff}.", f"{cap(size)} bilateral {eff}.",
                             f"{cap(size)} bilateral {eff} with blunting of the {angle}."])
        return w.choice([f"There is a {size} {side} {eff}.", f"{cap(size)} {side} {eff}.",
                         f"{cap(size)} {side} {eff} with blunting of the {angle}.", f"A {size} {side} {eff} is present."])


EFFUSION = Effusion()
