"""The pixel grid one case is drawn on: every pixel's anatomical coordinates, and anti-aliased line segments.

A per-case rotation/scale maps anatomical coordinates to the image, so 512 px is a finer rendering of 64 px.
Both the normal anatomy (:mod:`mavilt.data.synthetic.render`) and the findings draw through this module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mavilt.data.synthetic.anatomy import lung_mask

if TYPE_CHECKING:
    from mavilt.data.synthetic.case import Case


@functools.lru_cache(maxsize=8)
def pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) image coordinates in [0, 1] of every pixel centre; read-only because they are cached."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size)))
    v = np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size)))
    u.flags.writeable = False
    v.flags.writeable = False
    return u, v


class RenderContext:
    """Per-render state: the anatomical coordinates of every pixel and lazily computed shared fields."""

    def __init__(self, case: Case, size: int):
        if not 8 <= size <= 4096:
            raise ValueError(f"image size must be between 8 and 4096 pixels, got {size}")
        self.case, self.an, self.size = case, case.anatomy, size
        an = case.anatomy
        self.cos, self.sin = math.cos(an.rotation), math.sin(an.rotation)
        u, v = pixel_centres(size)
        du, dv = u - 0.5, v - 0.5
        s = 1.0 / an.scale
        self.x = 0.5 + (self.cos * du + self.sin * dv) * s
        self.y = 0.5 + (-self.sin * du + self.cos * dv) * s
        self.px = 1.0 / (size * an.scale)  # one pixel in anatomical units
        # Anatomical edges are a little soft; at low resolution one pixel of anti-aliasing dominates.
        self.e = max(0.0035, 0.7 * self.px)
        self._lungs: dict[str, np.ndarray] = {}

    def lung(self, side: str) -> np.ndarray:
        """Soft mask of one lung (computed once per render: several findings and the anatomy need it)."""
        if side not in self._lungs:
            self._lungs[side] = lung_mask(self.an, side, self.x, self.y, self.e)
        return self._lungs[side]

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        """Anatomical point -> (column, row) in pixel-index units."""
        dx, dy = x - 0.5, y - 0.5
        sc = self.an.scale
        u = 0.5 + sc * (self.cos * dx - self.sin * dy)
        v = 0.5 + sc * (self.sin * dx + self.cos * dy)
        return u * self.size - 0.5, v * self.size - 0.5


def draw_segments(ctx: RenderContext, segs: Sequence[Sequence[float]], out: np.ndarray,
                  support: np.ndarray | None = None) -> None:
    """Add Gaussian-profile line segments (x0, y0, x1, y1, sigma, amp; anatomical units) into ``out``.

    Lines thinner than a pixel are widened and dimmed (same integral) so they do not alias; each segment is
    cut at 3 sigma, so its support (or-ed into ``support`` when given) is exact.
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
