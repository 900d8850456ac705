"""Pixels of a case: the normal anatomy's density layers (body, bones, ribs, airways, vessels, lungs, heart),
each finding's effect on them, tone mapping and noise.

Density layers compose pointwise; noise comes from its own generator (``noise_seed``) and is added
pointwise. Each finding's geometry is drawn at sample time and its effect is exactly zero outside its
support, so rendering a case with and without one finding changes only the pixels inside
:func:`finding_region` (tests rely on this).
"""

from __future__ import annotations

import math

import numpy as np

from mavilt.data.synthetic.anatomy import (
    Anatomy,
    heart_alpha,
    heart_geometry,
    lung_dists,
    lung_dome_at,
    sgn,
    smoothstep,
)
from mavilt.data.synthetic.canvas import RenderContext, draw_segments, pixel_centres
from mavilt.data.synthetic.case import Case
from mavilt.data.synthetic.findings import kind


def _vessel_segments(an: Anatomy) -> list[tuple[float, ...]]:
    """Branching pulmonary vessels from each hilum (anatomy, so drawn from the anatomy's own seed)."""
    rng = np.random.default_rng(an.vessel_seed)
    segs: list[tuple[float, ...]] = []
    half = an.thorax_width / 2
    for side in ("right", "left"):
        s = sgn(side)
        hx, hy = an.midline + s * (an.mediastinum_width + 0.03), an.carina_y + 0.07
        for k in range(7):
            # Angles from straight up (-) through lateral (0) to down (+), in the lateral half plane.
            ang = -1.25 + 2.35 * (k + rng.uniform(0.15, 0.85)) / 7
            x0 = hx + s * math.cos(ang) * 0.03 + rng.uniform(-0.01, 0.01)
            y0 = hy + math.sin(ang) * 0.03 + rng.uniform(-0.01, 0.01)
            length = rng.uniform(0.4, 0.65) * half
            x1, y1 = x0 + s * math.cos(ang) * length, y0 + math.sin(ang) * length
            segs.append((x0, y0, x1, y1, 0.0045, 0.05))
            for _ in range(2):
                a2 = ang + rng.uniform(-0.6, 0.6)
                t = rng.uniform(0.5, 1.0)
                bx, by = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
                l2 = length * rng.uniform(0.3, 0.5)
                segs.append((bx, by, bx + s * math.cos(a2) * l2, by + math.sin(a2) * l2, 0.003, 0.035))
    return segs


