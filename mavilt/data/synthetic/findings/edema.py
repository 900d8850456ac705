"""Pulmonary edema: bilateral perihilar haziness with congested (brighter) vessels, mild or moderate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.synthetic.anatomy import sgn, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Wording, cap

if TYPE_CHECKING:
    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case


class Edema(FindingKind):
    name = "edema"
    observation = "Edema"
    plain_name = "pulmonary edema"
    presence_np = "pulmonary edema"
    prevalence = 0.15
    negations = ("No pulmonary edema.", "No evidence of pulmonary edema.")

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        f.side = "bilateral"  # always both lungs, hence no laterality question
        f.params.update(rx=uniform(rng, 0.16, 0.2), ry=uniform(rng, 0.2, 0.26), density=uniform(rng, 0.6, 0.8),
                        severity="moderate" if rng.random() < 0.5 else "mild")

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        x, y, an = ctx.x, ctx.y, ctx.an
        k = f.strength
        p = f.params
        support = np.zeros(x.shape, bool)
        kern = np.zeros(x.shape, np.float32)
        for s in ("right", "left"):
            hx, hy = an.midline + sgn(s) * (an.mediastinum_width + 0.04), an.carina_y + 0.08
            d2 = ((x - hx) / p["rx"]) ** 2 + ((y - hy) / p["ry"]) ** 2
            lung = ctx.lung(s)
            sup = (d2 < 1) & (lung > 0)
            kern += np.where(sup, (1.0 - np.minimum(d2, 1.0)) ** 1.5 * lung, 0.0)
            support |= sup
        alpha = p["density"] * k * kern
        return Effect(support, opacity=alpha, hide=0.5 * alpha, boost=0.8 * k * kern)

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        sev = f.params["severity"]
        if f.certainty != PRESENT:
            return w.choice(["Possible mild pulmonary edema.", "Findings may represent early pulmonary edema.",
                             "Mild interstitial pulmonary edema cannot be excluded."])
        if impression:
            return w.choice([f"{cap(sev)} pulmonary edema.", "Findings consistent with pulmonary edema."])
        return w.choice(["Perihilar haziness and vascular congestion consistent with pulmonary edema.",
                         f"There is {sev} pulmonary edema.",
                         "Bilateral perihilar opacities compatible with pulmonary edema.",
                         f"{cap(sev)} interstitial and perihilar edema."])


EDEMA = Edema()
