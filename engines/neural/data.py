"""Enrollment data: a self-scan video -> fixed-box crops and landmarks -> training pairs.

    frames + landmarks (tracking mode)  ->  one fixed crop box, from the reference frame
    (the most frontal, mouth-closed training frame)  ->  pairs
    (warp(reference, landmarks_i), contours_i, contours_{i-1}, rigid_head(reference, landmarks_i))
    -> ground-truth crop_i; the last HOLDOUT of the frames are never trained on.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..identity import (RENDER_SIZE, IdentityError, crop_corners, crop_with_box, face_box, output_side,
                        points_to_crop, scene_around)
from ..landmarks import (FACE_LEFT, FACE_RIGHT, LEFT_EYE_OUTER, RIGHT_EYE_OUTER, FaceLandmarker,
                         eye_openness, inter_ocular, mouth_openness)
from ..video import VideoError, read_video
from .config import HOLDOUT, IN_CHANNELS
from .regions import region_weights

log = logging.getLogger(__name__)

AUG_ROLL, AUG_SHIFT, AUG_SCALE = 8.0, 30.0, 0.06  # pose augmentation: degrees, 256² pixels, fraction


@dataclass
class ScanData:
    """A self-scan, cropped with one fixed box: crops (N, 256, 256, 3) uint8, points (N, 478, 3)
    in crop pixels, the video frame index of each, and which one is the reference."""
    crops: np.ndarray
    points: np.ndarray
    frame_index: np.ndarray
    n_train: int
    reference: int  # index into crops (always < n_train)
    box: tuple[float, float, float]  # x0, y0, side in video pixels
    n_decoded: int
    # The reference's video frame around the face (engines.identity.scene_around): where a
    # call frame pastes the avatar back. None for data made otherwise (tests).
    scene: tuple[np.ndarray, tuple[float, float, float, float]] | None = None
    # The reference frame's crop at the box's own side in the video (identity.output_side: at
    # most 512, at least 256): the reference of a larger output. None for data made otherwise.
    large: np.ndarray | None = None


def read_frames(video: Path, limit: int | None = None, max_pixels: int | None = None) -> Iterator[np.ndarray]:
    """engines.video.read_video, a bad video reported as IdentityError: what callers of
    enroll and eval catch, as for every other unusable input."""
    try:
        yield from read_video(video, limit, max_pixels)
    except VideoError as e:
        raise IdentityError(str(e)) from None


def frontal_score(p: np.ndarray) -> float:
    """Lower is better: head turned (cheek asymmetry, eye depth difference), mouth open, eyes
    shut, eyes not looking ahead. The reference's gaze is the avatar's resting gaze: a
    self-scan frame where the eyes converge on the phone's screen made every avatar cross-eyed."""
    from ..retarget import eye_geometry

    io = max(inter_ocular(p), 1e-6)
    nose = p[1, :2]
    yaw = abs(np.linalg.norm(p[FACE_LEFT, :2] - nose) - np.linalg.norm(p[FACE_RIGHT, :2] - nose)) / io
    depth = abs(p[LEFT_EYE_OUTER, 2] - p[RIGHT_EYE_OUTER, 2]) / io
    roll = abs(math.atan2(p[LEFT_EYE_OUTER, 1] - p[RIGHT_EYE_OUTER, 1],
                          p[LEFT_EYE_OUTER, 0] - p[RIGHT_EYE_OUTER, 0]))
    gaze = float(np.abs(eye_geometry(p)[1][:, 0]).sum())  # irises off their eyes' middles, in eye widths
    return yaw + depth + roll + 3.0 * mouth_openness(p) + max(0.0, 0.25 - eye_openness(p)) * 4.0 + 4.0 * gaze


