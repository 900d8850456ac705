"""Normal anatomy of one study: its parameters, how they are drawn, and the lung and heart geometry.

Geometry lives in normalised *anatomical* coordinates (x to the image's right, y down, the chest spanning
roughly [0, 1]); radiological convention puts the patient's right on the image's left. The lung and heart
outlines here are shared by the renderer (density layers) and by the findings (placement and drawing), and
so are the small numeric and sampling helpers (``smoothstep``, ``uniform``, ``pick``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # hints only: case.py imports this module
    from mavilt.data.synthetic.case import Case

AP_MAGNIFICATION = 1.08  # AP projection magnifies the (anterior) heart
CHEST_WIDTH_CM = 28.0  # internal thoracic width, fixes the cm scale for nodule sizes and tube positions
CTR_NORMAL = (0.38, 0.47)  # normal cardiothoracic ratio on PA (before AP magnification)


@dataclass
class Anatomy:
    """Normal anatomy and acquisition of one study, in normalised anatomical coordinates."""

    midline: float
    rotation: float  # radians, image = rotate(anatomy)
    scale: float
    body_width: float
    shoulder_y: float
    neck_width: float
    thorax_width: float  # between the lateral lung borders
    apex_y: float
    dome_right_y: float
    dome_left_y: float
    cp_depth: float  # costophrenic sulcus below the dome top
    lung_exponent: float  # superellipse exponent: larger = boxier lungs
    lung_base: float  # lower semi-axis of the lung superellipse
    mediastinum_width: float  # half width of the upper mediastinum
    aortic_knob: float
    carina_y: float
    ctr: float  # normal cardiothoracic ratio (PA); cardiomegaly replaces it
    heart_height: float
    heart_shift: float  # heart centre to the patient's left of the midline
    rib_phase: float
    rib_spacing: float
    rib_curve: float
    clavicle_y: float
    spine_phase: float
    soft_density: float
    lung_air: float
    bone_density: float
    gastric_bubble: float
    contrast: float
    gamma: float
    brightness: float
    noise_level: float
    vessel_seed: int


# ---- numeric and sampling helpers (shared with the findings) -------------------------------------------------


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """0 at e0, 1 at e1 (either order), cubic in between, exactly 0/1 outside: compact support by design."""
    t = np.clip((x - e0) * (1.0 / (e1 - e0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def pick(rng: np.random.Generator, options: Sequence[str], probs: Sequence[float]) -> str:
    """One of ``options`` with (unnormalised) probabilities ``probs``."""
    return str(options[int(rng.choice(len(options), p=np.asarray(probs) / np.sum(probs)))])


def sgn(side: str) -> float:
    """Image x direction of a patient side: the patient's right is on the image's left."""
    return -1.0 if side == "right" else 1.0


def cm(an: Anatomy) -> float:
    """One centimetre in anatomical units."""
    return an.thorax_width / CHEST_WIDTH_CM


# ---- sampling ------------------------------------------------------------------------------------------------


def sample_anatomy(rng: np.random.Generator, view: str) -> Anatomy:
    """The normal anatomy of a study in ``view``; the draws happen in the order written here."""
    u = uniform
    ap = view == "AP"
    apex = u(rng, 0.11, 0.15)
    # AP (supine, portable) studies have lower lung volumes: higher domes.
    dome_r = u(rng, 0.64, 0.70) - (u(rng, 0.015, 0.04) if ap else 0.0)
    return Anatomy(
        midline=u(rng, 0.485, 0.515),
        rotation=u(rng, -0.045, 0.045),
        scale=u(rng, 0.95, 1.04),
        body_width=u(rng, 0.84, 1.04),
        shoulder_y=u(rng, 0.02, 0.07),
        neck_width=u(rng, 0.07, 0.09),
        thorax_width=u(rng, 0.66, 0.74),
        apex_y=apex,
        dome_right_y=dome_r,
        dome_left_y=dome_r + u(rng, 0.012, 0.04),
        cp_depth=u(rng, 0.05, 0.075),
        lung_exponent=u(rng, 2.1, 2.8),
        lung_base=u(rng, 0.1, 0.13),
        mediastinum_width=u(rng, 0.045, 0.058),
        aortic_knob=u(rng, 0.012, 0.028),
        carina_y=apex + u(rng, 0.19, 0.23),
        ctr=u(rng, *CTR_NORMAL),
        heart_height=u(rng, 0.19, 0.23),
        heart_shift=u(rng, 0.015, 0.035),
        rib_phase=u(rng, 0.0, 1.0),
        rib_spacing=u(rng, 0.058, 0.07),
        rib_curve=u(rng, 1.1, 1.5),
        clavicle_y=u(rng, 0.17, 0.21) - (u(rng, 0.01, 0.04) if ap else 0.0),
        spine_phase=u(rng, 0.0, 1.0),
        soft_density=u(rng, 0.4, 0.46),
        lung_air=u(rng, 0.22, 0.26),
        bone_density=u(rng, 0.06, 0.085),
        gastric_bubble=u(rng, 0.4, 1.0) if rng.random() < 0.7 else 0.0,
        contrast=u(rng, 1.25, 1.45),
        gamma=u(rng, 0.85, 1.2),
        brightness=u(rng, 0.02, 0.06),
        noise_level=u(rng, 0.015, 0.035) if ap else u(rng, 0.01, 0.025),
        vessel_seed=int(rng.integers(2**31)),
    )


# ---- lungs ---------------------------------------------------------------------------------------------------


def dome_y(an: Anatomy, side: str) -> float:
    return an.dome_right_y if side == "right" else an.dome_left_y


def lung_dists(an: Anatomy, side: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate signed distances (positive inside) to the three borders of one lung.

    The lung is a superellipse (apex and lateral wall) cut medially by the mediastinum and below by the
    diaphragm dome; the cut with the dome makes a sharp costophrenic angle.
    """
    half = an.thorax_width / 2
    dx = (x - an.midline) * sgn(side)  # lateral distance from the midline
    dome = dome_y(an, side)
    a = 0.55 * half
    p = an.lung_exponent
    ex = np.abs(dx - 0.45 * half) * (1.0 / a)
    dy = y - dome
    b = np.where(dy < 0, dome - an.apex_y, an.lung_base)
    ey = np.abs(dy) / b
    rr = (ex**p + ey**p) ** (1.0 / p)
    d_outer = (1.0 - rr) * a
    # Medial border: the mediastinum, with the aortic knob on the left and a wider lower mediastinum.
    med = an.mediastinum_width + 0.012 * smoothstep(an.carina_y, dome, y)
    if side == "left":
        med = med + an.aortic_knob * np.exp(-(((y - (an.carina_y - 0.05)) / 0.035) ** 2))
    d_medial = dx - med
    dc = 0.5 * half
    d_dome = dome + an.cp_depth * ((dx - dc) * (1.0 / (half - dc))) ** 2 - y
    return d_outer, d_medial, d_dome


