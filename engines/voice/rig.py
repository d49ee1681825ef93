"""The identity's own face moved by a few numbers: the mouth (gap, spread, rounding), the eyelids
(blink) and the irises, as displacements of mediapipe's landmarks from its neutral face.

Each motion is set where it is known, on the lips' four rings (or the lids), in the face's
own frame (x along the eyes, y down, z away from the camera; unit: the inter-ocular
distance, so it scales with the face), and carried to the skin around it by harmonic
interpolation over the face mesh: every free point moves as the mean of its neighbours,
weighted by nearness, down to nothing at the region's edge, on the forehead, nose and eyes.
The mesh has no edges across the mouth or the eyes, so upper and lower lips (and lids) move
apart. An open jaw also takes the chin down. These are linear fields: a frame's landmarks
are the neutral plus a weighted sum of them, cheap to compute per frame.
"""
from __future__ import annotations

import numpy as np

from ..landmarks import FACE_OVAL, IRISES, NUM_POINTS, RIGID, inter_ocular
from ..render.mesh import (LEFT_EYE_LOWER, LEFT_EYE_UPPER, MOUTH_LOWER, MOUTH_UPPER, RIGHT_EYE_LOWER,
                           RIGHT_EYE_UPPER, face_triangles)

# The lips' rings from the outer edge inwards, each as an upper and a lower chain from the
# image-left corner to the image-right one (chains verified against mediapipe's mesh edges).
LIP_RINGS = (
    ([61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291], [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]),
    ([76, 184, 74, 73, 72, 11, 302, 303, 304, 408, 306], [76, 77, 90, 180, 85, 16, 315, 404, 320, 307, 306]),
    ([62, 183, 42, 41, 38, 12, 268, 271, 272, 407, 292], [62, 96, 89, 179, 86, 15, 316, 403, 319, 325, 292]),
    (MOUTH_UPPER, MOUTH_LOWER),
)
SEAL_SHARE = (0.6, 0.8, 1.0, 1.0)  # per ring: how much of the inner lips' closing move it makes
EYES = ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER))

UPPER_SHARE = 0.2  # of a mouth's opening, the upper lip's part; the jaw takes the lower lip the rest
CHIN_DROP = 1.1  # the chin drops this many times as far as the lower lip (further from the jaw's hinge)
ROUND_NARROW = 0.12  # each corner moves in this far when fully rounded (inter-ocular distances)
ROUND_PUSH = 0.10  # and the lips come this far forward
LID_MEET = 0.8  # a closed eye's lids meet this far down from the upper lid
MOUTH_REACH, EYE_REACH = 0.8, 0.35  # free regions' radii around the mouth and each eye


