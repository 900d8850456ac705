"""Cardiomegaly: an enlarged cardiothoracic ratio (CTR), drawn as a wider heart outline.

Unlike the other findings it has no density layer of its own: its ``ctr`` replaces the anatomy's in
:func:`mavilt.data.synthetic.anatomy.heart_geometry`, so the renderer's normal heart is the enlarged one. The
report's heart and mediastinum sentences (normal ones too) are written here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.labels import NEGATIVE, POSITIVE, UNCERTAIN
from mavilt.data.synthetic.anatomy import heart_geometry, heart_r, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Finding, FindingKind
from mavilt.data.synthetic.wording import Sentence, Wording, cap

if TYPE_CHECKING:
    import random

    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case

# CTR ranges on PA (before AP magnification): uncertain ("borderline") / cardiomegaly; normal is in anatomy.
CTR_UNCERTAIN = (0.50, 0.54)
CTR_ENLARGED = (0.56, 0.70)


class Cardiomegaly(FindingKind):
    name = "cardiomegaly"
    observation = "Cardiomegaly"
    plain_name = "cardiomegaly"
    presence_np = "cardiomegaly"
    prevalence = 0.16

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        f.params["ctr"] = uniform(rng, *(CTR_ENLARGED if f.certainty == PRESENT else CTR_UNCERTAIN))

    def effect(self, ctx: RenderContext, f: Finding) -> None:
        return None  # drawn as the heart's own size

    def support(self, ctx: RenderContext, f: Finding) -> np.ndarray:
        """The band between the normal heart outline and the enlarged one."""
        g_enl = heart_geometry(ctx.case, True)
        g_norm = heart_geometry(ctx.case, False)
        r_enl = heart_r(g_enl, ctx.x, ctx.y)
        r_norm = heart_r(g_norm, ctx.x, ctx.y)
        return (r_enl < 1.0 + ctx.e / g_enl[2]) & (r_norm > 1.0 - ctx.e / g_norm[2])

    def heart_sentences(self, case: Case, w: Wording, st: random.Random) -> list[Sentence]:
        """The findings section's heart and mediastinum sentences; ``st`` draws what is said."""
        f = case.finding(self.name)
        mediastinum = Sentence(
            w.choice(["The mediastinal contours are normal.", "Mediastinal contours are within normal limits.",
                      "The mediastinum is not widened.", "Normal mediastinal contours.",
                      "The mediastinal contours are unremarkable."]),
            {"Enlarged Cardiomediastinum": NEGATIVE},
        )
        if f is None:
            if st.random() < 0.5:
                return [Sentence(w.choice(["Heart size and mediastinal contours are normal.",
                                           "Normal heart size and mediastinal contours.",
                                           "The heart size and mediastinal contours are within normal limits."]),
                                 {"Cardiomegaly": NEGATIVE, "Enlarged Cardiomediastinum": NEGATIVE})]
            options = ["Heart size is normal.", "The heart is normal in size.", "Normal heart size.",
                       "No cardiomegaly.", "The heart is not enlarged."]
            if case.view == "AP":
                options.append("Heart size is within normal limits given AP technique.")
            return [Sentence(w.choice(options), {"Cardiomegaly": NEGATIVE}), mediastinum]
        if f.certainty == PRESENT:
            sev = "moderate" if f.params["ctr"] >= 0.62 else "mild"
            text = w.choice([f"The heart is {sev}ly enlarged.", f"{cap(sev)} cardiomegaly.",
                             f"The cardiac silhouette is {sev}ly enlarged.", "Enlarged cardiac silhouette.",
                             f"There is {sev} cardiomegaly.", "Cardiomegaly."])
            return [Sentence(text, {"Cardiomegaly": POSITIVE}), mediastinum]
        options = ["Possible mild cardiomegaly.", "The cardiac silhouette may be mildly enlarged.",
                   "Heart size is borderline; mild cardiomegaly cannot be excluded."]
        if case.view == "AP":
            options.append("The cardiac silhouette may be mildly enlarged, although this is accentuated by AP technique.")
        return [Sentence(w.choice(options), {"Cardiomegaly": UNCERTAIN}), mediastinum]

    def impression(self, f: Finding, w: Wording) -> list[Sentence]:
        if f.certainty == PRESENT:
            return [Sentence(w.choice(["Cardiomegaly.", "Enlarged cardiac silhouette."]), {"Cardiomegaly": POSITIVE})]
        return [Sentence(w.choice(["Possible mild cardiomegaly.", "Mild cardiomegaly cannot be excluded."]),
                         {"Cardiomegaly": UNCERTAIN})]


CARDIOMEGALY = Cardiomegaly()
