"""The warp mesh: mediapipe's face tessellation, its eye and mouth holes filled, and a
skirt of triangles from the face outline out to the image border so that hair, neck and
background move smoothly with the head instead of tearing."""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np
from scipy.spatial import Delaunay

from ..landmarks import FACE_OVAL, NUM_POINTS, RIGID, inter_ocular

# Hole outlines as upper and lower chains from corner to corner, zipped into triangles.
MOUTH_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
MOUTH_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
RIGHT_EYE_UPPER = [33, 246, 161, 160, 159, 158, 157, 173, 133]
RIGHT_EYE_LOWER = [33, 7, 163, 144, 145, 153, 154, 155, 133]
LEFT_EYE_UPPER = [263, 466, 388, 387, 386, 385, 384, 398, 362]
LEFT_EYE_LOWER = [263, 249, 390, 373, 374, 380, 381, 382, 362]

RING_SCALE = 1.35  # the skirt's inner ring, as a multiple of the face outline's size
# How far behind its face outline a head's outline turns, in inter-ocular distances. Hair and
# ears outline the skull, whose turning axis lies well behind the face: at a head turn they
# move less than the face does, and the rigid head (warp.render_rigid) moves them so. On two
# self-scans' held-out frames 0.4-0.6 measured best, for the rigid head and for the skirt.
HEAD_DEPTH = 0.5
# The skirt's inner ring turns at that depth too while the head is near its reference pose:
# it then moves as the hair and ears beside it do, which took the warp from 22.15 to 22.69 dB
# and 19.58 to 20.23 dB on those frames (held-out turns stay under 14 degrees). But at a 24
# degree turn the near cheek or the jaw overtakes so deep a ring and folds the skirt between
# them, and before that the far side's skirt stretches the jaw's edge into a pale wedge; at
# the outline's own depth the skirt stays fold-free past 40. So the ring comes forward as the
# head turns out of the image plane, linearly between these angles (degrees).
RING_TURN_DEGREES = (10.0, 30.0)
BORDER_STEPS = 8  # fixed points per image side


@lru_cache(maxsize=1)
def face_triangles() -> np.ndarray:
    """The 852 triangles of mediapipe's face mesh, rebuilt from its edge list.

    Every 3-clique of the edge graph is a face, except two that are made only of edges
    already shared by two real faces (around the nostrils); those are dropped.
    """
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    adj = defaultdict(set)
    for a, b in FACEMESH_TESSELATION:
        adj[a].add(b)
        adj[b].add(a)
    cliques = {tuple(sorted((a, b, k))) for a, b in FACEMESH_TESSELATION for k in adj[a] & adj[b]}
    edge_use = defaultdict(int)
    for t in cliques:
        for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])):
            edge_use[e] += 1
    real = [t for t in cliques
            if not all(edge_use[e] > 2 for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))]
    return np.array(sorted(real), dtype=np.int32)


def zip_chains(upper: list[int], lower: list[int]) -> np.ndarray:
    """Triangulate the hole between two chains that share their end points."""
    tris = []
    for i in range(len(upper) - 1):
        tris.append((upper[i], upper[i + 1], lower[i]))
        tris.append((upper[i + 1], lower[i + 1], lower[i]))
    return np.array([t for t in tris if len(set(t)) == 3], dtype=np.int32)


def hole_triangles() -> np.ndarray:
    return np.concatenate([zip_chains(MOUTH_UPPER, MOUTH_LOWER),
                           zip_chains(RIGHT_EYE_UPPER, RIGHT_EYE_LOWER),
                           zip_chains(LEFT_EYE_UPPER, LEFT_EYE_LOWER)])


def ring_points(points: np.ndarray) -> np.ndarray:
    """The skirt's inner ring: the face outline widened about its centre in the image plane,
    at the outline's own depth (ring_depth says how far behind it the ring turns)."""
    ring = points[FACE_OVAL].copy()
    center = ring[:, :2].mean(0)
    ring[:, :2] = center + (ring[:, :2] - center) * RING_SCALE
    return ring


def ring_depth(turn_degrees: float) -> float:
    """How far behind the face outline the skirt's inner ring turns, in inter-ocular
    distances, when the head is turned this far out of the image plane."""
    start, end = RING_TURN_DEGREES
    return HEAD_DEPTH * min(max((end - turn_degrees) / (end - start), 0.0), 1.0)


def head_outline_points(points: np.ndarray) -> np.ndarray:
    """The rigid points moved back to the depth of the head's outline (the face outline's
    mean depth + HEAD_DEPTH): the head's motion fitted on these in 2-D is how its hair moves."""
    out = points[RIGID].astype(np.float64)
    out[:, 2] = points[FACE_OVAL, 2].mean() + HEAD_DEPTH * inter_ocular(points)
    return out


def border_points(width: int, height: int) -> np.ndarray:
    """Fixed points just outside the image, so every pixel lies inside some triangle."""
    xs = np.linspace(-2, width + 1, BORDER_STEPS + 1)
    ys = np.linspace(-2, height + 1, BORDER_STEPS + 1)
    top = np.stack([xs, np.full_like(xs, -2)], 1)
    bottom = np.stack([xs, np.full_like(xs, height + 1)], 1)
    left = np.stack([np.full_like(ys[1:-1], -2), ys[1:-1]], 1)
    right = np.stack([np.full_like(ys[1:-1], width + 1), ys[1:-1]], 1)
    return np.concatenate([top, bottom, left, right]).astype(np.float64)


def skirt_triangles(points2d: np.ndarray, width: int, height: int) -> np.ndarray:
    """Triangles between the face outline, the ring and the border, indexed into
    [landmarks (478), ring (len(FACE_OVAL)), border]."""
    n_ring = len(FACE_OVAL)
    outer = np.concatenate([points2d[FACE_OVAL], ring_points(points2d), border_points(width, height)])
    index = np.concatenate([np.array(FACE_OVAL), NUM_POINTS + np.arange(n_ring),
                            NUM_POINTS + n_ring + np.arange(len(outer) - 2 * n_ring)])
    tri = Delaunay(outer).simplices
    inside_face = np.all(tri < n_ring, axis=1)  # all three corners on the outline: inside the face
    return index[tri[~inside_face]].astype(np.int32)