def extract(video: Path, max_frames: int | None = None, progress: bool = True, report=None,
            max_pixels: int | None = None) -> ScanData:
    """Landmarks of every frame, then one crop box for all of them, chosen on a training
    frame: a box that moved with the head would hide the head motion the generator must learn.

    Two passes over the video, so no frame is ever kept at its recorded size: the first keeps
    only the landmarks, the second keeps only each frame's RENDER_SIZE crop, cut from the
    frame as decoded (the same crops as from frames held whole). Held whole, 40 s of
    1080x1920 took 7.5 GB; cropped, about 240 MB whatever the resolution.
    report("extracting", frames read, max_frames), if given, after each frame of the first
    pass; `max_pixels` bounds every frame's size (IdentityError past it)."""
    points, index, n = find_landmarks(video, max_frames, progress, report, max_pixels)
    if n == 0:
        raise IdentityError(f"{video}: no frames could be decoded")
    if len(points) < 10:
        raise IdentityError(f"{video}: a face was found in only {len(points)} of {n} frames; "
                            "record a well-lit video of one person facing the camera")
    if len(points) < 0.5 * n:
        log.warning("a face was found in only %d of %d frames", len(points), n)
    # Hold out the last frames in video order: what comes after is never seen in training.
    n_train = int(round(len(points) * (1 - HOLDOUT)))
    ref = int(np.argmin([frontal_score(p) for p in points[:n_train]]))
    box = face_box(points[ref])
    crops, scene, large = crop_frames(video, index, box, progress, max_pixels, scene_at=index[ref])
    pts = points_to_crop(np.stack(points), *box)
    return ScanData(crops, pts, np.array(index), n_train, ref, box, n, scene, large)


def find_landmarks(video: Path, max_frames: int | None, progress: bool, report,
                   max_pixels: int | None) -> tuple[list[np.ndarray], list[int], int]:
    """The first pass: the landmarks of the frames with a face, their frame indices, and
    how many frames were read."""
    from tqdm import tqdm

    points, index = [], []
    n, size = 0, None
    with FaceLandmarker(static=False) as lm:
        for i, rgb in enumerate(tqdm(read_frames(video, max_frames, max_pixels), desc="landmarks",
                                     unit="frame", disable=not progress, total=max_frames)):
            size = size or rgb.shape
            if rgb.shape != size:  # one crop box, in video pixels, serves every frame
                raise IdentityError(f"{video}: the frame size changes from {size[1]}x{size[0]} to "
                                    f"{rgb.shape[1]}x{rgb.shape[0]} at frame {i + 1}; record again "
                                    "without switching cameras")
            n += 1
            if report is not None:
                report("extracting", n, max_frames)
            p = lm(rgb)
            if p is not None:
                points.append(p)
                index.append(i)
    return points, index, n


def crop_frames(video: Path, index: list[int], box: tuple[float, float, float], progress: bool,
                max_pixels: int | None, scene_at: int | None = None):
    """The second pass: the crop of each frame in `index` (ascending), as it is decoded, and
    the scene around the box in frame `scene_at` (scene_around: at most 1920 px) and that
    frame's crop at output_side, if asked."""
    from tqdm import tqdm

    crops = np.empty((len(index), RENDER_SIZE, RENDER_SIZE, 3), np.uint8)
    scene, large, k = None, None, 0
    for i, rgb in enumerate(tqdm(read_frames(video, index[-1] + 1, max_pixels), desc="crops", unit="frame",
                                 disable=not progress, total=index[-1] + 1)):
        if i == scene_at:
            scene = scene_around(rgb, crop_corners(*box))
            large = crop_with_box(rgb, *box, output_side(box[2]))
        if i == index[k]:
            crops[k] = crop_with_box(rgb, *box)
            k += 1
    if k < len(index):  # decoding is deterministic: only a file changed meanwhile gets here
        raise IdentityError(f"{video}: changed while it was read (frame {index[k]} is gone)")
    return crops, scene, large


