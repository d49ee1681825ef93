"""One-shot renderer: animates an identity from a single reference image by a
piecewise-affine warp of the face mesh, and paints what a warp cannot show.

Per frame: one affine map per triangle of the target mesh, drawn into a map of source
pixels (nearer triangles last; engines/render/raster.py), then a single cv2.remap. The map is
built at half resolution and upsampled: a piecewise-affine map is continuous, so bilinear
upsampling of it is nearly exact and saves three quarters of the per-pixel work.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import geometry
from ..landmarks import RIGID, inter_ocular
from .mesh import (border_points, face_triangles, head_outline_points, hole_triangles,
                   ring_depth, ring_points, skirt_triangles)
from .raster import warp_map
from .eyes import EyelidPainter, EyeMemory, IrisPainter
from .mouth import MouthMemory, MouthPainter

MAP_SCALE = 2  # the warp map is built at 1/MAP_SCALE resolution
# Where neighbouring pixels sample places of the reference more than JUMP times their own
# distance apart, the warp is discontinuous: a turned head's silhouette over what lies behind
# it, the nose over the far cheek. Those edges are softened over SEAM_SIGMA pixels, as a
# camera would see them, instead of showing the half-resolution map's stair steps.
JUMP = 3.0
SEAM_SIGMA = 1.2
# The reference is resampled bicubically: bilinear sampling between pixels blurred away a
# third of the face's fine detail (the demo's, shown at 720 px: 0.52 -> 0.64 of its photo's
# at random sub-pixel moves; metrics.face_detail) for +0.85 ms a frame at 256².
RESAMPLE = cv2.INTER_CUBIC


class WarpRenderer:
    """render(target_points) -> RGB image of the identity with the target's pose and expression."""

    def __init__(self, reference: np.ndarray, neutral: np.ndarray, mouth_memory: MouthMemory | None = None,
                 eye_memory: EyeMemory | None = None):
        if reference.ndim != 3 or reference.shape[2] != 3:
            raise ValueError(f"reference must be an RGB image, got shape {reference.shape}")
        self.reference = np.ascontiguousarray(reference)
        self.neutral = neutral.astype(np.float64)
        self.height, self.width = reference.shape[:2]
        src2d = self.neutral[:, :2]
        self._border = border_points(self.width, self.height)
        self._ring = ring_points(self.neutral)
        self._ring_back = np.array([0.0, 0.0, inter_ocular(self.neutral)])  # one unit of ring_depth
        self._outline = head_outline_points(self.neutral)
        src = np.concatenate([src2d, self._ring[:, :2], self._border])
        self._face_tris = np.concatenate([face_triangles(), hole_triangles()])
        self._skirt_tris = skirt_triangles(src2d, self.width, self.height)
        self._tris = np.concatenate([self._skirt_tris, self._face_tris])
        corners = src[self._tris]
        self._src_edges = np.stack([corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]], axis=2)
        self._src_origin = corners[:, 0]
        # Map pixel i stands for image pixel i*S + (S-1)/2: where cv2.resize samples it.
        self._map_buffer = np.zeros((-(-self.height // MAP_SCALE), -(-self.width // MAP_SCALE), 2), np.float32)
        self.mouth = MouthPainter(self.reference, self.neutral, mouth_memory)
        self.irises = IrisPainter(self.reference, self.neutral)
        self.eyelids = EyelidPainter(self.reference, self.neutral, eye_memory)

    @classmethod
    def for_identity(cls, identity) -> "WarpRenderer":
        """The warp of an identity, with the memories of its own mouth and eyes if its bundle has them."""
        return cls(identity.reference, identity.neutral, identity.memory("mouth_memory"), identity.memory("eye_memory"))

    def render(self, target: np.ndarray) -> np.ndarray:
        head = self._head_similarity(target[:, :2].astype(np.float64))
        dst = self._target_points(target)
        src = self._map(dst, target)
        seams = seam_mask(src, JUMP * MAP_SCALE / _scale(head))
        if MAP_SCALE != 1:
            src = cv2.resize(src, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        # The face without its irises (their whites filled in), which are drawn next where the
        # target looks: the mesh has no iris points, so the warp would pin them to the lids.
        out = cv2.remap(self.irises.white, src[..., 0], src[..., 1], RESAMPLE, borderMode=cv2.BORDER_REPLICATE)
        soften(out, seams)
        self.mouth.paint(out, target)
        self.irises.paint(out, target, head)
        self.eyelids.paint(out, target, head)
        return out

    # render() in the two halves AvatarPipeline.prepare/finish call: here all of it is the second.
    @staticmethod
    def prepare(target: np.ndarray) -> np.ndarray:
        return target

    def finish(self, target: np.ndarray) -> np.ndarray:
        return self.render(target)

    def render_rigid(self, target: np.ndarray) -> np.ndarray:
        """The reference moved rigidly with the head, without expression: where hair and ears
        go. The mesh warp does not cover them and its skirt stretches them instead. The move is
        the head's 3-D pose seen at the depth of its outline (mesh.HEAD_DEPTH): a similarity
        fitted to the face's front made the hair overshoot at every turn."""
        moved = geometry.apply(self._head_pose(target), self._outline)
        head = geometry.fit_similarity(self._outline[:, :2], moved[:, :2])
        return cv2.warpAffine(self.reference, head[:2], (self.width, self.height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)

    def _head_pose(self, target: np.ndarray) -> np.ndarray:
        return geometry.fit_similarity(self.neutral[RIGID], target[RIGID].astype(np.float64))

    def _head_similarity(self, t2d: np.ndarray) -> np.ndarray:
        return geometry.fit_similarity(self.neutral[RIGID, :2], t2d[RIGID])

    def _target_points(self, target: np.ndarray) -> np.ndarray:
        pose = self._head_pose(target)
        back = ring_depth(geometry.turn_degrees(pose)) * self._ring_back
        ring = geometry.apply(pose, self._ring + back)[:, :2]
        return np.concatenate([target[:, :2].astype(np.float64), ring, self._border])

    def _affines(self, dst: np.ndarray) -> np.ndarray:
        """Per triangle, the affine map taking target corners onto source corners:
        A = S D^-1 on the edge vectors, with the 2x2 inverse written out (batched
        np.linalg.inv on a thousand tiny matrices costs more than the whole warp)."""
        d = dst[self._tris]
        e1, e2 = d[:, 1] - d[:, 0], d[:, 2] - d[:, 0]
        det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
        det = np.where(np.abs(det) < 1e-9, 1e-9, det)  # a collapsed triangle: keep it finite
        inv = np.empty((len(d), 2, 2))
        inv[:, 0, 0], inv[:, 0, 1] = e2[:, 1] / det, -e2[:, 0] / det
        inv[:, 1, 0], inv[:, 1, 1] = -e1[:, 1] / det, e1[:, 0] / det
        lin = self._src_edges @ inv
        out = np.empty((len(d), 2, 3), np.float32)
        out[:, :, :2] = lin
        out[:, :, 2] = self._src_origin - np.einsum("tij,tj->ti", lin, d[:, 0])
        return out

    def _map(self, dst: np.ndarray, target: np.ndarray) -> np.ndarray:
        """The warp map (source pixel per map pixel): the skirt drawn first, then face
        triangles far to near, each with its affine map."""
        n_skirt = len(self._skirt_tris)
        depth = target[self._face_tris, 2].mean(1)
        order = np.concatenate([np.arange(n_skirt), n_skirt + np.argsort(-depth)])
        corners = (dst[self._tris] - (MAP_SCALE - 1) / 2) / MAP_SCALE
        return warp_map(corners, order, self._affines(dst), MAP_SCALE, self._map_buffer)


def _scale(similarity: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(similarity[:2, :2]))))


def seam_mask(src: np.ndarray, jump: float) -> np.ndarray:
    """uint8 mask of the map pixels beside a discontinuity: a neighbour's source point is more
    than `jump` reference pixels away on either axis. (Per axis: a max over the last axis of
    size 2 costs ten times as much in numpy.)"""
    mask = np.zeros(src.shape[:2], np.uint8)
    for axis in (0, 1):
        step = (np.abs(np.diff(src[..., 0], axis=axis)) > jump) | (np.abs(np.diff(src[..., 1], axis=axis)) > jump)
        if axis == 0:
            mask[1:] |= step
            mask[:-1] |= step
        else:
            mask[:, 1:] |= step
            mask[:, :-1] |= step
    return mask


def soften(image: np.ndarray, seams: np.ndarray) -> None:
    """Blend `image` in place towards its blur along `seams` (a mask of the warp map, whose
    pixel i stands for image pixel i*MAP_SCALE + (MAP_SCALE-1)/2), within their bounding box."""
    ys, xs = np.nonzero(seams)
    if not len(ys):
        return
    pad = int(np.ceil(3 * SEAM_SIGMA / MAP_SCALE)) + 1
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, seams.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, seams.shape[1])
    alpha = cv2.GaussianBlur(seams[y0:y1, x0:x1].astype(np.float32) * 1.5, (0, 0), SEAM_SIGMA / MAP_SCALE)
    s = MAP_SCALE
    roi = image[y0 * s:y1 * s, x0 * s:x1 * s]
    alpha = np.minimum(cv2.resize(alpha, (roi.shape[1], roi.shape[0]), interpolation=cv2.INTER_LINEAR), 1.0)
    blurred = cv2.GaussianBlur(roi, (0, 0), SEAM_SIGMA)
    roi[:] = cv2.blendLinear(blurred, roi, alpha, 1.0 - alpha)
