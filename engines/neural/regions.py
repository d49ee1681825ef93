"""Where the face's features are: the mouth-and-eyes mask that training weights and that
keep_warp_detail keeps the generator's correction in (used by data.py and model.py alike)."""
from __future__ import annotations

import cv2
import numpy as np

from ..identity import RENDER_SIZE
from ..landmarks import inter_ocular
from ..render.mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER
from ..render.mouth import OUTER_LIPS


def region_weights(points: np.ndarray, size: int = RENDER_SIZE) -> np.ndarray:
    """(size, size) float32 mask, 1 on mouth and eyes (dilated), 0 elsewhere; points are in
    RENDER_SIZE² pixels whatever the size."""
    mask = np.zeros((size, size), np.uint8)
    points = points[:, :2] * (size / RENDER_SIZE)
    io = inter_ocular(points)
    for upper, lower in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
        ring = np.concatenate([points[upper], points[lower[-2:0:-1]]])
        cv2.fillPoly(mask, [np.round(ring).astype(np.int32)], 1)
    cv2.fillPoly(mask, [np.round(points[OUTER_LIPS]).astype(np.int32)], 1)
    r = max(1, int(round(0.12 * io)))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return mask.astype(np.float32)
