"""Lung nodule or mass: a round, slightly lobulated opacity of a stated diameter (under 3 cm a nodule, over 3 cm
a mass) in one zone of one lung, placed off the heart."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.synthetic.anatomy import cm, pick, place_in_lung, smoothstep, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Wording, cap, zone_phrase

if TYPE_CHECKING:
    import random

    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case


class Nodule(FindingKind):
    name = "nodule"
    observation = "Lung Lesion"
    plain_name = "lung nodule or mass"
    presence_np = "a lung nodule or mass"
    prevalence = 0.15
    lateralised = True
    noun = "lung lesion"
    size_choices = ("nodule", "mass")
    negations = ("No suspicious pulmonary nodules.", "No pulmonary nodules or masses.")

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        f.side = pick(rng, ("right", "left"), (0.5, 0.5))
        f.zone = pick(rng, ("upper", "middle", "lower"), (0.4, 0.35, 0.25))
        f.size = pick(rng, self.size_choices, (0.6, 0.4)) if f.certainty == PRESENT else "nodule"
        diameter = round(uniform(rng, 2.4, 2.9) if f.size == "nodule" else uniform(rng, 3.2, 5.5), 1)
        r = diameter * cm(case.anatomy) / 2
        x, y = place_in_lung(rng, case, f.side, f.zone, r * 1.1 + 0.01)
        f.params.update(diameter_cm=diameter, x=x, y=y, r=r,
                        lobulation=uniform(rng, 0.0, 0.07 if f.size == "mass" else 0.04),
                        lobes=int(rng.integers(3, 7)), phase=uniform(rng, 0, 2 * math.pi))

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        x, y, e = ctx.x, ctx.y, ctx.e
        k = f.strength
        p = f.params
        dx, dy = x - p["x"], y - p["y"]
        d = np.sqrt(dx * dx + dy * dy)
        r = p["r"]
        rr = r * (1.0 + p["lobulation"] * np.cos(p["lobes"] * np.arctan2(dy, dx) + p["phase"]))
        support = d < r * (1.0 + p["lobulation"]) + e
        prof = smoothstep(rr + e, rr - e, d) * (0.8 + 0.2 * np.sqrt(np.clip(1.0 - (d / rr) ** 2, 0.0, 1.0)))
        prof = np.where(support, prof, 0.0)
        return Effect(support, opacity=0.95 * k * prof, hide=prof * k, add=0.1 * k * prof)

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        d = f"{f.params['diameter_cm']:.1f} cm"
        zone = zone_phrase(f.side, f.zone, w)
        noun = f.size  # "nodule" | "mass"
        if impression:
            if f.certainty != PRESENT:
                return w.choice([f"Possible {d} {zone} {noun}; CT recommended.",
                                 f"Questionable {d} {noun} in the {zone}; consider CT for further evaluation."])
            if noun == "mass":
                return w.choice([f"{d} {zone} mass, concerning for malignancy; CT chest recommended.",
                                 f"{cap(zone)} mass measuring {d}; recommend CT for further evaluation."])
            return w.choice([f"{d} {zone} nodule; recommend CT for further characterization.",
                             f"{cap(zone)} nodule measuring {d}; CT recommended."])
        if f.certainty != PRESENT:
            return w.choice([f"Possible {d} {noun} in the {zone}.", f"A questionable {d} {noun} projects over the {zone}.",
                             f"A {d} {noun} in the {zone} cannot be excluded."])
        if noun == "mass":
            return w.choice([f"There is a {d} mass in the {zone}.", f"A {d} {zone} mass is present.",
                             f"{cap(zone)} mass measuring {d}.", f"A lobulated {d} mass projects over the {zone}."])
        return w.choice([f"There is a {d} nodule in the {zone}.", f"A {d} rounded nodule projects over the {zone}.",
                         f"{cap(zone)} nodule measuring {d}.",
                         f"A well-circumscribed {d} pulmonary nodule is noted in the {zone}."])

    def size_question(self, w: random.Random) -> str:
        return w.choice(["Is the lung lesion a nodule or a mass?", "Is the lesion a nodule (under 3 cm) or a mass?"])


NODULE = Nodule()
