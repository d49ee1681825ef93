"""The warp's map: per map pixel, where in the reference to sample, from the affine map of
the mesh triangle that covers it (nearer triangles drawn last).

Why compiled: the warp draws about a thousand triangles per frame. Drawn one
cv2.fillConvexPoly call at a time, each call releases Python's GIL and takes it back, and
in a live server every take-back waits behind the event loop and the other session
threads (the convoy effect): the warp took 8 ms alone and 17 ms beside a Python thread busy
half the time. One numba call with the GIL released draws them all, and applies each
pixel's affine map as it goes, in well under a millisecond, and waits for nobody. numba
caches the compiled kernel beside this file (about 1.5 s the first time, then 0.4 s to
load at import); numba and llvmlite add about 140 MB to the process.
"""
from __future__ import annotations

import numba
import numpy as np


# Compiled at import (the signature makes it eager), so no session's first frame waits for it.
@numba.njit("void(float64[:, :, ::1], int64[::1], float32[:, :, ::1], float64, float32[:, :, ::1])",
            nogil=True, cache=True)
def _fill(corners, order, affines, scale, out):
    height, width = out.shape[:2]
    half = (scale - 1.0) / 2.0

    def put(t, x, y):
        px, py = x * scale + half, y * scale + half  # the image pixel this map pixel stands for
        out[y, x, 0] = affines[t, 0, 0] * px + affines[t, 0, 1] * py + affines[t, 0, 2]
        out[y, x, 1] = affines[t, 1, 0] * px + affines[t, 1, 1] * py + affines[t, 1, 2]

    for y in range(height):  # what no triangle covers follows the first one drawn
        for x in range(width):
            put(order[0], x, y)
    for k in range(order.shape[0]):
        t = order[k]
        x0, y0 = corners[t, 0, 0], corners[t, 0, 1]
        x1, y1 = corners[t, 1, 0], corners[t, 1, 1]
        x2, y2 = corners[t, 2, 0], corners[t, 2, 1]
        area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        if area == 0.0:
            continue
        s = 1.0 if area > 0.0 else -1.0  # a folded (mirrored) triangle still covers its pixels
        xa = max(int(np.ceil(min(x0, x1, x2))), 0)
        xb = min(int(np.floor(max(x0, x1, x2))), width - 1)
        ya = max(int(np.ceil(min(y0, y1, y2))), 0)
        yb = min(int(np.floor(max(y0, y1, y2))), height - 1)
        for y in range(ya, yb + 1):
            for x in range(xa, xb + 1):
                # Pixel centres on an edge count as inside, so neighbours leave no gap.
                if (s * ((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) >= 0.0
                        and s * ((x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)) >= 0.0
                        and s * ((x0 - x2) * (y - y2) - (y0 - y2) * (x - x2)) >= 0.0):
                    put(t, x, y)


def warp_map(corners: np.ndarray, order: np.ndarray, affines: np.ndarray, scale: int,
             out: np.ndarray) -> np.ndarray:
    """Fill `out` (H, W, 2) C-contiguous float32: for each map pixel, affines[t] applied to the
    image pixel it stands for (x * scale + (scale - 1) / 2, likewise y), t the triangle drawn
    last over it.

    corners: (T, 3, 2) triangle corners in map pixels (pixel (x, y)'s centre is at x, y);
    order: the triangle indices to draw, later ones on top (pixels none covers take the
    first one's map); affines: (T, 2, 3) image pixel -> (x, y)."""
    _fill(np.ascontiguousarray(corners, np.float64), np.ascontiguousarray(order, np.int64),
          np.ascontiguousarray(affines, np.float32), float(scale), out)
    return out
