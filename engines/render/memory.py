"""An enrolled identity's memory of its own appearance (issue #13's memory compensation).

What a warp of one reference image cannot show — an open mouth's teeth and tongue, a
closed eye's lid and lashes — the self-scan shows many times. A memory keeps a few of
those moments, spread over their shapes, as image patches cut round a region with the
frame's landmarks moved into the patch; the painters draw from the one whose shape is
nearest the target's. mouth.MouthMemory and eyes.EyeMemory say what a shape is.
"""
from __future__ import annotations

import cv2
import numpy as np


class Memory:
    """patches (N, h, w, 3) uint8 and points (N, 478, 3) in patch pixels; `shapes` (N, d)."""

    PATCH: tuple[int, int] = (64, 64)  # (height, width) cut round each remembered moment
    CENTRE: list[int] = []  # landmarks whose mean is the patch's centre
    KIND = "memory"

    def __init__(self, patches: np.ndarray, points: np.ndarray):
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8 or not len(patches):
            raise ValueError(f"{self.KIND} patches must be (N, h, w, 3) uint8, got {patches.shape} {patches.dtype}")
        if points.ndim != 3 or points.shape[0] != len(patches) or not np.isfinite(points).all():
            raise ValueError(f"{self.KIND} points must be finite (N, 478, 3), got {points.shape}")
        self.patches, self.points = patches, points.astype(np.float32)
        self.shapes = np.stack([self.shape(p) for p in self.points])

    @staticmethod
    def shape(points: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def worth_keeping(cls, shapes: np.ndarray) -> np.ndarray:
        """Which frames (by their shapes) show what a warp cannot: a boolean per frame."""
        raise NotImplementedError

    @classmethod
    def build(cls, frames: np.ndarray, points: np.ndarray, size: int):
        """Up to `size` frames worth keeping, spread by farthest-point sampling of their
        shapes, starting from the most extreme; None if no frame is worth keeping."""
        shapes = np.stack([cls.shape(p) for p in points])
        keep = np.flatnonzero(cls.worth_keeping(shapes))
        if not len(keep):
            return None
        far = shapes[keep] - np.median(shapes, axis=0)
        chosen = [int(np.argmax(np.linalg.norm(far, axis=1)))]
        dist = np.linalg.norm(shapes[keep] - shapes[keep[chosen[0]]], axis=1)
        while len(chosen) < min(size, len(keep)):
            chosen.append(int(np.argmax(dist)))
            dist = np.minimum(dist, np.linalg.norm(shapes[keep] - shapes[keep[chosen[-1]]], axis=1))
        cut = [cls._cut(frames[keep[j]], points[keep[j]]) for j in chosen]
        return cls(np.stack([c[0] for c in cut]), np.stack([c[1] for c in cut]))

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as z:
            return cls(z["patches"], z["points"])

    def scaled(self, k: float):
        """This memory for a reference `k` times the size of the one it was cut for."""
        if k == 1:
            return self
        h, w = self.patches.shape[1:3]
        size = (round(w * k), round(h * k))
        patches = np.stack([cv2.resize(p, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
                            for p in self.patches])
        return type(self)(patches, self.points * k)

    def save(self, path) -> None:
        np.savez_compressed(path, patches=self.patches, points=self.points)

    @classmethod
    def _cut(cls, frame: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The PATCH round the region (edge pixels repeated past the frame), and the
        landmarks moved into it."""
        h, w = cls.PATCH
        cx, cy = points[cls.CENTRE, :2].mean(0)
        x0, y0 = int(round(cx)) - w // 2, int(round(cy)) - h // 2
        shift = np.array([[1, 0, -x0], [0, 1, -y0]], np.float64)
        patch = cv2.warpAffine(frame, shift, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        moved = points.astype(np.float32).copy()
        moved[:, 0] -= x0
        moved[:, 1] -= y0
        return patch, moved


def nearest(distances: np.ndarray, previous: int | None, hold: float) -> int:
    """The index of the smallest distance; `previous` while it is within `hold` of it, so a
    target between two remembered moments does not flicker from one to the other."""
    best = int(np.argmin(distances))
    return previous if previous is not None and distances[previous] <= distances[best] + hold else best