def _anatomy_density(ctx: RenderContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(density without lung air, lung air, lung markings) of the normal anatomy (heart from the case)."""
    an, x, y, e = ctx.an, ctx.x, ctx.y, ctx.e
    dx = x - an.midline
    dxa = np.abs(dx)
    half = an.thorax_width / 2
    # Body: neck plus a torso whose shoulders slope down laterally; thicker (denser) in the middle.
    hw = 0.5 * an.body_width
    top = an.shoulder_y + 0.2 * np.clip((dxa - an.neck_width) * (1.0 / (hw - an.neck_width)), 0.0, 1.0) ** 1.5
    torso = smoothstep(top - e, top + e, y) * smoothstep(hw + e, hw - e, dxa)
    neck = smoothstep(an.neck_width + e, an.neck_width - e, dxa)
    body = np.maximum(torso, neck)
    thick = np.sqrt(np.clip(1.0 - (dxa * (1.0 / hw)) ** 2, 0.0, 1.0))
    dens = an.soft_density * body * (0.3 + 0.7 * thick) * (0.7 + 0.3 * torso)
    # Abdomen below the domes (liver, spleen) and the gastric bubble under the left dome.
    lung_r, lung_l = ctx.lung("right"), ctx.lung("left")
    dome = np.where(dx < 0, lung_dome_at(an, "right", -dx), lung_dome_at(an, "left", dx))
    below = smoothstep(dome - e, dome + 0.03, y) * body
    dens = dens + 0.08 * below
    if an.gastric_bubble > 0:
        gb = ((x - an.midline - 0.15) / 0.05) ** 2 + ((y - an.dome_left_y - 0.045) / 0.025) ** 2
        dens = dens - 0.1 * an.gastric_bubble * smoothstep(1.0, 0.6, gb) * below
    # Spine (faint, with darker disc spaces) behind the mediastinum; clavicles; ribs over the thorax.
    disc = (0.5 + 0.5 * np.cos(2 * math.pi * (y * (1.0 / 0.048) - an.spine_phase))) ** 6
    spine_fade = smoothstep(an.apex_y - 0.1, an.apex_y, y) * (1.0 - 0.5 * below)
    dens = dens + 0.9 * an.bone_density * smoothstep(0.036, 0.026, dxa) * (1.0 - 0.5 * disc) * spine_fade * body
    t = (dxa - 0.025) * (1.0 / 0.275)
    yc = an.clavicle_y - 0.06 * t + 0.012 * np.sin(math.pi * np.clip(t, 0, 1))
    clav = smoothstep(0.013 + e, max(0.013 - e, 0.004), np.abs(y - yc)) * smoothstep(0.012, 0.035, dxa)
    dens = dens + 1.6 * an.bone_density * clav * smoothstep(0.33, 0.29, dxa) * body
    rib_mask = (smoothstep(half + 0.05, half + 0.01, dxa) * smoothstep(an.apex_y - 0.07, an.apex_y - 0.03, y)
                * smoothstep(dome + 0.05, dome - 0.01, y) * smoothstep(0.025, 0.05, dxa))
    dens = dens + an.bone_density * _ribs(ctx, dxa) * rib_mask
    # Trachea and main bronchi (air, darker) and the hilar vessels.
    air_tubes = np.zeros(x.shape, np.float32)
    cy = an.carina_y
    draw_segments(ctx, [(an.midline, 0.0, an.midline, cy, 0.01, 0.1),
                        (an.midline, cy, an.midline - 0.05, cy + 0.05, 0.007, 0.06),
                        (an.midline, cy, an.midline + 0.055, cy + 0.045, 0.007, 0.06)], air_tubes)
    dens = dens - air_tubes * body
    for s in (-1.0, 1.0):
        hx, hy = an.midline + s * (an.mediastinum_width + 0.025), cy + 0.07
        dens = dens + 0.06 * np.exp(-(((x - hx) * 1.4) ** 2 + ((y - hy) * 0.8) ** 2) * (1.0 / (2 * 0.03**2)))
    # Lungs: air, less of it towards the periphery; vessels only inside the lungs.
    d1r, _, _ = lung_dists(an, "right", x, y)
    d1l, _, _ = lung_dists(an, "left", x, y)
    depth = smoothstep(0.0, 0.07, np.where(dx < 0, d1r, d1l))
    lungs = lung_r + lung_l
    air = an.lung_air * lungs * (0.75 + 0.25 * depth)
    marks = np.zeros(x.shape, np.float32)
    draw_segments(ctx, _vessel_segments(an), marks)
    marks = marks * lungs
    # Heart (enlarged by cardiomegaly): displaces lung air and adds a little density above the diaphragm.
    heart = heart_alpha(heart_geometry(ctx.case), x, y, e)
    air = air * (1.0 - 0.92 * heart)
    dens = dens + 0.05 * heart * (1.0 - below)
    return dens, air, marks


def _ribs(ctx: RenderContext, dxa: np.ndarray) -> np.ndarray:
    """Posterior ribs as curved bands with bright cortices (rib index as a function of position), plus faint
    anterior ribs sloping the other way."""
    an, y, e = ctx.an, ctx.y, ctx.e
    rel = dxa * (1.0 / (an.thorax_width / 2))
    q = (-0.05 * rel + an.rib_curve * 0.1 * rel**2.5)  # posterior ribs rise slightly, then fall laterally
    s = y - q - (an.apex_y - 0.07) - an.rib_phase * an.rib_spacing
    n = (s - 0.3 * s * s) * (1.0 / an.rib_spacing)  # spacing widens caudally
    f = n - np.floor(n)
    w = min(0.2, e / an.rib_spacing)
    band = smoothstep(0.0, w, f) * smoothstep(0.42, 0.42 - w, f)
    cortex = (2.0 * f / 0.42 - 1.0) ** 2
    post = band * (0.6 + 0.6 * np.minimum(cortex, 1.0))
    s2 = y + 0.35 * dxa - an.rib_phase * 0.03
    n2 = s2 * (1.0 / 0.075)
    f2 = n2 - np.floor(n2)
    w2 = min(0.2, e / 0.075)
    ant = smoothstep(0.0, w2, f2) * smoothstep(0.3, 0.3 - w2, f2) * smoothstep(0.08, 0.2, dxa)
    return post + 0.3 * ant


def _noise(case: Case, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(multiplicative exposure field, unit Gaussian noise): from ``noise_seed`` only, never from findings."""
    rng = np.random.default_rng(case.noise_seed)
    a = rng.normal(0.0, 1.0, 6)
    u, v = pixel_centres(size)
    field_ = 1.0 + 0.04 * (a[0] * (u - 0.5) + a[1] * (v - 0.5)) + 0.02 * np.cos(
        2 * math.pi * (a[2] * 0.6 * u + a[3] * 0.6 * v) + a[4])
    grain = rng.standard_normal((size, size), dtype=np.float32)
    return field_.astype(np.float32), grain


def render(case: Case, size: int) -> np.ndarray:
    """Render ``case`` as a float32 [size, size] image in [0, 1] (white = dense, black = air outside the body)."""
    ctx = RenderContext(case, size)
    an = case.anatomy
    dens, air, marks = _anatomy_density(ctx)
    clear = np.ones_like(dens)  # fraction of lung air left
    shown = np.ones_like(dens)  # fraction of lung markings left
    extra_air = np.zeros_like(dens)
    add = np.zeros_like(dens)
    boost = np.ones_like(dens)
    for f in case.findings:
        eff = kind(f.name).effect(ctx, f)
        if eff is None:
            continue  # it changed the anatomy (cardiomegaly: the heart's size)
        if eff.opacity is not None:
            clear *= 1.0 - np.clip(eff.opacity, 0.0, 1.0)
        if eff.hide is not None:
            shown *= 1.0 - np.clip(eff.hide, 0.0, 1.0)
        if eff.extra_air is not None:
            extra_air += eff.extra_air
        if eff.add is not None:
            add += eff.add
        if eff.boost is not None:
            boost *= 1.0 + eff.boost
    d = dens - air * clear - extra_air + marks * shown * boost + add
    img = np.clip(an.brightness + an.contrast * d, 0.0, 1.0) ** an.gamma
    field_, grain = _noise(case, size)
    img = img * field_
    img = img + an.noise_level * np.sqrt(img + 0.01) * grain
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def finding_region(case: Case, finding_name: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of where ``finding_name`` may change pixels, dilated by two pixels."""
    from scipy.ndimage import binary_dilation

    f = case.finding(finding_name)
    if f is None:
        raise ValueError(f"case {case.index} has no finding '{finding_name}'; it has {[g.name for g in case.findings]}")
    return binary_dilation(kind(f.name).support(RenderContext(case, size), f), structure=np.ones((3, 3), bool),
                           iterations=2)
