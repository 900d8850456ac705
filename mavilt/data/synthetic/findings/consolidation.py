"""Consolidation: a patchy, textured airspace opacity (a few overlapping blobs) in one zone of one lung, placed
off the heart; half of them are said to possibly represent pneumonia."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.labels import UNCERTAIN
from mavilt.data.synthetic.anatomy import pick, place_in_lung, smoothstep, uniform
from mavilt.data.synthetic.findings.base import PRESENT, Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Sentence, Wording, cap, zone_phrase

if TYPE_CHECKING:
    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case


class Consolidation(FindingKind):
    name = "consolidation"
    observation = "Consolidation"
    plain_name = "consolidation"
    presence_np = "consolidation"
    prevalence = 0.16
    lateralised = True
    noun = "consolidation"
    negations = ("No focal consolidation.", "No focal consolidation is seen.")

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        f.side = pick(rng, ("right", "left"), (0.55, 0.45))
        f.zone = pick(rng, ("upper", "middle", "lower"), (0.3, 0.3, 0.4))
        x, y = place_in_lung(rng, case, f.side, f.zone, 0.04)
        lobes = []
        for _ in range(int(rng.integers(3, 6))):
            lobes.append((x + uniform(rng, -0.045, 0.045), y + uniform(rng, -0.04, 0.04), uniform(rng, 0.045, 0.07)))
        f.params.update(x=x, y=y, lobes=tuple(lobes), tex_fx=uniform(rng, 8, 14), tex_fy=uniform(rng, 8, 14),
                        tex_phase=uniform(rng, 0, 2 * math.pi))
        f.params["pneumonia"] = bool(rng.random() < 0.5)

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        x, y = ctx.x, ctx.y
        k = f.strength
        p = f.params
        lung = ctx.lung(f.side)
        blob = np.zeros(x.shape, np.float32)
        for lx, ly, lr in p["lobes"]:
            d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) * (1.0 / lr)
            blob = np.maximum(blob, smoothstep(1.0, 0.45, d))
        support = (blob > 0) & (lung > 0)
        texture = 0.9 + 0.1 * np.cos(2 * math.pi * (p["tex_fx"] * x + p["tex_fy"] * y) + p["tex_phase"])
        alpha = np.where(support, 0.95 * k * blob * texture * lung, 0.0)
        return Effect(support, opacity=alpha, hide=0.8 * alpha, add=0.05 * alpha)

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        zone = zone_phrase(f.side, f.zone, w)
        if f.certainty != PRESENT:
            return w.choice([f"Possible consolidation in the {zone}.",
                             f"Subtle consolidation in the {zone} cannot be excluded.",
                             f"Questionable early consolidation in the {zone}."])
        if impression:
            return w.choice([f"{cap(zone)} consolidation.", f"Consolidation in the {zone}."])
        return w.choice([f"There is consolidation in the {zone}.", f"Focal consolidation is seen in the {zone}.",
                         f"{cap(zone)} airspace consolidation.", f"Patchy consolidation in the {zone}."])

    def impression(self, f: Finding, w: Wording) -> list[Sentence]:
        out = [self.sentence(f, w, impression=True)]
        if f.params.get("pneumonia"):
            out.append(Sentence(w.choice(["This could represent pneumonia.",
                                          "Findings may represent pneumonia in the appropriate clinical setting.",
                                          "Pneumonia cannot be excluded."]), {"Pneumonia": UNCERTAIN}))
        return out


CONSOLIDATION = Consolidation()
