"""Support devices: an endotracheal tube, a central venous catheter and an enteric tube, drawn as bright
polylines. Never hedged, and far more common on portable AP studies (the sick patients)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.labels import POSITIVE
from mavilt.data.synthetic.anatomy import cm, pick, uniform
from mavilt.data.synthetic.canvas import draw_segments
from mavilt.data.synthetic.findings.base import Effect, Finding, FindingKind
from mavilt.data.synthetic.wording import Sentence, Wording, cap

if TYPE_CHECKING:
    import random

    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case

PREVALENCE_BY_VIEW: dict[str, float] = {"AP": 0.45, "PA": 0.05}


def _polyline(points: Sequence[tuple[float, float]], sigma: float, amp: float) -> list[tuple[float, ...]]:
    return [(*points[i], *points[i + 1], sigma, amp) for i in range(len(points) - 1)]


class Devices(FindingKind):
    name = "devices"
    observation = "Support Devices"
    plain_name = "support devices"
    hedgeable = False

    def chance(self, view: str) -> float:
        return PREVALENCE_BY_VIEW[view]

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        """Which devices; ``params`` gets their ``segments`` (x0, y0, x1, y1, sigma, amp) and what the report
        says about them."""
        an = case.anatomy
        params = f.params
        kinds = [k for k, p in (("ett", 0.6), ("cvc", 0.7), ("ng", 0.45)) if rng.random() < p] or ["cvc"]
        unit = cm(an)
        mid = an.midline
        segs: list[tuple[float, ...]] = []
        if "ett" in kinds:
            above = uniform(rng, 2.5, 6.0)  # cm above the carina
            tip = an.carina_y - above * unit
            xs = mid + uniform(rng, -0.006, 0.006)
            segs += _polyline([(xs + 0.004, -0.05), (xs, 0.1), (xs, tip)], 0.0065, 0.5)
            params["ett_cm"] = round(above, 1)
        if "cvc" in kinds:
            route = pick(rng, ("right_ij", "left_ij", "right_subclavian", "left_subclavian"), (0.5, 0.15, 0.2, 0.15))
            tip_y = an.carina_y + uniform(rng, 0.0, 0.07)
            tip = (mid - 0.035 + uniform(rng, -0.008, 0.008), tip_y)
            side = -1.0 if route.startswith("right") else 1.0
            if route.endswith("ij"):
                pts = [(mid + side * 0.1, -0.05), (mid + side * 0.08, 0.12), (mid + side * 0.05, an.carina_y - 0.12),
                       tip]
            else:
                pts = [(mid + side * 0.34, an.clavicle_y + 0.05), (mid + side * 0.2, an.clavicle_y + 0.015),
                       (mid + side * 0.07, an.carina_y - 0.12), tip]
            segs += _polyline(pts, 0.004, 0.5)
            params["cvc_route"] = route
            params["cvc_tip"] = "cavoatrial junction" if tip_y > an.carina_y + 0.05 else "superior vena cava"
        if "ng" in kinds:
            xs = mid + uniform(rng, 0.0, 0.015)
            stomach = (mid + uniform(rng, 0.12, 0.2), an.dome_left_y + uniform(rng, 0.07, 0.12))
            pts = [(xs - 0.01, -0.05), (xs, 0.3), (xs + 0.01, an.dome_left_y), (stomach[0] - 0.06, stomach[1] - 0.01),
                   stomach]
            segs += _polyline(pts, 0.005, 0.42)
        params["segments"] = tuple(segs)
        f.kinds = tuple(kinds)

    def effect(self, ctx: RenderContext, f: Finding) -> Effect:
        support = np.zeros(ctx.x.shape, bool)
        add = np.zeros(ctx.x.shape, np.float32)
        draw_segments(ctx, f.params["segments"], add, support)
        return Effect(support, add=add * f.strength)

    def device_sentences(self, f: Finding | None, w: Wording) -> list[Sentence]:
        """The findings section's sentences about each device (none without devices)."""
        if f is None:
            return []
        info = f.params
        out = []
        if "ett" in f.kinds:
            d = info["ett_cm"]
            out.append(w.choice([f"An endotracheal tube terminates {d:.1f} cm above the carina.",
                                 f"Endotracheal tube tip is {d:.1f} cm above the carina.",
                                 f"The endotracheal tube is in standard position, approximately {d:.0f} cm above the carina."]))
        if "cvc" in f.kinds:
            route = info["cvc_route"]
            side, vein = route.split("_")
            vein_words = {"ij": ["internal jugular", "IJ"], "subclavian": ["subclavian"]}[vein]
            tip = info["cvc_tip"]
            tip_words = [tip, "SVC"] if tip == "superior vena cava" else [tip]
            v, t = w.choice(vein_words), w.choice(tip_words)
            out.append(w.choice([f"A {side} {v} central venous catheter terminates in the {t}.",
                                 f"{cap(side)} {v} central line with tip in the {t}.",
                                 f"{cap(side)} {v} central venous catheter with tip projecting over the {t}."]))
        if "ng" in f.kinds:
            out.append(w.choice(["An enteric tube courses below the diaphragm with the tip in the stomach.",
                                 "Nasogastric tube tip projects over the stomach.",
                                 "The enteric tube extends below the diaphragm, tip in the gastric fundus."]))
        return [Sentence(t, {self.observation: POSITIVE}) for t in out]

    def impression(self, f: Finding, w: Wording) -> list[Sentence]:
        return [Sentence(w.choice(["Support devices in standard position.", "Lines and tubes in satisfactory position.",
                                   "Tubes and lines as described above."]), {self.observation: POSITIVE})]

    def presence_question(self, w: random.Random) -> str:
        return w.choice(["Are there any support devices?", "Is a tube or line present?", "Are any lines or tubes visible?"])


DEVICES = Devices()
