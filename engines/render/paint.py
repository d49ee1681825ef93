"""Painting into a warped frame: the shared step of the mouth and eyelid painters."""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

Layer = Callable[[int, int, int, int], np.ndarray]  # (x0, y0, x1, y1) -> float32 (y1-y0, x1-x0, 3)
TUNED_SIDE = 256  # the frame side the painters' pixel sizes were chosen at


def kernel(pixels: int, side: int) -> int:
    """An odd blur kernel of `pixels` at TUNED_SIDE, as wide on a frame of `side`: a 512²
    avatar's edges are as soft as a 256² one's, not twice as sharp."""
    return max(1, int(round(pixels * side / TUNED_SIDE))) | 1


def paint_inside(image: np.ndarray, outline: np.ndarray, layer: Layer, strength: float,
                 feather: int = 3) -> None:
    """Blend layer into image (in place) inside the polygon `outline`, with an anti-aliased,
    feathered edge, at opacity `strength`. Only the outline's bounding box is touched."""
    h, w = image.shape[:2]
    x0, y0 = np.maximum(np.floor(outline.min(0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(outline.max(0)).astype(int) + 3, [w, h])
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    local = np.round((outline - (x0, y0)) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(alpha, [local], 255, lineType=cv2.LINE_AA, shift=4)
    alpha = cv2.GaussianBlur(alpha, (feather, feather), 0).astype(np.float32) * (strength / 255.0)
    region = image[y0:y1, x0:x1].astype(np.float32)
    region += (layer(x0, y0, x1, y1) - region) * alpha[..., None]
    image[y0:y1, x0:x1] = np.clip(region, 0, 255).astype(np.uint8)
