"""Output frames of a given size: the avatar (square today) fitted, undistorted, into a frame
of another shape, such as the 16:9 frame a call app expects from a camera.

`fit_to_frame` scales the image uniformly to the largest size that fits (for a square
avatar in a landscape frame: the frame's height), centres it, and fills the bars beside it
(or above and below) with something that is not a distortion of the picture:

  "edge": the image's own outer columns (rows), averaged, blurred along the edge and darkened
          towards the frame's border; a soft continuation of its background, never its face
  "dark": one neutral dark colour (DARK, the browser extension's fill)

The scaled image is cv2.resize(image, (w, h)) with INTER_LINEAR when enlarging, INTER_AREA
when shrinking (`fit_interpolation`), so a caller can compare exactly. The bars are computed
at an eighth of their size and enlarged: about 1 ms for a 256² avatar in 1280×720.
Arrays in, arrays out.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import cv2
import numpy as np

DARK = (21, 24, 28)  # #15181c, as web/extension/page.js fills its 16:9 frame
FILLS = ("edge", "dark")
EDGE_SHARE = 1 / 32  # the outer part of the image that colours a bar (8 px of 256)
BRIGHTNESS = (0.55, 0.25)  # of the edge colour: beside the image, at the frame's border
BAR_SCALE = 8  # bars are computed this much smaller, then enlarged (smooth anyway)


def parse_frame_size(text: str, most: tuple[int, int] = (3840, 2160)) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height): both even (4:2:0 video), at least 32 and at most
    `most`. ValueError says what is wrong."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT such as 1280x720, got {str(text)[:40]!r}") from None
    if not (32 <= w <= most[0] and 32 <= h <= most[1]) or w % 2 or h % 2:
        raise ValueError(f"{w}x{h}: width 32-{most[0]} and height 32-{most[1]}, both even (4:2:0 video)")
    return w, h


class Placement(NamedTuple):
    x: int
    y: int
    width: int
    height: int


def fit_geometry(image_width: int, image_height: int, width: int, height: int) -> Placement:
    """Where the image goes in a width×height frame: scaled uniformly to the largest size that
    fits, centred (rounded down to the left and up). One axis is always filled exactly."""
    if min(image_width, image_height, width, height) < 1:
        raise ValueError(f"sizes must be positive: image {image_width}x{image_height}, frame {width}x{height}")
    if width * image_height >= height * image_width:  # the frame is wider: bars left and right
        h = height
        w = min(width, max(1, round(image_width * height / image_height)))
    else:  # taller: bars above and below
        w = width
        h = min(height, max(1, round(image_height * width / image_width)))
    return Placement((width - w) // 2, (height - h) // 2, w, h)


def fit_interpolation(image_shape: tuple[int, ...], placement: Placement) -> int:
    """The OpenCV interpolation fit_to_frame scales with: AREA to shrink, LINEAR to enlarge."""
    return cv2.INTER_AREA if placement.width < image_shape[1] else cv2.INTER_LINEAR


def fit_to_frame(image: np.ndarray, width: int, height: int, fill: str = "edge") -> np.ndarray:
    """A new (height, width, 3) uint8 frame with `image` (RGB uint8) fitted in without
    distortion, centred, and the bars filled (`fill`: "edge" or "dark"; module doc)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    ih, iw = image.shape[:2]
    p = fit_geometry(iw, ih, width, height)
    out = np.empty((height, width, 3), np.uint8)
    if (p.width, p.height) == (iw, ih):
        out[p.y:p.y + p.height, p.x:p.x + p.width] = image
    else:
        out[p.y:p.y + p.height, p.x:p.x + p.width] = cv2.resize(
            image, (p.width, p.height), interpolation=fit_interpolation(image.shape, p))
    if p.width < width:  # bars left and right
        _fill_bars(out, image, p.x, width - p.x - p.width, fill)
    elif p.height < height:  # above and below: the same with rows for columns
        _fill_bars(out.transpose(1, 0, 2), image.transpose(1, 0, 2), p.y, height - p.y - p.height, fill)
    return out


def _fill_bars(out: np.ndarray, image: np.ndarray, before: int, after: int, fill: str) -> None:
    """Fill the first `before` and last `after` columns of `out` (rows of a transposed view)."""
    length = out.shape[0]  # along the edge
    for size, first in ((before, True), (after, False)):
        if size <= 0:
            continue
        where = out[:, :size] if first else out[:, out.shape[1] - size:]
        if fill == "dark":
            where[:] = _dark_bar(length, size)  # a whole array: numpy's broadcast of 3 values is slow
        else:
            where[:] = _edge_bar(image, first, length, size)


def _edge_bar(image: np.ndarray, first: bool, length: int, size: int) -> np.ndarray:
    """(length, size, 3): the image's outer columns on that side, averaged across, blurred
    along the edge, darkened towards the frame's border, computed small and enlarged."""
    iw = image.shape[1]
    band = max(1, round(iw * EDGE_SHARE))
    strip = image[:, :band] if first else image[:, iw - band:]
    small_length, small_size = max(1, length // BAR_SCALE), max(1, size // BAR_SCALE)
    column = cv2.resize(np.ascontiguousarray(strip), (1, small_length), interpolation=cv2.INTER_AREA)
    column = column.reshape(small_length, 1, 3).astype(np.float32)
    if small_length > 2:
        sigma = small_length / 24  # a few percent of the edge's length: colour regions, not detail
        column = cv2.GaussianBlur(column, (1, 0), sigmaX=0.1, sigmaY=sigma,
                                  borderType=cv2.BORDER_REFLECT).reshape(small_length, 1, 3)
    small = (column * _ramp(small_size, first)[None, :, None]).astype(np.uint8)
    return cv2.resize(small, (size, length), interpolation=cv2.INTER_LINEAR)


@lru_cache(maxsize=8)
def _dark_bar(length: int, size: int) -> np.ndarray:
    bar = np.empty((length, size, 3), np.uint8)
    bar[:] = DARK
    bar.flags.writeable = False
    return bar


@lru_cache(maxsize=16)
def _ramp(size: int, first: bool) -> np.ndarray:
    """Brightness across a bar: BRIGHTNESS[0] beside the image, BRIGHTNESS[1] at the border."""
    ramp = np.linspace(BRIGHTNESS[1], BRIGHTNESS[0], size, dtype=np.float32)
    return ramp if first else ramp[::-1].copy()
