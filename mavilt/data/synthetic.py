"""The embedded default dataset: seeded phantom frontal chest X-rays with reports, CheXpert labels and VQA.

Every image is drawn from a :class:`Case`: anatomy parameters, a view (PA/AP) and a list of :class:`Finding`
specs. ``sample_case(seed, index)`` is a pure function of its arguments, ``render(case, size)`` turns a case
into pixels at any size, and the text side (``write_report``, ``case_labels``, ``case_vqa``) describes the same
case, so images, reports, labels and answers always agree.

Geometry lives in normalised *anatomical* coordinates (x to the image's right, y down, the chest spanning
roughly [0, 1]); a per-case rotation/scale maps them to the image, so 512 px is a finer rendering of 64 px.
Radiological convention: the patient's right is on the image's left.

Rendering composes density layers pointwise and tone-maps them; noise comes from its own generator
(``noise_seed``) and is added pointwise. Each finding's geometry is drawn at sample time and its effect is
exactly zero outside its support, so rendering a case with and without one finding changes only the pixels
inside :func:`finding_region` (tests rely on this).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mavilt.data.images import encode_png
from mavilt.data.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Labels, apply_conventions, empty_labels

if TYPE_CHECKING:  # the prepare framework imports this module lazily; avoid a cycle at import time
    from mavilt.data.prepare import PrepareParams, ScanResult

# ---- vocabulary --------------------------------------------------------------------------------------------

FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "effusion",
    "pneumothorax",
    "nodule",
    "consolidation",
    "edema",
    "atelectasis",
    "devices",
)
FINDING_OBSERVATION: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "nodule": "Lung Lesion",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "atelectasis": "Atelectasis",
    "devices": "Support Devices",
}
# Plain words used in VQA questions and answer sets.
PLAIN_NAMES: dict[str, str] = {
    "cardiomegaly": "cardiomegaly",
    "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "nodule": "lung nodule or mass",
    "consolidation": "consolidation",
    "edema": "pulmonary edema",
    "atelectasis": "atelectasis",
    "devices": "support devices",
}
# Impression order (most urgent first) and the answer to "what is the main abnormality?".
IMPORTANCE: tuple[str, ...] = (
    "pneumothorax",
    "effusion",
    "consolidation",
    "nodule",
    "edema",
    "cardiomegaly",
    "atelectasis",
)
ABNORMALITY_CHOICES: list[str] = [PLAIN_NAMES[f] for f in IMPORTANCE] + ["none"]
LATERALITY_CHOICES: list[str] = ["left", "right", "bilateral"]
SIZE_CHOICES: dict[str, list[str]] = {
    "effusion": ["small", "moderate", "large"],
    "pneumothorax": ["small", "large"],
    "nodule": ["nodule", "mass"],
}
LATERALISED: tuple[str, ...] = ("effusion", "pneumothorax", "nodule", "consolidation", "atelectasis")
# Every uncertain statement carries one of these; every negated one starts with or contains a negation cue.
HEDGES: tuple[str, ...] = ("possible", "cannot be excluded", "may represent", "may be", "could represent", "questionable")

PRESENT, HEDGED = "present", "uncertain"  # Finding.certainty values

# Per-study prevalence of each finding (devices depend on the view: portable AP studies are the sick ones).
PREVALENCE: dict[str, float] = {
    "cardiomegaly": 0.16,
    "effusion": 0.16,
    "pneumothorax": 0.15,
    "nodule": 0.15,
    "consolidation": 0.16,
    "edema": 0.15,
    "atelectasis": 0.15,
}
DEVICE_PREVALENCE: dict[str, float] = {"AP": 0.45, "PA": 0.05}
AP_FRACTION = 0.35
UNCERTAIN_FRACTION = 0.2
AP_MAGNIFICATION = 1.08  # AP projection magnifies the (anterior) heart
CHEST_WIDTH_CM = 28.0  # internal thoracic width, fixes the cm scale for nodule sizes and tube positions

# CTR ranges on PA (before AP magnification): normal / uncertain ("borderline") / cardiomegaly.
CTR_NORMAL = (0.38, 0.47)
CTR_UNCERTAIN = (0.50, 0.54)
CTR_ENLARGED = (0.56, 0.70)

# ---- data classes ------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One finding as drawn: what the report says about it and all the geometry the renderer needs.

    ``side`` is the patient's side ("right" is on the image's left). ``params`` holds geometry drawn at
    sample time (never at render time), so removing a finding leaves every other pixel unchanged.
    """

    name: str
    certainty: str = PRESENT  # "present" | "uncertain"
    side: str | None = None  # "right" | "left" | "bilateral"
    size: str | None = None  # effusion small/moderate/large, pneumothorax small/large, nodule nodule/mass
    zone: str | None = None  # "upper" | "middle" | "lower"
    params: dict[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()  # devices: "ett", "cvc", "ng"

    @property
    def strength(self) -> float:
        """Uncertain findings are drawn at half intensity."""
        return 1.0 if self.certainty == PRESENT else 0.5

    @property
    def sides(self) -> tuple[str, ...]:
        if self.side == "bilateral":
            return ("right", "left")
        return (self.side,) if self.side else ()


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


@dataclass
class Case:
    """Everything needed to render and describe one image."""

    seed: int
    index: int
    view: str  # "PA" | "AP"
    anatomy: Anatomy
    findings: list[Finding]
    noise_seed: int
    report_seed: int

    def finding(self, name: str) -> Finding | None:
        for f in self.findings:
            if f.name == name:
                return f
        return None

    def without(self, name: str) -> Case:
        return dataclasses.replace(self, findings=[f for f in self.findings if f.name != name])


# ---- small numeric helpers ---------------------------------------------------------------------------------


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """0 at e0, 1 at e1 (either order), cubic in between, exactly 0/1 outside: compact support by design."""
    t = np.clip((x - e0) * (1.0 / (e1 - e0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sgn(side: str) -> float:
    """Image x direction of a patient side: the patient's right is on the image's left."""
    return -1.0 if side == "right" else 1.0


def _cm(an: Anatomy) -> float:
    return an.thorax_width / CHEST_WIDTH_CM


def _dome_y(an: Anatomy, side: str) -> float:
    return an.dome_right_y if side == "right" else an.dome_left_y


def _lung_dists(an: Anatomy, side: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate signed distances (positive inside) to the three borders of one lung.

    The lung is a superellipse (apex and lateral wall) cut medially by the mediastinum and below by the
    diaphragm dome; the cut with the dome makes a sharp costophrenic angle.
    """
    half = an.thorax_width / 2
    dx = (x - an.midline) * _sgn(side)  # lateral distance from the midline
    dome = _dome_y(an, side)
    a = 0.55 * half
    p = an.lung_exponent
    ex = np.abs(dx - 0.45 * half) * (1.0 / a)
    dy = y - dome
    b = np.where(dy < 0, dome - an.apex_y, an.lung_base)
    ey = np.abs(dy) / b
    rr = (ex**p + ey**p) ** (1.0 / p)
    d_outer = (1.0 - rr) * a
    # Medial border: the mediastinum, with the aortic knob on the left and a wider lower mediastinum.
    med = an.mediastinum_width + 0.012 * _smoothstep(an.carina_y, dome, y)
    if side == "left":
        med = med + an.aortic_knob * np.exp(-(((y - (an.carina_y - 0.05)) / 0.035) ** 2))
    d_medial = dx - med
    dc = 0.5 * half
    d_dome = dome + an.cp_depth * ((dx - dc) * (1.0 / (half - dc))) ** 2 - y
    return d_outer, d_medial, d_dome


def _lung_mask(an: Anatomy, side: str, x: np.ndarray, y: np.ndarray, e: float, scale: float = 1.0) -> np.ndarray:
    d1, d2, d3 = _lung_dists(an, side, x, y)
    return _smoothstep(-e, e, d1 * scale) * _smoothstep(-e, e, d2 * scale) * _smoothstep(-e, e, d3 * scale)


_RING = np.exp(1j * np.linspace(0.0, 2 * math.pi, 16, endpoint=False))


def _inside_lung(an: Anatomy, side: str, x: float, y: float, margin: float) -> bool:
    """Whether the disc of radius ``margin`` around (x, y) lies inside the lung (checked on its rim)."""
    xs = np.concatenate([[x], x + margin * _RING.real])
    ys = np.concatenate([[y], y + margin * _RING.imag])
    return bool(min(float(d.min()) for d in _lung_dists(an, side, xs, ys)) > 0.005)


def _lung_dome_at(an: Anatomy, side: str, dx: float) -> float:
    half = an.thorax_width / 2
    dc = 0.5 * half
    return _dome_y(an, side) + an.cp_depth * ((dx - dc) / (half - dc)) ** 2


def _heart_geometry(case: Case, with_cardiomegaly: bool = True) -> tuple[float, float, float, float, float]:
    """(centre x, centre y, semi-axis to the image left, to the image right, vertical semi-axis).

    The centre is at the heart's widest level, just above the left dome; the lower half hides in the abdomen.
    """
    an = case.anatomy
    cm = case.finding("cardiomegaly") if with_cardiomegaly else None
    ctr = float(cm.params["ctr"]) if cm is not None else an.ctr
    if case.view == "AP":
        ctr *= AP_MAGNIFICATION
    width = ctr * an.thorax_width
    b = an.heart_height * (ctr / an.ctr) ** 0.25
    # Two thirds of the heart lie to the patient's left (image right).
    return an.midline + an.heart_shift, an.dome_left_y - 0.01, 0.36 * width, 0.64 * width, b


def _heart_r(geom: tuple[float, float, float, float, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elliptic radius (< 1 inside) of a heart that narrows towards the great vessels at its top."""
    hx, hy, a_l, a_r, b = geom
    dx = x - hx
    dy = (y - hy) * (1.0 / b)
    taper = 0.55 + 0.45 * _smoothstep(-1.0, 0.0, dy)
    a = np.where(dx < 0, a_l, a_r) * taper
    return np.sqrt((dx / a) ** 2 + dy * dy)


def _heart_alpha(geom: tuple[float, float, float, float, float], x: np.ndarray, y: np.ndarray, e: float) -> np.ndarray:
    d = e / geom[2]  # edge width in r units (the same one _cardiomegaly_support uses)
    return _smoothstep(1.0 + d, 1.0 - d, _heart_r(geom, x, y))


# ---- sampling ----------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sample_anatomy(rng: np.random.Generator, view: str) -> Anatomy:
    ap = view == "AP"
    apex = _u(rng, 0.11, 0.15)
    # AP (supine, portable) studies have lower lung volumes: higher domes.
    dome_r = _u(rng, 0.64, 0.70) - (_u(rng, 0.015, 0.04) if ap else 0.0)
    return Anatomy(
        midline=_u(rng, 0.485, 0.515),
        rotation=_u(rng, -0.045, 0.045),
        scale=_u(rng, 0.95, 1.04),
        body_width=_u(rng, 0.84, 1.04),
        shoulder_y=_u(rng, 0.02, 0.07),
        neck_width=_u(rng, 0.07, 0.09),
        thorax_width=_u(rng, 0.66, 0.74),
        apex_y=apex,
        dome_right_y=dome_r,
        dome_left_y=dome_r + _u(rng, 0.012, 0.04),
        cp_depth=_u(rng, 0.05, 0.075),
        lung_exponent=_u(rng, 2.1, 2.8),
        lung_base=_u(rng, 0.1, 0.13),
        mediastinum_width=_u(rng, 0.045, 0.058),
        aortic_knob=_u(rng, 0.012, 0.028),
        carina_y=apex + _u(rng, 0.19, 0.23),
        ctr=_u(rng, *CTR_NORMAL),
        heart_height=_u(rng, 0.19, 0.23),
        heart_shift=_u(rng, 0.015, 0.035),
        rib_phase=_u(rng, 0.0, 1.0),
        rib_spacing=_u(rng, 0.058, 0.07),
        rib_curve=_u(rng, 1.1, 1.5),
        clavicle_y=_u(rng, 0.17, 0.21) - (_u(rng, 0.01, 0.04) if ap else 0.0),
        spine_phase=_u(rng, 0.0, 1.0),
        soft_density=_u(rng, 0.4, 0.46),
        lung_air=_u(rng, 0.22, 0.26),
        bone_density=_u(rng, 0.06, 0.085),
        gastric_bubble=_u(rng, 0.4, 1.0) if rng.random() < 0.7 else 0.0,
        contrast=_u(rng, 1.25, 1.45),
        gamma=_u(rng, 0.85, 1.2),
        brightness=_u(rng, 0.02, 0.06),
        noise_level=_u(rng, 0.015, 0.035) if ap else _u(rng, 0.01, 0.025),
        vessel_seed=int(rng.integers(2**31)),
    )


def _pick(rng: np.random.Generator, options: Sequence[str], probs: Sequence[float]) -> str:
    return str(options[int(rng.choice(len(options), p=np.asarray(probs) / np.sum(probs)))])


def _place_in_lung(rng: np.random.Generator, case: Case, side: str, zone: str, margin: float) -> tuple[float, float]:
    """A point in ``zone`` of one lung with a disc of radius ``margin`` inside the lung and off the heart.

    Findings hidden behind the heart would be invisible; if the heart leaves no room (a large heart and the
    left base), the heart constraint is dropped rather than the zone, so the report stays true.
    """
    an = case.anatomy
    dome = _dome_y(an, side)
    h = dome - an.apex_y
    lo, hi = {"upper": (0.12, 0.36), "middle": (0.36, 0.64), "lower": (0.64, 0.95)}[zone]
    heart = _heart_geometry(case)
    half = an.thorax_width / 2
    for avoid_heart in (True, False):
        for _ in range(200):
            y = an.apex_y + h * _u(rng, lo, hi)
            x = an.midline + _sgn(side) * _u(rng, 0.05, half)
            if not _inside_lung(an, side, x, y, margin):
                continue
            if avoid_heart:
                ring_x, ring_y = x + (margin + 0.01) * _RING.real, y + (margin + 0.01) * _RING.imag
                if float(_heart_r(heart, np.append(ring_x, x), np.append(ring_y, y)).min()) < 1.05:
                    continue
            return x, y
    return an.midline + _sgn(side) * 0.55 * half, an.apex_y + h * (lo + hi) / 2


def _sample_finding(rng: np.random.Generator, name: str, case: Case) -> Finding:
    an = case.anatomy
    uncertain = name != "devices" and rng.random() < UNCERTAIN_FRACTION
    f = Finding(name=name, certainty=HEDGED if uncertain else PRESENT)
    cm = _cm(an)
    if name == "cardiomegaly":
        f.params["ctr"] = _u(rng, *(CTR_UNCERTAIN if uncertain else CTR_ENLARGED))
    elif name == "effusion":
        f.side = _pick(rng, ("right", "left", "bilateral"), (0.35, 0.3, 0.35))
        f.size = "small" if uncertain else _pick(rng, ("small", "moderate", "large"), (0.45, 0.35, 0.2))
        # Fluid height above the costophrenic sulcus, medially and at the lateral wall (the meniscus).
        med_lat = {"small": ((0.005, 0.02), (0.095, 0.12)), "moderate": ((0.09, 0.13), (0.17, 0.21)),
                   "large": ((0.2, 0.27), (0.3, 0.37))}[f.size]
        for s in f.sides:
            f.params[f"medial_{s}"] = _u(rng, *med_lat[0])
            f.params[f"lateral_{s}"] = _u(rng, *med_lat[1])
    elif name == "pneumothorax":
        f.side = _pick(rng, ("right", "left"), (0.5, 0.5))
        f.size = "small" if uncertain else _pick(rng, ("small", "large"), (0.6, 0.4))
        # The lung collapses towards its medial base: apical and lateral gaps.
        f.params["scale"] = _u(rng, 0.8, 0.86) if f.size == "small" else _u(rng, 0.55, 0.68)
    elif name == "nodule":
        f.side = _pick(rng, ("right", "left"), (0.5, 0.5))
        f.zone = _pick(rng, ("upper", "middle", "lower"), (0.4, 0.35, 0.25))
        f.size = "nodule" if uncertain else _pick(rng, ("nodule", "mass"), (0.6, 0.4))
        diameter = round(_u(rng, 2.4, 2.9) if f.size == "nodule" else _u(rng, 3.2, 5.5), 1)
        r = diameter * cm / 2
        x, y = _place_in_lung(rng, case, f.side, f.zone, r * 1.1 + 0.01)
        f.params.update(diameter_cm=diameter, x=x, y=y, r=r, lobulation=_u(rng, 0.0, 0.07 if f.size == "mass" else 0.04),
                        lobes=int(rng.integers(3, 7)), phase=_u(rng, 0, 2 * math.pi))
    elif name == "consolidation":
        f.side = _pick(rng, ("right", "left"), (0.55, 0.45))
        f.zone = _pick(rng, ("upper", "middle", "lower"), (0.3, 0.3, 0.4))
        x, y = _place_in_lung(rng, case, f.side, f.zone, 0.04)
        lobes = []
        for _ in range(int(rng.integers(3, 6))):
            lobes.append((x + _u(rng, -0.045, 0.045), y + _u(rng, -0.04, 0.04), _u(rng, 0.045, 0.07)))
        f.params.update(x=x, y=y, lobes=tuple(lobes), tex_fx=_u(rng, 8, 14), tex_fy=_u(rng, 8, 14),
                        tex_phase=_u(rng, 0, 2 * math.pi))
        f.params["pneumonia"] = bool(rng.random() < 0.5)
    elif name == "edema":
        f.side = "bilateral"
        f.params.update(rx=_u(rng, 0.16, 0.2), ry=_u(rng, 0.2, 0.26), density=_u(rng, 0.6, 0.8),
                        severity="moderate" if rng.random() < 0.5 else "mild")
    elif name == "atelectasis":
        f.side = _pick(rng, ("right", "left", "bilateral"), (0.35, 0.35, 0.3))
        f.zone = "lower"
        half = an.thorax_width / 2
        hx, _, _, a_r, _ = _heart_geometry(case)
        for s in f.sides:
            hl = _u(rng, 0.07, 0.095)  # half length
            # Lateral to the heart shadow on the left, where the band stays visible.
            lo = 0.45 * half if s == "right" else max(0.45 * half, hx + a_r - an.midline + 0.5 * hl)
            dx = _u(rng, min(lo, 0.78 * half), 0.8 * half)
            f.params[f"x_{s}"] = an.midline + _sgn(s) * dx
            f.params[f"y_{s}"] = _lung_dome_at(an, s, dx) - _u(rng, 0.04, 0.06)
            f.params[f"length_{s}"] = hl
            f.params[f"tilt_{s}"] = _u(rng, -0.15, 0.15)
        f.params["thickness"] = _u(rng, 0.016, 0.021)  # half thickness
    elif name == "devices":
        f.kinds = _sample_devices(rng, case, f.params)
    return f


def _polyline(points: Sequence[tuple[float, float]], sigma: float, amp: float) -> list[tuple[float, ...]]:
    return [(*points[i], *points[i + 1], sigma, amp) for i in range(len(points) - 1)]


def _sample_devices(rng: np.random.Generator, case: Case, params: dict[str, Any]) -> tuple[str, ...]:
    """Endotracheal tube, central venous catheter, enteric tube as bright polylines.

    Fills ``params`` with ``segments`` (x0, y0, x1, y1, sigma, amp) and what the report says about them.
    """
    an = case.anatomy
    kinds = [k for k, p in (("ett", 0.6), ("cvc", 0.7), ("ng", 0.45)) if rng.random() < p] or ["cvc"]
    cm = _cm(an)
    mid = an.midline
    segs: list[tuple[float, ...]] = []
    if "ett" in kinds:
        above = _u(rng, 2.5, 6.0)  # cm above the carina
        tip = an.carina_y - above * cm
        xs = mid + _u(rng, -0.006, 0.006)
        segs += _polyline([(xs + 0.004, -0.05), (xs, 0.1), (xs, tip)], 0.0065, 0.5)
        params["ett_cm"] = round(above, 1)
    if "cvc" in kinds:
        route = _pick(rng, ("right_ij", "left_ij", "right_subclavian", "left_subclavian"), (0.5, 0.15, 0.2, 0.15))
        tip_y = an.carina_y + _u(rng, 0.0, 0.07)
        tip = (mid - 0.035 + _u(rng, -0.008, 0.008), tip_y)
        side = -1.0 if route.startswith("right") else 1.0
        if route.endswith("ij"):
            pts = [(mid + side * 0.1, -0.05), (mid + side * 0.08, 0.12), (mid + side * 0.05, an.carina_y - 0.12), tip]
        else:
            pts = [(mid + side * 0.34, an.clavicle_y + 0.05), (mid + side * 0.2, an.clavicle_y + 0.015),
                   (mid + side * 0.07, an.carina_y - 0.12), tip]
        segs += _polyline(pts, 0.004, 0.5)
        params["cvc_route"] = route
        params["cvc_tip"] = "cavoatrial junction" if tip_y > an.carina_y + 0.05 else "superior vena cava"
    if "ng" in kinds:
        xs = mid + _u(rng, 0.0, 0.015)
        stomach = (mid + _u(rng, 0.12, 0.2), an.dome_left_y + _u(rng, 0.07, 0.12))
        pts = [(xs - 0.01, -0.05), (xs, 0.3), (xs + 0.01, an.dome_left_y), (stomach[0] - 0.06, stomach[1] - 0.01),
               stomach]
        segs += _polyline(pts, 0.005, 0.42)
    params["segments"] = tuple(segs)
    return tuple(kinds)


def sample_case(seed: int, index: int) -> Case:
    """The case at ``index`` of the dataset drawn with ``seed``: a pure function of (seed, index)."""
    rng = np.random.default_rng([int(seed), int(index)])
    view = "AP" if rng.random() < AP_FRACTION else "PA"
    anatomy = _sample_anatomy(rng, view)
    case = Case(seed=int(seed), index=int(index), view=view, anatomy=anatomy, findings=[], noise_seed=0, report_seed=0)
    for name in FINDINGS:
        p = DEVICE_PREVALENCE[view] if name == "devices" else PREVALENCE[name]
        if rng.random() < p:
            # Appended one by one: nodules and consolidation are placed off the (possibly enlarged) heart.
            case.findings.append(_sample_finding(rng, name, case))
    case.noise_seed = int(rng.integers(2**31))
    case.report_seed = int(rng.integers(2**31))
    return case


# ---- rendering ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size)))
    v = np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size)))
    u.flags.writeable = False
    v.flags.writeable = False
    return u, v


class _Ctx:
    """Per-render state: the anatomical coordinates of every pixel and lazily computed shared fields."""

    def __init__(self, case: Case, size: int):
        if not 8 <= size <= 4096:
            raise ValueError(f"image size must be between 8 and 4096 pixels, got {size}")
        self.case, self.an, self.size = case, case.anatomy, size
        an = case.anatomy
        self.cos, self.sin = math.cos(an.rotation), math.sin(an.rotation)
        u, v = _pixel_centres(size)
        du, dv = u - 0.5, v - 0.5
        s = 1.0 / an.scale
        self.x = 0.5 + (self.cos * du + self.sin * dv) * s
        self.y = 0.5 + (-self.sin * du + self.cos * dv) * s
        self.px = 1.0 / (size * an.scale)  # one pixel in anatomical units
        # Anatomical edges are a little soft; at low resolution one pixel of anti-aliasing dominates.
        self.e = max(0.0035, 0.7 * self.px)
        self._lungs: dict[str, np.ndarray] = {}

    def lung(self, side: str) -> np.ndarray:
        if side not in self._lungs:
            self._lungs[side] = _lung_mask(self.an, side, self.x, self.y, self.e)
        return self._lungs[side]

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        """Anatomical point -> (column, row) in pixel-index units."""
        dx, dy = x - 0.5, y - 0.5
        sc = self.an.scale
        u = 0.5 + sc * (self.cos * dx - self.sin * dy)
        v = 0.5 + sc * (self.sin * dx + self.cos * dy)
        return u * self.size - 0.5, v * self.size - 0.5


def _draw_segments(ctx: _Ctx, segs: Sequence[Sequence[float]], out: np.ndarray, support: np.ndarray | None = None) -> None:
    """Add Gaussian-profile line segments (x0, y0, x1, y1, sigma, amp; anatomical units) into ``out``.

    Lines thinner than a pixel are widened and dimmed (same integral) so they do not alias; each segment is
    cut at 3 sigma, so its support is exact.
    """
    n = ctx.size
    scale = ctx.an.scale * n
    for x0, y0, x1, y1, sigma, amp in segs:
        c0, r0 = ctx.to_pixels(x0, y0)
        c1, r1 = ctx.to_pixels(x1, y1)
        sp = sigma * scale
        se = math.sqrt(sp * sp + 0.45**2)
        a = amp * sp / se
        cut = 3.0 * se
        i0, i1 = max(0, int(math.floor(min(r0, r1) - cut))), min(n, int(math.ceil(max(r0, r1) + cut)) + 1)
        j0, j1 = max(0, int(math.floor(min(c0, c1) - cut))), min(n, int(math.ceil(max(c0, c1) + cut)) + 1)
        if i0 >= i1 or j0 >= j1:
            continue
        rows = np.arange(i0, i1, dtype=np.float32)[:, None] - r0
        cols = np.arange(j0, j1, dtype=np.float32)[None, :] - c0
        dc, dr = c1 - c0, r1 - r0
        ll = dc * dc + dr * dr
        t = np.clip((cols * dc + rows * dr) / ll, 0.0, 1.0) if ll > 0 else np.zeros((1, 1), np.float32)
        d2 = (cols - t * dc) ** 2 + (rows - t * dr) ** 2
        inside = d2 < cut * cut
        out[i0:i1, j0:j1] += np.where(inside, a * np.exp(d2 * (-0.5 / (se * se))), 0.0)
        if support is not None:
            support[i0:i1, j0:j1] |= inside


def _vessel_segments(an: Anatomy) -> list[tuple[float, ...]]:
    """Branching pulmonary vessels from each hilum (anatomy, so drawn from the anatomy's own seed)."""
    rng = np.random.default_rng(an.vessel_seed)
    segs: list[tuple[float, ...]] = []
    half = an.thorax_width / 2
    for side in ("right", "left"):
        s = _sgn(side)
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


@dataclass
class _Effect:
    """A finding's pointwise effect; every array is exactly zero (one for factors) outside ``support``."""

    support: np.ndarray
    opacity: np.ndarray | None = None  # fraction of lung air replaced by fluid/tissue
    hide: np.ndarray | None = None  # fraction of lung markings hidden
    extra_air: np.ndarray | None = None  # added lucency (pneumothorax)
    add: np.ndarray | None = None  # added density (nodule, pleural line, tubes)
    boost: np.ndarray | None = None  # relative increase of vascular markings (congestion)


def _effect(ctx: _Ctx, f: Finding) -> _Effect:
    x, y, e, an = ctx.x, ctx.y, ctx.e, ctx.an
    k = f.strength
    if f.name == "effusion":
        support = np.zeros(x.shape, bool)
        opacity = np.zeros(x.shape, np.float32)
        half = an.thorax_width / 2
        for s in f.sides:
            y_cp = _dome_y(an, s) + an.cp_depth
            u = np.clip(((x - an.midline) * _sgn(s) - an.mediastinum_width) / (half - an.mediastinum_width), 0.0, 1.0)
            med, lat = f.params[f"medial_{s}"], f.params[f"lateral_{s}"]
            y_f = y_cp - med - (lat - med) * u**2  # fluid surface, climbing the lateral wall (meniscus)
            lung = ctx.lung(s)
            sup = (y > y_f - e) & (lung > 0)
            opacity += np.where(sup, 0.95 * k * _smoothstep(y_f - e, y_f + e + 0.012, y) * lung, 0.0)
            support |= sup
        return _Effect(support, opacity=opacity, hide=opacity, add=0.03 * opacity)
    if f.name == "pneumothorax":
        s = f.side
        sc = float(f.params["scale"])
        cx, cy = an.midline + _sgn(s) * (an.mediastinum_width + 0.01), _dome_y(an, s)
        el = max(e, 0.9 * ctx.px)
        collapsed = _lung_mask(an, s, cx + (x - cx) / sc, cy + (y - cy) / sc, el, scale=sc)
        lung = ctx.lung(s)
        space = lung * (1.0 - collapsed)
        support = (lung > 0) & (collapsed < 1)
        line = 4.0 * collapsed * (1.0 - collapsed) * lung  # the visceral pleural line
        return _Effect(support, hide=space * k, extra_air=0.13 * k * space, add=0.12 * k * line)
    if f.name == "nodule":
        p = f.params
        dx, dy = x - p["x"], y - p["y"]
        d = np.sqrt(dx * dx + dy * dy)
        r = p["r"]
        rr = r * (1.0 + p["lobulation"] * np.cos(p["lobes"] * np.arctan2(dy, dx) + p["phase"]))
        support = d < r * (1.0 + p["lobulation"]) + e
        prof = _smoothstep(rr + e, rr - e, d) * (0.8 + 0.2 * np.sqrt(np.clip(1.0 - (d / rr) ** 2, 0.0, 1.0)))
        prof = np.where(support, prof, 0.0)
        return _Effect(support, opacity=0.95 * k * prof, hide=prof * k, add=0.1 * k * prof)
    if f.name == "consolidation":
        p = f.params
        lung = ctx.lung(f.side)
        blob = np.zeros(x.shape, np.float32)
        for lx, ly, lr in p["lobes"]:
            d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) * (1.0 / lr)
            blob = np.maximum(blob, _smoothstep(1.0, 0.45, d))
        support = (blob > 0) & (lung > 0)
        texture = 0.9 + 0.1 * np.cos(2 * math.pi * (p["tex_fx"] * x + p["tex_fy"] * y) + p["tex_phase"])
        alpha = np.where(support, 0.95 * k * blob * texture * lung, 0.0)
        return _Effect(support, opacity=alpha, hide=0.8 * alpha, add=0.05 * alpha)
    if f.name == "edema":
        p = f.params
        support = np.zeros(x.shape, bool)
        kern = np.zeros(x.shape, np.float32)
        for s in ("right", "left"):
            hx, hy = an.midline + _sgn(s) * (an.mediastinum_width + 0.04), an.carina_y + 0.08
            d2 = ((x - hx) / p["rx"]) ** 2 + ((y - hy) / p["ry"]) ** 2
            lung = ctx.lung(s)
            sup = (d2 < 1) & (lung > 0)
            kern += np.where(sup, (1.0 - np.minimum(d2, 1.0)) ** 1.5 * lung, 0.0)
            support |= sup
        alpha = p["density"] * k * kern
        return _Effect(support, opacity=alpha, hide=0.5 * alpha, boost=0.8 * k * kern)
    if f.name == "atelectasis":
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
            prof = _smoothstep(hte + e, np.maximum(hte - e, 0.25 * hte), nrm)
            alpha += np.where(sup, 0.95 * k * prof * lung, 0.0)
            support |= sup
        return _Effect(support, opacity=alpha, hide=alpha, add=0.06 * alpha)
    if f.name == "devices":
        support = np.zeros(x.shape, bool)
        add = np.zeros(x.shape, np.float32)
        _draw_segments(ctx, f.params["segments"], add, support)
        return _Effect(support, add=add * k)
    raise ValueError(f"finding '{f.name}' has no renderer; known findings: {list(FINDINGS)}")


def _cardiomegaly_support(ctx: _Ctx) -> np.ndarray:
    """The band between the normal heart outline and the enlarged one."""
    g_enl = _heart_geometry(ctx.case, True)
    g_norm = _heart_geometry(ctx.case, False)
    r_enl = _heart_r(g_enl, ctx.x, ctx.y)
    r_norm = _heart_r(g_norm, ctx.x, ctx.y)
    return (r_enl < 1.0 + ctx.e / g_enl[2]) & (r_norm > 1.0 - ctx.e / g_norm[2])


def _anatomy_density(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(density without lung air, lung air, lung markings) of the normal anatomy (heart from the case)."""
    an, x, y, e = ctx.an, ctx.x, ctx.y, ctx.e
    dx = x - an.midline
    dxa = np.abs(dx)
    half = an.thorax_width / 2
    # Body: neck plus a torso whose shoulders slope down laterally; thicker (denser) in the middle.
    hw = 0.5 * an.body_width
    top = an.shoulder_y + 0.2 * np.clip((dxa - an.neck_width) * (1.0 / (hw - an.neck_width)), 0.0, 1.0) ** 1.5
    torso = _smoothstep(top - e, top + e, y) * _smoothstep(hw + e, hw - e, dxa)
    neck = _smoothstep(an.neck_width + e, an.neck_width - e, dxa)
    body = np.maximum(torso, neck)
    thick = np.sqrt(np.clip(1.0 - (dxa * (1.0 / hw)) ** 2, 0.0, 1.0))
    dens = an.soft_density * body * (0.3 + 0.7 * thick) * (0.7 + 0.3 * torso)
    # Abdomen below the domes (liver, spleen) and the gastric bubble under the left dome.
    lung_r, lung_l = ctx.lung("right"), ctx.lung("left")
    dome = np.where(dx < 0, _lung_dome_at(an, "right", -dx), _lung_dome_at(an, "left", dx))
    below = _smoothstep(dome - e, dome + 0.03, y) * body
    dens = dens + 0.08 * below
    if an.gastric_bubble > 0:
        gb = ((x - an.midline - 0.15) / 0.05) ** 2 + ((y - an.dome_left_y - 0.045) / 0.025) ** 2
        dens = dens - 0.1 * an.gastric_bubble * _smoothstep(1.0, 0.6, gb) * below
    # Spine (faint, with darker disc spaces) behind the mediastinum; clavicles; ribs over the thorax.
    disc = (0.5 + 0.5 * np.cos(2 * math.pi * (y * (1.0 / 0.048) - an.spine_phase))) ** 6
    spine_fade = _smoothstep(an.apex_y - 0.1, an.apex_y, y) * (1.0 - 0.5 * below)
    dens = dens + 0.9 * an.bone_density * _smoothstep(0.036, 0.026, dxa) * (1.0 - 0.5 * disc) * spine_fade * body
    t = (dxa - 0.025) * (1.0 / 0.275)
    yc = an.clavicle_y - 0.06 * t + 0.012 * np.sin(math.pi * np.clip(t, 0, 1))
    clav = _smoothstep(0.013 + e, max(0.013 - e, 0.004), np.abs(y - yc)) * _smoothstep(0.012, 0.035, dxa)
    dens = dens + 1.6 * an.bone_density * clav * _smoothstep(0.33, 0.29, dxa) * body
    rib_mask = (_smoothstep(half + 0.05, half + 0.01, dxa) * _smoothstep(an.apex_y - 0.07, an.apex_y - 0.03, y)
                * _smoothstep(dome + 0.05, dome - 0.01, y) * _smoothstep(0.025, 0.05, dxa))
    dens = dens + an.bone_density * _ribs(ctx, dxa) * rib_mask
    # Trachea and main bronchi (air, darker) and the hilar vessels.
    air_tubes = np.zeros(x.shape, np.float32)
    cy = an.carina_y
    _draw_segments(ctx, [(an.midline, 0.0, an.midline, cy, 0.01, 0.1),
                         (an.midline, cy, an.midline - 0.05, cy + 0.05, 0.007, 0.06),
                         (an.midline, cy, an.midline + 0.055, cy + 0.045, 0.007, 0.06)], air_tubes)
    dens = dens - air_tubes * body
    for s in (-1.0, 1.0):
        hx, hy = an.midline + s * (an.mediastinum_width + 0.025), cy + 0.07
        dens = dens + 0.06 * np.exp(-(((x - hx) * 1.4) ** 2 + ((y - hy) * 0.8) ** 2) * (1.0 / (2 * 0.03**2)))
    # Lungs: air, less of it towards the periphery; vessels only inside the lungs.
    d1r, _, _ = _lung_dists(an, "right", x, y)
    d1l, _, _ = _lung_dists(an, "left", x, y)
    depth = _smoothstep(0.0, 0.07, np.where(dx < 0, d1r, d1l))
    lungs = lung_r + lung_l
    air = an.lung_air * lungs * (0.75 + 0.25 * depth)
    marks = np.zeros(x.shape, np.float32)
    _draw_segments(ctx, _vessel_segments(an), marks)
    marks = marks * lungs
    # Heart: displaces lung air and adds a little density above the diaphragm.
    heart = _heart_alpha(_heart_geometry(ctx.case), x, y, e)
    air = air * (1.0 - 0.92 * heart)
    dens = dens + 0.05 * heart * (1.0 - below)
    return dens, air, marks


def _ribs(ctx: _Ctx, dxa: np.ndarray) -> np.ndarray:
    """Posterior ribs as curved bands with bright cortices (rib index as a function of position), plus faint
    anterior ribs sloping the other way."""
    an, y, e = ctx.an, ctx.y, ctx.e
    rel = dxa * (1.0 / (an.thorax_width / 2))
    q = (-0.05 * rel + an.rib_curve * 0.1 * rel**2.5)  # posterior ribs rise slightly, then fall laterally
    s = y - q - (an.apex_y - 0.07) - an.rib_phase * an.rib_spacing
    n = (s - 0.3 * s * s) * (1.0 / an.rib_spacing)  # spacing widens caudally
    f = n - np.floor(n)
    w = min(0.2, e / an.rib_spacing)
    band = _smoothstep(0.0, w, f) * _smoothstep(0.42, 0.42 - w, f)
    cortex = (2.0 * f / 0.42 - 1.0) ** 2
    post = band * (0.6 + 0.6 * np.minimum(cortex, 1.0))
    s2 = y + 0.35 * dxa - an.rib_phase * 0.03
    n2 = s2 * (1.0 / 0.075)
    f2 = n2 - np.floor(n2)
    w2 = min(0.2, e / 0.075)
    ant = _smoothstep(0.0, w2, f2) * _smoothstep(0.3, 0.3 - w2, f2) * _smoothstep(0.08, 0.2, dxa)
    return post + 0.3 * ant


def _noise(case: Case, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(multiplicative exposure field, unit Gaussian noise): from ``noise_seed`` only, never from findings."""
    rng = np.random.default_rng(case.noise_seed)
    a = rng.normal(0.0, 1.0, 6)
    u, v = _pixel_centres(size)
    field_ = 1.0 + 0.04 * (a[0] * (u - 0.5) + a[1] * (v - 0.5)) + 0.02 * np.cos(
        2 * math.pi * (a[2] * 0.6 * u + a[3] * 0.6 * v) + a[4])
    grain = rng.standard_normal((size, size), dtype=np.float32)
    return field_.astype(np.float32), grain


def render(case: Case, size: int) -> np.ndarray:
    """Render ``case`` as a float32 [size, size] image in [0, 1] (white = dense, black = air outside the body)."""
    ctx = _Ctx(case, size)
    an = case.anatomy
    dens, air, marks = _anatomy_density(ctx)
    clear = np.ones_like(dens)  # fraction of lung air left
    shown = np.ones_like(dens)  # fraction of lung markings left
    extra_air = np.zeros_like(dens)
    add = np.zeros_like(dens)
    boost = np.ones_like(dens)
    for f in case.findings:
        if f.name == "cardiomegaly":
            continue  # drawn as the heart's own size
        eff = _effect(ctx, f)
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
    ctx = _Ctx(case, size)
    support = _cardiomegaly_support(ctx) if f.name == "cardiomegaly" else _effect(ctx, f).support
    return binary_dilation(support, structure=np.ones((3, 3), bool), iterations=2)


# ---- reports -----------------------------------------------------------------------------------------------


@dataclass
class _Sentence:
    text: str
    effects: dict[str, int] = field(default_factory=dict)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


class _Wording(random.Random):
    """Picks paraphrases; remembers location phrases so the findings and the impression name a place alike."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.memo: dict[tuple, Any] = {}

    def once(self, key: tuple, options: Sequence[Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = self.choice(options)
        return self.memo[key]


def _zone_phrase(side: str, zone: str, w: _Wording) -> str:
    options = {
        ("right", "upper"): ["right upper lobe", "right upper zone"],
        ("right", "middle"): ["right middle lobe", "right mid lung zone"],
        ("right", "lower"): ["right lower lobe", "right lung base", "right lower zone"],
        ("left", "upper"): ["left upper lobe", "left upper zone"],
        ("left", "middle"): ["left mid lung zone", "left midlung zone"],
        ("left", "lower"): ["left lower lobe", "left lung base", "left lower zone"],
    }[(side, zone)]
    return w.once(("zone", side, zone), options)


def _base_phrase(side: str, w: _Wording) -> tuple[str, str]:
    """(noun phrase for the base(s) with its article, adjective), e.g. ("the left lung base", "left basilar")."""
    if side == "bilateral":
        return w.once(("base", side), ["both lung bases", "the lung bases bilaterally"]), "bibasilar"
    return w.once(("base", side), [f"the {side} lung base", f"the {side} base"]), f"{side} basilar"


def _heart_sentences(case: Case, w: _Wording, st: random.Random) -> list[_Sentence]:
    f = case.finding("cardiomegaly")
    mediastinum = _Sentence(
        w.choice(["The mediastinal contours are normal.", "Mediastinal contours are within normal limits.",
                  "The mediastinum is not widened.", "Normal mediastinal contours.",
                  "The mediastinal contours are unremarkable."]),
        {"Enlarged Cardiomediastinum": NEGATIVE},
    )
    if f is None:
        if st.random() < 0.5:
            return [_Sentence(w.choice(["Heart size and mediastinal contours are normal.",
                                        "Normal heart size and mediastinal contours.",
                                        "The heart size and mediastinal contours are within normal limits."]),
                              {"Cardiomegaly": NEGATIVE, "Enlarged Cardiomediastinum": NEGATIVE})]
        options = ["Heart size is normal.", "The heart is normal in size.", "Normal heart size.",
                   "No cardiomegaly.", "The heart is not enlarged."]
        if case.view == "AP":
            options.append("Heart size is within normal limits given AP technique.")
        return [_Sentence(w.choice(options), {"Cardiomegaly": NEGATIVE}), mediastinum]
    if f.certainty == PRESENT:
        sev = "moderate" if f.params["ctr"] >= 0.62 else "mild"
        text = w.choice([f"The heart is {sev}ly enlarged.", f"{_cap(sev)} cardiomegaly.",
                         f"The cardiac silhouette is {sev}ly enlarged.", "Enlarged cardiac silhouette.",
                         f"There is {sev} cardiomegaly.", "Cardiomegaly."])
        return [_Sentence(text, {"Cardiomegaly": POSITIVE}), mediastinum]
    options = ["Possible mild cardiomegaly.", "The cardiac silhouette may be mildly enlarged.",
               "Heart size is borderline; mild cardiomegaly cannot be excluded."]
    if case.view == "AP":
        options.append("The cardiac silhouette may be mildly enlarged, although this is accentuated by AP technique.")
    return [_Sentence(w.choice(options), {"Cardiomegaly": UNCERTAIN}), mediastinum]


def _device_sentences(case: Case, w: _Wording) -> list[_Sentence]:
    f = case.finding("devices")
    if f is None:
        return []
    info = f.params
    out = []
    eff = {"Support Devices": POSITIVE}
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
                             f"{_cap(side)} {v} central line with tip in the {t}.",
                             f"{_cap(side)} {v} central venous catheter with tip projecting over the {t}."]))
    if "ng" in f.kinds:
        out.append(w.choice(["An enteric tube courses below the diaphragm with the tip in the stomach.",
                             "Nasogastric tube tip projects over the stomach.",
                             "The enteric tube extends below the diaphragm, tip in the gastric fundus."]))
    return [_Sentence(t, eff) for t in out]


def _nodule_text(f: Finding, w: _Wording, impression: bool = False) -> str:
    d = f"{f.params['diameter_cm']:.1f} cm"
    zone = _zone_phrase(f.side, f.zone, w)
    noun = f.size  # "nodule" | "mass"
    if impression:
        if f.certainty != PRESENT:
            return w.choice([f"Possible {d} {zone} {noun}; CT recommended.",
                             f"Questionable {d} {noun} in the {zone}; consider CT for further evaluation."])
        if noun == "mass":
            return w.choice([f"{d} {zone} mass, concerning for malignancy; CT chest recommended.",
                             f"{_cap(zone)} mass measuring {d}; recommend CT for further evaluation."])
        return w.choice([f"{d} {zone} nodule; recommend CT for further characterization.",
                         f"{_cap(zone)} nodule measuring {d}; CT recommended."])
    if f.certainty != PRESENT:
        return w.choice([f"Possible {d} {noun} in the {zone}.", f"A questionable {d} {noun} projects over the {zone}.",
                         f"A {d} {noun} in the {zone} cannot be excluded."])
    if noun == "mass":
        return w.choice([f"There is a {d} mass in the {zone}.", f"A {d} {zone} mass is present.",
                         f"{_cap(zone)} mass measuring {d}.", f"A lobulated {d} mass projects over the {zone}."])
    return w.choice([f"There is a {d} nodule in the {zone}.", f"A {d} rounded nodule projects over the {zone}.",
                     f"{_cap(zone)} nodule measuring {d}.",
                     f"A well-circumscribed {d} pulmonary nodule is noted in the {zone}."])


def _consolidation_text(f: Finding, w: _Wording, impression: bool = False) -> str:
    zone = _zone_phrase(f.side, f.zone, w)
    if f.certainty != PRESENT:
        return w.choice([f"Possible consolidation in the {zone}.", f"Subtle consolidation in the {zone} cannot be excluded.",
                         f"Questionable early consolidation in the {zone}."])
    if impression:
        return w.choice([f"{_cap(zone)} consolidation.", f"Consolidation in the {zone}."])
    return w.choice([f"There is consolidation in the {zone}.", f"Focal consolidation is seen in the {zone}.",
                     f"{_cap(zone)} airspace consolidation.", f"Patchy consolidation in the {zone}."])


def _pneumonia_sentence(w: _Wording) -> _Sentence:
    return _Sentence(w.choice(["This could represent pneumonia.",
                               "Findings may represent pneumonia in the appropriate clinical setting.",
                               "Pneumonia cannot be excluded."]), {"Pneumonia": UNCERTAIN})


def _edema_text(f: Finding, w: _Wording, impression: bool = False) -> str:
    sev = f.params["severity"]
    if f.certainty != PRESENT:
        return w.choice(["Possible mild pulmonary edema.", "Findings may represent early pulmonary edema.",
                         "Mild interstitial pulmonary edema cannot be excluded."])
    if impression:
        return w.choice([f"{_cap(sev)} pulmonary edema.", "Findings consistent with pulmonary edema."])
    return w.choice(["Perihilar haziness and vascular congestion consistent with pulmonary edema.",
                     f"There is {sev} pulmonary edema.", "Bilateral perihilar opacities compatible with pulmonary edema.",
                     f"{_cap(sev)} interstitial and perihilar edema."])


def _atelectasis_text(f: Finding, w: _Wording, impression: bool = False) -> str:
    base, adj = _base_phrase(f.side, w)
    if f.certainty != PRESENT:
        return w.choice([f"Questionable subsegmental atelectasis at {base}.", f"Possible {adj} atelectasis.",
                         f"Subsegmental atelectasis at {base} cannot be excluded."])
    if impression:
        return f"{_cap(adj)} atelectasis."
    return w.choice([f"Plate-like atelectasis at {base}.", f"Linear atelectasis at {base}.",
                     f"{_cap(adj)} atelectasis.", f"Subsegmental atelectasis at {base}."])


def _effusion_text(f: Finding, w: _Wording, impression: bool = False) -> str:
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
        return f"{_cap(size)} {side_w} {eff}."
    if bil:
        return w.choice([f"There are {size} bilateral {eff}.", f"{_cap(size)} bilateral {eff}.",
                         f"{_cap(size)} bilateral {eff} with blunting of the {angle}."])
    return w.choice([f"There is a {size} {side} {eff}.", f"{_cap(size)} {side} {eff}.",
                     f"{_cap(size)} {side} {eff} with blunting of the {angle}.", f"A {size} {side} {eff} is present."])


def _pneumothorax_text(f: Finding, w: _Wording, impression: bool = False) -> str:
    side, size = f.side, f.size
    if f.certainty != PRESENT:
        return w.choice([f"Possible small {side} apical pneumothorax.",
                         f"A small {side} apical pneumothorax cannot be excluded.",
                         f"Questionable small {side} pneumothorax."])
    if impression:
        return w.choice([f"{_cap(size)} {side} pneumothorax.", f"{_cap(size)} {side}-sided pneumothorax."])
    options = [f"There is a {size} {side} pneumothorax.", f"A {size} {side} pneumothorax is present.",
               f"{_cap(size)} {side}-sided pneumothorax with a visible visceral pleural line."]
    if size == "small":
        options.append(f"Small {side} apical pneumothorax.")
    return w.choice(options)


_TEXT = {
    "effusion": _effusion_text,
    "pneumothorax": _pneumothorax_text,
    "consolidation": _consolidation_text,
    "nodule": _nodule_text,
    "edema": _edema_text,
    "atelectasis": _atelectasis_text,
}


def _finding_sentence(f: Finding, w: _Wording, impression: bool = False) -> _Sentence:
    value = POSITIVE if f.certainty == PRESENT else UNCERTAIN
    return _Sentence(_TEXT[f.name](f, w, impression), {FINDING_OBSERVATION[f.name]: value})


def _report_sentences(case: Case, rng_seed: int | None) -> tuple[list[_Sentence], list[_Sentence]]:
    """Findings and impression sentences with their label effects.

    Which statements appear (and so the labels) depends only on the case; ``rng_seed`` changes the wording.
    """
    st = random.Random(case.report_seed * 2 + 1)  # structure: what is said
    w = _Wording((case.report_seed if rng_seed is None else int(rng_seed)) * 2)  # wording: how
    has = {f.name: f for f in case.findings}
    findings: list[_Sentence] = []
    if case.view == "AP" and st.random() < 0.6:
        findings.append(_Sentence(w.choice(["Portable AP view of the chest.", "Single portable AP radiograph of the chest.",
                                            "Portable semi-upright AP view of the chest."])))
    elif case.view == "PA" and st.random() < 0.3:
        findings.append(_Sentence(w.choice(["PA view of the chest.", "Frontal view of the chest."])))
    findings += _device_sentences(case, w)
    findings += _heart_sentences(case, w, st)
    # Lungs.
    lung_findings = [has[n] for n in ("consolidation", "nodule", "edema", "atelectasis") if n in has]
    findings += [_finding_sentence(f, w) for f in lung_findings]
    neg_cons = "consolidation" not in has and st.random() < 0.6
    neg_edema = "edema" not in has and st.random() < 0.35
    neg_nodule = "nodule" not in has and st.random() < 0.15
    if not lung_findings:
        if neg_cons and neg_edema:
            findings.append(_Sentence(w.choice(["The lungs are clear without focal consolidation or pulmonary edema.",
                                                "Lungs are clear. No focal consolidation or pulmonary edema."]),
                                      {"Lung Opacity": NEGATIVE, "Consolidation": NEGATIVE, "Edema": NEGATIVE}))
            neg_cons = neg_edema = False
        elif neg_cons:
            findings.append(_Sentence(w.choice(["The lungs are clear without focal consolidation.",
                                                "Lungs are clear. No focal consolidation."]),
                                      {"Lung Opacity": NEGATIVE, "Consolidation": NEGATIVE}))
            neg_cons = False
        else:
            findings.append(_Sentence(w.choice(["The lungs are clear.", "Lungs are clear.",
                                                "The lungs are well expanded and clear."]), {"Lung Opacity": NEGATIVE}))
    elif "edema" not in has and st.random() < 0.5:
        # "Clear" negates Lung Opacity; a positive child still wins when the labels are aggregated.
        findings.append(_Sentence(w.choice(["The lungs are otherwise clear.", "Elsewhere, the lungs are clear."]),
                                  {"Lung Opacity": NEGATIVE}))
    if neg_cons:
        findings.append(_Sentence(w.choice(["No focal consolidation.", "No focal consolidation is seen."]),
                                  {"Consolidation": NEGATIVE}))
    if neg_edema:
        findings.append(_Sentence(w.choice(["No pulmonary edema.", "No evidence of pulmonary edema."]),
                                  {"Edema": NEGATIVE}))
    if neg_nodule:
        findings.append(_Sentence(w.choice(["No suspicious pulmonary nodules.", "No pulmonary nodules or masses."]),
                                  {"Lung Lesion": NEGATIVE}))
    # Pleura.
    for n in ("effusion", "pneumothorax"):
        if n in has:
            findings.append(_finding_sentence(has[n], w))
    if "effusion" not in has and "pneumothorax" not in has:
        text = w.choice(["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                         "No pneumothorax or pleural effusion.", "No pleural effusion or pneumothorax is seen."])
        findings.append(_Sentence(text, {"Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}))
    elif "effusion" not in has:
        text = w.choice(["No pleural effusion.", "There is no pleural effusion."])
        findings.append(_Sentence(text, {"Pleural Effusion": NEGATIVE}))
    elif "pneumothorax" not in has:
        text = w.choice(["No pneumothorax.", "There is no pneumothorax."])
        findings.append(_Sentence(text, {"Pneumothorax": NEGATIVE}))
    # Bones.
    if st.random() < 0.4:
        findings.append(_Sentence(w.choice(["No displaced rib fracture.", "No acute fracture is identified."]),
                                  {"Fracture": NEGATIVE}))
    else:
        findings.append(_Sentence(w.choice(["No acute osseous abnormality.", "The osseous structures are intact.",
                                            "Osseous structures are unremarkable.", "No acute bony abnormality."])))

    impression: list[_Sentence] = []
    # Certain findings by importance, then the hedged ones.
    ordered = [has[n] for n in IMPORTANCE if n in has]
    ordered = [f for f in ordered if f.certainty == PRESENT] + [f for f in ordered if f.certainty != PRESENT]
    for f in ordered:
        n = f.name
        if n == "cardiomegaly":
            text = (w.choice(["Cardiomegaly.", "Enlarged cardiac silhouette."]) if f.certainty == PRESENT
                    else w.choice(["Possible mild cardiomegaly.", "Mild cardiomegaly cannot be excluded."]))
            impression.append(_Sentence(text, {"Cardiomegaly": POSITIVE if f.certainty == PRESENT else UNCERTAIN}))
        else:
            impression.append(_finding_sentence(f, w, impression=True))
        if n == "consolidation" and f.params.get("pneumonia"):
            impression.append(_pneumonia_sentence(w))
    if not impression:
        options = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                   "No acute intrathoracic process."]
        if "devices" not in has:
            options.append("Normal chest radiograph.")
        impression.append(_Sentence(w.choice(options)))
    if "devices" in has:
        impression.append(_Sentence(w.choice(["Support devices in standard position.",
                                              "Lines and tubes in satisfactory position.",
                                              "Tubes and lines as described above."]), {"Support Devices": POSITIVE}))
    return findings, impression


def write_report(case: Case, rng_seed: int | None = None) -> tuple[str, str]:
    """(findings, impression) for ``case``; ``rng_seed`` varies only the wording, never what is said."""
    findings, impression = _report_sentences(case, rng_seed)
    return " ".join(s.text for s in findings), " ".join(s.text for s in impression)


def case_labels(case: Case) -> Labels:
    """The 14 CheXpert labels the report states (1, -1, 0 when negated, None when not mentioned)."""
    findings, impression = _report_sentences(case, None)
    raw = empty_labels()
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}  # CheXpert's aggregation: positive > uncertain > negative
    for s in findings + impression:
        for obs, v in s.effects.items():
            if obs not in OBSERVATIONS:
                raise AssertionError(f"unknown observation {obs}")
            if raw[obs] is None or rank[v] > rank[raw[obs]]:
                raw[obs] = v
    return apply_conventions(raw)


# ---- VQA ---------------------------------------------------------------------------------------------------

_PRESENCE_NP = {
    "cardiomegaly": "cardiomegaly",
    "effusion": "a pleural effusion",
    "pneumothorax": "a pneumothorax",
    "nodule": "a lung nodule or mass",
    "consolidation": "consolidation",
    "edema": "pulmonary edema",
    "atelectasis": "atelectasis",
}
_LATERAL_NOUN = {
    "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "nodule": "lung lesion",
    "consolidation": "consolidation",
    "atelectasis": "atelectasis",
}


def _presence_question(name: str, w: random.Random) -> str:
    if name == "devices":
        return w.choice(["Are there any support devices?", "Is a tube or line present?", "Are any lines or tubes visible?"])
    np_ = _PRESENCE_NP[name]
    return w.choice([f"Is there {np_}?", f"Does this chest X-ray show {np_}?", f"Is there evidence of {np_}?",
                     f"Does the image show {np_}?"])


def case_vqa(case: Case) -> list[dict[str, Any]]:
    """3-6 closed questions about ``case``: presence, laterality, size and the main abnormality.

    Presence questions ask about as many absent as present findings; uncertain findings are never asked
    about (their answer would be a guess), so "yes" always means the finding's label is 1.
    """
    w = random.Random(case.report_seed * 2 + 7)
    certain = [f for f in case.findings if f.certainty == PRESENT]
    uncertain = {f.name for f in case.findings if f.certainty != PRESENT}
    present_names = [f.name for f in certain]
    absent = [n for n in FINDINGS if n not in present_names and n not in uncertain]
    tail: list[dict[str, Any]] = []
    lateral = [f for f in certain if f.name in LATERALISED]
    if lateral:
        f = w.choice(lateral)
        noun = _LATERAL_NOUN[f.name]
        q = w.choice([f"Which side is the {noun} on?", f"On which side is the {noun}?",
                      f"Is the {noun} on the left, the right, or both sides?"])
        tail.append({"question": q, "answer": f.side, "type": "laterality", "choices": list(LATERALITY_CHOICES)})
    sized = [f for f in certain if f.name in SIZE_CHOICES]
    if sized:
        f = w.choice(sized)
        if f.name == "nodule":
            q = w.choice(["Is the lung lesion a nodule or a mass?", "Is the lesion a nodule (under 3 cm) or a mass?"])
        else:
            noun = "pleural effusion" if f.name == "effusion" else "pneumothorax"
            q = w.choice([f"How large is the {noun}?", f"What is the size of the {noun}?"])
        tail.append({"question": q, "answer": f.size, "type": "size", "choices": list(SIZE_CHOICES[f.name])})
    main = next((n for n in IMPORTANCE if n in present_names), None)
    if main is not None or not uncertain:
        q = w.choice(["What is the main abnormality?", "What is the most significant finding?",
                      "Which abnormality is most prominent?"])
        tail.append({"question": q, "answer": PLAIN_NAMES[main] if main else "none", "type": "abnormality",
                     "choices": list(ABNORMALITY_CHOICES)})
    # Presence: abnormal studies get one "yes" more than "no" (normal ones only "no"), which balances the
    # answers over the dataset; at least three questions in all, at most six.
    n_yes = min(len(present_names), 3)
    n_no = max(1, 3 - len(tail) - n_yes)
    while n_yes + n_no + len(tail) > 6:
        if n_yes > n_no:
            n_yes -= 1
        else:
            n_no -= 1
    n_no = min(n_no, len(absent))
    yes = w.sample(present_names, n_yes)
    no = w.sample(absent, n_no)
    items = [{"question": _presence_question(n, w), "answer": "yes" if n in yes else "no", "type": "presence",
              "choices": ["yes", "no"]} for n in yes + no]
    return items + tail


# ---- prepare-framework integration ---------------------------------------------------------------------------

DEFAULT_NUM_SAMPLES = 2000


def assign_splits(n: int, seed: int, fractions: Sequence[float]) -> list[str]:
    """Deterministic split per index: a seeded permutation cut at the (rounded) fractions."""
    if len(fractions) != 3:
        raise ValueError(f"split_fractions must have three entries (train, validate, test), got {list(fractions)}")
    perm = np.random.default_rng([int(seed), 0x5B11]).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = min(n - n_train, int(round(fractions[1] * n)))
    out = ["test"] * n
    for rank, i in enumerate(perm):
        out[int(i)] = "train" if rank < n_train else "validate" if rank < n_train + n_val else "test"
    return out


def scan(params: PrepareParams) -> ScanResult:
    """One record per synthetic image (the prepare framework's driver half)."""
    from mavilt.data.prepare import ScanResult

    n = DEFAULT_NUM_SAMPLES if params.num_samples is None else int(params.num_samples)
    if n < 0:
        raise ValueError(f"num_samples must be >= 0, got {n}")
    splits = assign_splits(n, params.seed, params.split_fractions)
    records = [{"index": i, "study_id": f"syn-s{i:06d}", "image_id": f"syn-i{i:06d}", "split": splits[i]} for i in range(n)]
    return ScanResult(records=records)


def case_row(case: Case, split: str, image_size: int, bit_depth: int) -> dict[str, Any]:
    """One schema row (see :data:`mavilt.data.shards.SCHEMA`) for ``case``."""
    findings, impression = write_report(case)
    return {
        "study_id": f"syn-s{case.index:06d}",
        "image_id": f"syn-i{case.index:06d}",
        "split": split,
        "view": case.view,
        "image": encode_png(render(case, image_size), bit_depth),
        "findings": findings,
        "impression": impression,
        "labels": case_labels(case),
        "vqa": case_vqa(case),
    }


def convert(record: dict[str, Any], params: PrepareParams) -> dict[str, Any]:
    """The schema row of one scanned record (the prepare framework's worker half)."""
    case = sample_case(params.seed, int(record["index"]))
    return case_row(case, record["split"], params.image_size, params.bit_depth)


def make_rows(n: int, seed: int = 0, image_size: int = 64, bit_depth: int = 8,
              split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[dict[str, Any]]:
    """``n`` schema rows without Ray (for tests and quick local work)."""
    splits = assign_splits(n, seed, split_fractions)
    return [case_row(sample_case(seed, i), splits[i], image_size, bit_depth) for i in range(n)]