def lung_mask(an: Anatomy, side: str, x: np.ndarray, y: np.ndarray, e: float, scale: float = 1.0) -> np.ndarray:
    """Soft (edge width ``e``) mask of one lung; ``scale`` shrinks the distances for a collapsed lung."""
    d1, d2, d3 = lung_dists(an, side, x, y)
    return smoothstep(-e, e, d1 * scale) * smoothstep(-e, e, d2 * scale) * smoothstep(-e, e, d3 * scale)


def lung_dome_at(an: Anatomy, side: str, dx: float) -> float:
    """Height of the diaphragm under one lung at lateral distance ``dx`` from the midline."""
    half = an.thorax_width / 2
    dc = 0.5 * half
    return dome_y(an, side) + an.cp_depth * ((dx - dc) / (half - dc)) ** 2


_RING = np.exp(1j * np.linspace(0.0, 2 * math.pi, 16, endpoint=False))  # 16 points on the unit circle


def _inside_lung(an: Anatomy, side: str, x: float, y: float, margin: float) -> bool:
    """Whether the disc of radius ``margin`` around (x, y) lies inside the lung (checked on its rim)."""
    xs = np.concatenate([[x], x + margin * _RING.real])
    ys = np.concatenate([[y], y + margin * _RING.imag])
    return bool(min(float(d.min()) for d in lung_dists(an, side, xs, ys)) > 0.005)


