"""The visible "AI avatar" badge: a viewer sees at a glance that the face is synthesized.

The badge is drawn once per frame size into a small patch with its own alpha, then blended
into the corner, so labelling a frame costs a copy of a few thousand pixels."""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

TEXT = "AI avatar"


@lru_cache(maxsize=8)
def _badge(width: int, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(colour patch, alpha) for a frame `width` pixels wide: white text on dark grey."""
    scale = max(0.42, width / 600)
    thick = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(3, round(th * 0.4))
    h, w = th + base + 2 * pad, tw + 2 * pad
    colour = np.full((h, w, 3), 32, np.uint8)
    ink = np.zeros((h, w), np.uint8)
    cv2.putText(ink, text, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    colour[ink > 0] = 255
    alpha = np.maximum(ink.astype(np.float32) / 255, 0.6)[..., None]  # text opaque, box 60%
    colour = (colour.astype(np.float32) * alpha)
    return colour, alpha


def draw_label(rgb: np.ndarray, text: str = TEXT) -> np.ndarray:
    """A copy of `rgb` with the badge in its top-left corner (margin of 2% of the width)."""
    h, w = rgb.shape[:2]
    colour, alpha = _badge(w, text)
    m = max(2, w // 50)
    bh, bw = min(colour.shape[0], h - m), min(colour.shape[1], w - m)
    out = rgb.copy()
    region = out[m:m + bh, m:m + bw].astype(np.float32)
    out[m:m + bh, m:m + bw] = (colour[:bh, :bw] + region * (1 - alpha[:bh, :bw])).astype(np.uint8)
    return out
