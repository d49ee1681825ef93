"""Mouth interior for the warp engine.

A warp can only stretch the pixels it has: opening a closed mouth smears the lips into
the gap. Where the target mouth opens wider than the reference's, this paints a plausible
interior in the mouth's own frame (so it follows a tilted head): upper teeth under the
upper lip, a darker cavity, a tongue and lower teeth towards the chin, in colours taken
from the identity's own lips.
"""
from __future__ import annotations

import numpy as np

from .landmarks import inter_ocular
from .mesh import MOUTH_LOWER, MOUTH_UPPER
from .paint import paint_inside

OUTER_LIPS = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375]
TEETH = np.array([222, 214, 198], np.float32)
UPPER_TEETH, LOWER_TEETH = 0.10, 0.05  # visible tooth height, in inter-ocular distances


def lip_gap(points: np.ndarray) -> float:
    """Mean opening between the inner lips, in inter-ocular distances."""
    upper, lower = points[MOUTH_UPPER[1:-1], :2], points[MOUTH_LOWER[1:-1], :2]
    return float(np.linalg.norm(upper - lower, axis=1).mean() / max(inter_ocular(points), 1e-6))


class MouthPainter:
    def __init__(self, reference: np.ndarray, neutral: np.ndarray):
        self.reference_gap = lip_gap(neutral)
        h, w = reference.shape[:2]
        xy = np.clip(np.round(neutral[OUTER_LIPS, :2]).astype(int), 0, [w - 1, h - 1])
        lips = np.median(reference[xy[:, 1], xy[:, 0]].astype(np.float32), axis=0)
        self.cavity = lips * 0.22
        self.tongue = lips * 0.75 + np.array([20, 0, 0], np.float32)

    def strength(self, target: np.ndarray) -> float:
        """0 where the reference's own mouth shows enough, 1 once the target opens clearly wider."""
        return float(np.clip((lip_gap(target) - self.reference_gap - 0.02) / 0.06, 0.0, 1.0))

    def paint(self, image: np.ndarray, target: np.ndarray) -> None:
        """Paint the interior into image (in place) inside the target's inner-lip outline."""
        strength = self.strength(target)
        if strength <= 0:
            return
        upper, lower = target[MOUTH_UPPER, :2], target[MOUTH_LOWER, :2]
        outline = np.concatenate([upper, lower[-2:0:-1]])
        iod = inter_ocular(target)
        paint_inside(image, outline, lambda *box: self._interior(upper, lower, iod, *box), strength)

    def _interior(self, upper, lower, iod, x0, y0, x1, y1) -> np.ndarray:
        # The mouth's frame: u along the line between the corners, v across it (downwards).
        corner_l, corner_r = upper[0], upper[-1]
        axis = (corner_r - corner_l) / max(np.linalg.norm(corner_r - corner_l), 1e-6)
        normal = np.array([-axis[1], axis[0]])
        if normal[1] < 0:
            normal = -normal
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        rel = np.stack([xs - corner_l[0], ys - corner_l[1]], -1)
        u, v = rel @ axis, rel @ normal
        uu, uv = _frame(upper, corner_l, axis, normal)
        lu, lv = _frame(lower, corner_l, axis, normal)
        top = np.interp(u, uu, uv)
        bottom = np.interp(u, lu, lv)
        below_top, above_bottom = v - top, bottom - v
        opening = np.maximum(bottom - top, 1e-3)
        width = max(uu[-1], 1e-3)
        centred = np.clip(1 - np.abs(2 * u / width - 1), 0, 1)  # 1 mid-mouth, 0 at the corners
        shade = (0.55 + 0.45 * centred)[..., None]
        color = np.broadcast_to(self.cavity, u.shape + (3,)).copy()
        tongue = (above_bottom < 0.35 * opening) & (centred > 0.25)
        color[tongue] = self.tongue * (0.6 + 0.4 * (1 - above_bottom[tongue] / (0.35 * opening[tongue])))[..., None]
        lower_teeth = above_bottom < LOWER_TEETH * iod * np.clip(opening / (0.3 * iod), 0, 1)
        color[lower_teeth] = TEETH * 0.8
        color[below_top < UPPER_TEETH * iod] = TEETH
        return color * shade


def _frame(chain, origin, axis, normal):
    rel = chain - origin
    u, v = rel @ axis, rel @ normal
    order = np.argsort(u)
    return u[order], v[order]
