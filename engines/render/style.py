"""Looks an identity can be restyled into, once (`avatar identity style`): its reference and
the scene around it are repainted, and the warp then animates the repainted face, so a
style costs nothing per frame.

Each look is a few OpenCV filters whose sizes follow the face's size in the picture
(`face_side`, in pixels), so a face looks the same painted in a 256² reference as in a
1920-px scene. The scene and the reference are restyled as one picture (the reference is
cut from the restyled scene, see engines/identity.py), so the head pasted back into its
scene meets the same brush strokes at the seam.
"""
from __future__ import annotations

import cv2
import numpy as np

STYLES = {
    "painted": "oil paint: strokes of richer colour, edges and eyes kept",
    "toon": "cartoon: a few flat tones of each colour, dark outlines",
}
FACE_UNIT = 256  # the filter sizes below are for a face this many pixels across


def check_style(style: object) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
    return style


def stylize(rgb: np.ndarray, style: str, face_side: float) -> np.ndarray:
    """`rgb` (uint8) in `style`, for a face `face_side` px across in it."""
    k = max(face_side / FACE_UNIT, 0.25)
    return {"painted": _painted, "toon": _toon}[check_style(style)](np.ascontiguousarray(rgb), k)


def _odd(x: float, least: int = 3) -> int:
    return max(least, int(round(x)) | 1)


def _painted(rgb: np.ndarray, k: float) -> np.ndarray:
    # xphoto's oil painting gives each brush-sized neighbourhood its most common colour; an
    # edge-preserving pass softens the strokes' speckle, and richer colour and OpenCV's
    # detail enhancement bring the strokes and the eyes back out (chosen by eye on the demo
    # face against larger brushes, which smeared the eyes).
    oil = cv2.xphoto.oilPainting(rgb, max(2, round(2 * k)), 1, cv2.COLOR_RGB2Lab)
    soft = cv2.edgePreservingFilter(oil, flags=cv2.RECURS_FILTER, sigma_s=10 * k, sigma_r=0.25)
    hsv = cv2.cvtColor(soft, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = cv2.convertScaleAbs(hsv[..., 1], alpha=1.25)
    return cv2.detailEnhance(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), sigma_s=10 * k, sigma_r=0.15)


def _toon(rgb: np.ndarray, k: float, tones: int = 5) -> np.ndarray:
    smooth = rgb
    for _ in range(4):  # repeated small bilateral filters flatten skin and cloth, keep edges
        smooth = cv2.bilateralFilter(smooth, _odd(9 * k), 40, 7 * k)
    lab = cv2.cvtColor(smooth, cv2.COLOR_RGB2Lab)
    lightness = lab[..., 0].astype(np.float32) * (tones / 255)
    lab[..., 0] = np.clip(np.round(lightness) * (255 / tones), 0, 255).astype(np.uint8)  # hues stay
    flat = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
    gray = cv2.cvtColor(smooth, cv2.COLOR_RGB2GRAY)
    lines = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, _odd(11 * k), 7)
    lines = cv2.medianBlur(lines, 3)  # no lone dots
    return cv2.bitwise_and(flat, flat, mask=lines)