# ---- heart ---------------------------------------------------------------------------------------------------

HeartGeometry = tuple[float, float, float, float, float]


def heart_geometry(case: Case, with_cardiomegaly: bool = True) -> HeartGeometry:
    """(centre x, centre y, semi-axis to the image left, to the image right, vertical semi-axis).

    Cardiomegaly is drawn as this outline's width: its ``ctr`` replaces the anatomy's. The centre is at the
    heart's widest level, just above the left dome; the lower half hides in the abdomen.
    """
    an = case.anatomy
    cmg = case.finding("cardiomegaly") if with_cardiomegaly else None
    ctr = float(cmg.params["ctr"]) if cmg is not None else an.ctr
    if case.view == "AP":
        ctr *= AP_MAGNIFICATION
    width = ctr * an.thorax_width
    b = an.heart_height * (ctr / an.ctr) ** 0.25
    # Two thirds of the heart lie to the patient's left (image right).
    return an.midline + an.heart_shift, an.dome_left_y - 0.01, 0.36 * width, 0.64 * width, b


def heart_r(geom: HeartGeometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elliptic radius (< 1 inside) of a heart that narrows towards the great vessels at its top."""
    hx, hy, a_l, a_r, b = geom
    dx = x - hx
    dy = (y - hy) * (1.0 / b)
    taper = 0.55 + 0.45 * smoothstep(-1.0, 0.0, dy)
    a = np.where(dx < 0, a_l, a_r) * taper
    return np.sqrt((dx / a) ** 2 + dy * dy)


def heart_alpha(geom: HeartGeometry, x: np.ndarray, y: np.ndarray, e: float) -> np.ndarray:
    """Soft heart mask; its edge width in r units is ``e / geom[2]``, the one cardiomegaly's support uses."""
    d = e / geom[2]
    return smoothstep(1.0 + d, 1.0 - d, heart_r(geom, x, y))


# ---- placing a lesion ----------------------------------------------------------------------------------------


def place_in_lung(rng: np.random.Generator, case: Case, side: str, zone: str, margin: float) -> tuple[float, float]:
    """A point in ``zone`` of one lung with a disc of radius ``margin`` inside the lung and off the heart.

    Findings hidden behind the heart would be invisible; if the heart leaves no room (a large heart and the
    left base), the heart constraint is dropped rather than the zone, so the report stays true.
    """
    an = case.anatomy
    dome = dome_y(an, side)
    h = dome - an.apex_y
    lo, hi = {"upper": (0.12, 0.36), "middle": (0.36, 0.64), "lower": (0.64, 0.95)}[zone]
    heart = heart_geometry(case)
    half = an.thorax_width / 2
    for avoid_heart in (True, False):
        for _ in range(200):
            y = an.apex_y + h * uniform(rng, lo, hi)
            x = an.midline + sgn(side) * uniform(rng, 0.05, half)
            if not _inside_lung(an, side, x, y, margin):
                continue
            if avoid_heart:
                ring_x, ring_y = x + (margin + 0.01) * _RING.real, y + (margin + 0.01) * _RING.imag
                if float(heart_r(heart, np.append(ring_x, x), np.append(ring_y, y)).min()) < 1.05:
                    continue
            return x, y
    return an.midline + sgn(side) * 0.55 * half, an.apex_y + h * (lo + hi) / 2