class FaceRig:
    """pose(mouth, blink) -> landmarks of the identity with that mouth and those lids, the head
    as in the neutral face."""

    def __init__(self, neutral: np.ndarray):
        self.neutral = neutral.astype(np.float64)
        self.unit = max(inter_ocular(self.neutral), 1e-6)
        across = self.neutral[263, :2] - self.neutral[33, :2]
        across /= max(np.linalg.norm(across), 1e-9)
        self.axes = np.array([[across[0], across[1], 0.0], [-across[1], across[0], 0.0], [0.0, 0.0, 1.0]])
        inner = MOUTH_UPPER[5], MOUTH_LOWER[5]
        self.mouth_centre = self.neutral[list(inner)].mean(0)
        self.local = (self.neutral - self.mouth_centre) @ self.axes.T / self.unit
        self._laplacian = _laplacian(self.local)
        self.closed = self.neutral + self._to_image(self._seal())  # lips together, the rest neutral
        self.mouth_fields = np.stack([self._to_image(f) for f in (self._open(), self._spread(), self._round())])
        self.blink_field = self._to_image(self._blink())

    def pose(self, mouth: np.ndarray, blink: np.ndarray | None = None) -> np.ndarray:
        """(F, 478, 3) landmarks for F frames' mouth (F, 3: gap, spread, round, as visemes.Viseme has
        them) and blinks (F: 0 open .. 1 shut; none: open)."""
        shapes = self.closed + np.tensordot(np.asarray(mouth, np.float64), self.mouth_fields, axes=1)
        if blink is not None:
            shapes += np.asarray(blink, np.float64)[:, None, None] * self.blink_field
        return shapes

    def _to_image(self, local_displacement: np.ndarray) -> np.ndarray:
        return local_displacement @ self.axes * self.unit

    # -- the fields, in the face's frame and unit ---------------------------------------------

    def _lip_points(self):
        """(index, ring, upper?, position in its chain, place along it: -1 corner .. 0 middle .. 1
        corner) of every lip point; the corners come twice, once per chain."""
        for ring, (upper, lower) in enumerate(LIP_RINGS):
            x = self.local[upper, 0]
            middle, half = (x[0] + x[-1]) / 2, max((x[-1] - x[0]) / 2, 1e-6)
            for is_upper, chain in ((True, upper), (False, lower)):
                for k, i in enumerate(chain):
                    yield i, ring, is_upper, k, float(np.clip((self.local[i, 0] - middle) / half, -1, 1))

    def _mouth_field(self, lip_move, chin_drop: float = 0.0) -> np.ndarray:
        """The field from each lip point's move (lip_move(ring, upper, position, place) -> 3-vector)
        and the jaw line's drop (the chin's, less towards the jaw's angles)."""
        handles = {i: np.asarray(lip_move(ring, up, k, u), np.float64) for i, ring, up, k, u in self._lip_points()}
        corner_y = self.local[[61, 291], 1].mean()
        chin_y = self.local[152, 1]
        for i in FACE_OVAL:
            weight = np.clip((self.local[i, 1] - corner_y) / max(chin_y - corner_y, 1e-6), 0, 1)
            handles.setdefault(i, np.array([0.0, chin_drop * weight, 0.0]))
        return self._fill(handles, np.linalg.norm(self.local[:, :2], axis=1) < MOUTH_REACH)

    def _open(self) -> np.ndarray:
        """One unit of gap between the inner lips' middles: upper lip up, jaw and lower lip down,
        most in the middle (an ellipse along each ring)."""
        def move(ring, upper, k, u):
            lift = np.sqrt(1 - u * u)
            return (0.0, -UPPER_SHARE * lift if upper else (1 - UPPER_SHARE) * lift, 0.0)
        return self._mouth_field(move, (1 - UPPER_SHARE) * CHIN_DROP)

    def _seal(self) -> np.ndarray:
        """The inner lips brought together where the neutral parts them (zero for a closed
        mouth), each ring following, and the jaw closing with the lower lip."""
        upper, lower = (np.array(c) for c in LIP_RINGS[-1])
        middle = (self.local[upper] + self.local[lower]) / 2
        close = {True: middle - self.local[upper], False: middle - self.local[lower]}
        close[True][:, 2] = close[False][:, 2] = 0.0
        return self._mouth_field(lambda ring, up, k, u: close[up][k] * SEAL_SHARE[ring], close[False][5, 1] * CHIN_DROP)

    def _spread(self) -> np.ndarray:
        """Each corner one unit outwards, the lips stretched evenly between them."""
        return self._mouth_field(lambda ring, up, k, u: (u, 0.0, 0.0))

    def _round(self) -> np.ndarray:
        """Fully rounded: corners in, lips forward (the middle most). Turning the outer lip edges
        out as well read as a wider opening, to the eye and to mediapipe alike."""
        def move(ring, upper, k, u):
            return (-ROUND_NARROW * u, 0.0, -ROUND_PUSH * (0.6 + 0.4 * np.sqrt(1 - u * u)))
        return self._mouth_field(move)

    def _blink(self) -> np.ndarray:
        """Both eyes shut: the upper lid down to LID_MEET of the way, the lower lid up the rest."""
        handles, free = {}, np.zeros(NUM_POINTS, bool)
        for upper, lower in EYES:
            for u, v in zip(upper[1:-1], lower[1:-1]):
                handles[u] = LID_MEET * (self.local[v] - self.local[u]) * [1, 1, 0]
                handles[v] = (1 - LID_MEET) * (self.local[u] - self.local[v]) * [1, 1, 0]
            centre = self.local[[upper[0], upper[-1]]].mean(0)
            free |= np.linalg.norm(self.local[:, :2] - centre[:2], axis=1) < EYE_REACH
        return self._fill(handles, free)

    def _fill(self, handles: dict[int, np.ndarray], free: np.ndarray) -> np.ndarray:
        """Harmonic interpolation: handles move as given; free points (but the rigid ones, the
        irises and the handles) as the weighted mean of their neighbours; all else stays."""
        move = np.zeros((NUM_POINTS, 3))
        for i, d in handles.items():
            move[i] = d
        free = free.copy()
        free[list(handles)] = False
        free[RIGID] = False
        free[IRISES.ravel()] = False
        f = np.flatnonzero(free)
        if len(f):
            lap = self._laplacian
            move[f] = np.linalg.solve(lap[np.ix_(f, f)], -lap[f] @ np.where(free[:, None], 0.0, move))
        return move


def _laplacian(local: np.ndarray) -> np.ndarray:
    """The mesh's graph Laplacian (478 x 478; the irises, outside the mesh, unconnected),
    edges weighted by the inverse of their length in the face's plane."""
    tris = face_triangles()
    edges = np.unique(np.sort(np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [0, 2]]]), axis=1), axis=0)
    length = np.linalg.norm(local[edges[:, 0], :2] - local[edges[:, 1], :2], axis=1)
    weight = 1.0 / np.maximum(length, 1e-3)
    lap = np.zeros((NUM_POINTS, NUM_POINTS))
    lap[edges[:, 0], edges[:, 1]] = lap[edges[:, 1], edges[:, 0]] = -weight
    lap[np.diag_indices(NUM_POINTS)] = -lap.sum(1)
    return lap
