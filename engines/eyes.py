"""Eyelids for the warp engine.

Closing an eye by warping drags the lashes down over the eyeball: a dark smear, not a
lid. Where the target eye is more closed than the reference's, this paints lid skin
(sampled just above the reference's eye) between where the open lid would be and the
lower lid, with a lash line where the lids meet.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import geometry
from .landmarks import RIGID
from .paint import paint_inside
from .mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER

EYES = ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER))


def _gap(points, upper, lower) -> float:
    return float(np.linalg.norm(points[upper[1:-1], :2] - points[lower[1:-1], :2], axis=1).mean())


class EyelidPainter:
    def __init__(self, reference: np.ndarray, neutral: np.ndarray):
        self.neutral = neutral.astype(np.float64)
        h, w = reference.shape[:2]
        self.skin, self.lash = [], []
        for upper, lower in EYES:
            lid = neutral[upper[2:-2], :2].astype(np.float64)
            height = _gap(neutral, upper, lower)
            above = np.clip(np.round(lid - [0, 1.2 * height]).astype(int), 0, [w - 1, h - 1])
            self.skin.append(np.median(reference[above[:, 1], above[:, 0]].astype(np.float32), axis=0))
            self.lash.append(self.skin[-1] * 0.35)

    def paint(self, image: np.ndarray, target: np.ndarray) -> None:
        head = geometry.fit_similarity(self.neutral[RIGID, :2], target[RIGID, :2].astype(np.float64))
        scale = float(np.sqrt(abs(np.linalg.det(head[:2, :2]))))
        for (upper, lower), skin, lash in zip(EYES, self.skin, self.lash):
            open_gap = _gap(self.neutral, upper, lower) * scale
            closure = 1.0 - _gap(target, upper, lower) / max(open_gap, 1e-6)
            strength = float(np.clip((closure - 0.25) / 0.4, 0.0, 1.0))
            if strength > 0:
                self._paint_one(image, target, upper, lower, open_gap, skin, lash, strength)

    @staticmethod
    def _paint_one(image, target, upper, lower, open_gap, skin, lash, strength):
        lid = target[upper, :2].astype(np.float64)
        bottom = target[lower, :2].astype(np.float64)
        raised = lid.copy()
        raised[1:-1, 1] = np.minimum(lid[1:-1, 1], bottom[1:-1, 1] - open_gap * 1.15)
        outline = np.concatenate([raised, bottom[-2:0:-1]])

        def lid_layer(x0, y0, x1, y1):
            layer = np.empty((y1 - y0, x1 - x0, 3), np.float32)
            layer[:] = skin
            lash_line = np.round((lid - (x0, y0)) * 16).astype(np.int32)
            cv2.polylines(layer, [lash_line], False, lash.tolist(), 1, cv2.LINE_AA, shift=4)
            return layer

        paint_inside(image, outline, lid_layer, strength, feather=5)