class PairBuilder:
    """Network inputs and targets for scan frames (warps computed once and cached)."""

    def __init__(self, data: ScanData):
        from ..render.eyes import EyeMemory
        from ..render.mouth import MouthMemory
        from ..render.warp import WarpRenderer
        from .model import contour_map, still_input

        self.data = data
        ref = data.reference
        self.reference = data.crops[ref]
        self.neutral = data.points[ref]
        # Training frames only: a held-out frame's own mouth must not be in its memory.
        frames, points = data.crops[:data.n_train], data.points[:data.n_train]
        self.memories = {"mouth_memory": MouthMemory.build(frames, points), "eye_memory": EyeMemory.build(frames, points)}
        self.warp = warp = WarpRenderer(self.reference, self.neutral, *self.memories.values())
        self.still = still_input(self.reference, self.neutral)
        self.warps = np.stack([warp.render(p) for p in data.points])
        self.rigids = np.stack([warp.render_rigid(p) for p in data.points])
        self.maps = np.stack([(contour_map(p) * 255).astype(np.uint8) for p in data.points])
        self.weights = np.stack([region_weights(p).astype(np.uint8) for p in data.points])

    def inputs(self, idx: np.ndarray) -> np.ndarray:
        """The batch's network inputs, laid out as model.make_input does for one frame."""
        d = self.data
        prev = np.array([i - 1 if i > 0 and d.frame_index[i - 1] == d.frame_index[i] - 1 else i for i in idx])
        x = np.empty((len(idx), IN_CHANNELS, RENDER_SIZE, RENDER_SIZE), np.float32)
        x[:, :3] = self.warps[idx].transpose(0, 3, 1, 2) / 127.5 - 1.0
        x[:, 3] = self.maps[idx] / 255.0
        x[:, 4] = self.maps[prev] / 255.0
        x[:, 5:8] = self.rigids[idx].transpose(0, 3, 1, 2) / 127.5 - 1.0
        x[:, 8:] = self.still
        return x

    def targets(self, idx: np.ndarray) -> np.ndarray:
        return self.data.crops[idx].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0

    def batch(self, idx: np.ndarray, rng: np.random.Generator, augment: float = 0.0):
        """Training inputs, targets and region weights; with probability `augment` a sample
        is moved by a random similarity (frame and landmarks alike) and its warps re-rendered;
        the still reference moves with the frame, as the frame's background did.

        Why: a self-scan covers few head positions, and held-out frames leave them (in
        selfscan_a the head moves 30 px further and rolls 7° more than in any training
        frame). The warp of a moved head stretches its surroundings differently; without
        examples of that the generator's corrections do not carry over.
        """
        from .model import contour_map, make_input

        x, y = self.inputs(idx), self.targets(idx)
        w = self.weights[idx].astype(np.float32)
        size = (RENDER_SIZE, RENDER_SIZE)
        for k, i in enumerate(idx):
            if rng.random() >= augment:
                continue
            m = cv2.getRotationMatrix2D((RENDER_SIZE / 2, RENDER_SIZE / 2), rng.uniform(-AUG_ROLL, AUG_ROLL),
                                        1 + rng.uniform(-AUG_SCALE, AUG_SCALE))
            m[:, 2] += rng.uniform(-AUG_SHIFT, AUG_SHIFT, 2)
            p = self.data.points[i].copy()
            p[:, :2] = p[:, :2] @ m[:, :2].T + m[:, 2]
            p[:, 2] *= np.hypot(m[0, 0], m[0, 1])
            truth = cv2.warpAffine(self.data.crops[i], m, size, flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
            prev_map = cv2.warpAffine(x[k, 4], m, size, flags=cv2.INTER_LINEAR)
            still = cv2.warpAffine(self.still.transpose(1, 2, 0), m, size, flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE).transpose(2, 0, 1)
            x[k] = make_input(self.warp.render(p), self.warp.render_rigid(p), contour_map(p), prev_map, still)[0]
            y[k] = truth.transpose(2, 0, 1) / 127.5 - 1.0
            w[k] = region_weights(p)
        return x, y, w[:, None]
