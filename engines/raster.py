"""Triangle-index raster for the warp: which mesh triangle covers each map pixel.

Why compiled: the warp draws about a thousand triangles per frame. Drawn one
cv2.fillConvexPoly call at a time, each call releases Python's GIL and takes it back, and
in a live server every take-back waits behind the event loop and the other session
threads (the convoy effect): the warp took 8 ms alone and 17 ms beside a Python thread busy
half the time. One numba call with the GIL released draws them all in 0.2 ms and waits
for nobody. numba caches the compiled kernel beside this file (about 1.5 s the first time,
then 0.4 s to load at import).
"""
from __future__ import annotations

import numba
import numpy as np


# Compiled at import (the signature makes it eager), so no session's first frame waits for it.
@numba.njit("void(float64[:, :, ::1], int64[::1], int32[:, ::1])", nogil=True, cache=True)
def _fill(corners, order, ids):
    height, width = ids.shape
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
                    ids[y, x] = t


def rasterize(corners: np.ndarray, order: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Fill `ids` (H, W) C-contiguous int32 with the index of the triangle covering each pixel centre.

    corners: (T, 3, 2) triangle corners in pixel coordinates (pixel (x, y)'s centre is at
    x, y); order: the triangle indices to draw, later ones on top. Pixels no triangle
    covers keep their value."""
    _fill(np.ascontiguousarray(corners, np.float64), np.ascontiguousarray(order, np.int64), ids)
    return ids
