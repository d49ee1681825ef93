"""Face landmarks with mediapipe FaceMesh: 478 points (468 mesh + 10 iris), in pixels.

Points are (x, y, z) with x, y in pixels of the input image and z in the same units
(mediapipe scales z like x), so 3-D similarity fits are meaningful.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

import numpy as np

NUM_POINTS = 478

# Landmark indices of mediapipe's canonical face mesh used across the engines.
LEFT_EYE_OUTER, LEFT_EYE_INNER = 263, 362  # subject's left eye (image right)
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 33, 133
LEFT_EYE_TOP, LEFT_EYE_BOTTOM = 386, 374
RIGHT_EYE_TOP, RIGHT_EYE_BOTTOM = 159, 145
RIGHT_IRIS = [468, 469, 470, 471, 472]  # subject's right eye (image left, corners 33/133): centre, then its ring
LEFT_IRIS = [473, 474, 475, 476, 477]  # subject's left eye (image right, corners 362/263)
IRISES = np.array([RIGHT_IRIS, LEFT_IRIS])
# Per eye (right, left, as in IRISES): the image-left corner, then the image-right corner.
EYE_CORNERS = np.array([[RIGHT_EYE_OUTER, RIGHT_EYE_INNER], [LEFT_EYE_INNER, LEFT_EYE_OUTER]])
MOUTH_TOP, MOUTH_BOTTOM = 13, 14  # inner lips
MOUTH_LEFT, MOUTH_RIGHT = 308, 78  # inner lip corners
FACE_LEFT, FACE_RIGHT = 454, 234  # cheek extremes
INNER_LIPS = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95]
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
# Points that barely move with expression (forehead, nose bridge, temples, eye corners):
# head pose is fitted on these so that a smile or an open jaw does not read as a head turn.
RIGID = [10, 109, 67, 103, 338, 297, 332, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1,
         234, 127, 93, 454, 356, 323, 33, 133, 362, 263, 130, 359, 116, 345]


def inter_ocular(points: np.ndarray) -> float:
    """Distance between the outer eye corners: the face's natural unit of length."""
    return float(np.linalg.norm(points[LEFT_EYE_OUTER, :2] - points[RIGHT_EYE_OUTER, :2]))


def mouth_openness(points: np.ndarray) -> float:
    """Inner-lip gap over mouth width: 0 closed, ~0.5+ wide open. Scale-free."""
    gap = np.linalg.norm(points[MOUTH_TOP, :2] - points[MOUTH_BOTTOM, :2])
    width = np.linalg.norm(points[MOUTH_LEFT, :2] - points[MOUTH_RIGHT, :2])
    return float(gap / max(width, 1e-6))


def eye_openness(points: np.ndarray) -> float:
    """Mean lid gap of both eyes over eye width. Scale-free."""
    def one(top, bottom, a, b):
        gap = np.linalg.norm(points[top, :2] - points[bottom, :2])
        return gap / max(np.linalg.norm(points[a, :2] - points[b, :2]), 1e-6)
    return float((one(LEFT_EYE_TOP, LEFT_EYE_BOTTOM, LEFT_EYE_OUTER, LEFT_EYE_INNER)
                  + one(RIGHT_EYE_TOP, RIGHT_EYE_BOTTOM, RIGHT_EYE_OUTER, RIGHT_EYE_INNER)) / 2)


def eye_frames(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each eye's frame, per eye as in IRISES: the corners' midpoint (2, 2), the unit axis
    from the image-left to the image-right corner (2, 2), and the eye's width (2,)."""
    a, b = points[EYE_CORNERS[:, 0], :2].astype(np.float64), points[EYE_CORNERS[:, 1], :2].astype(np.float64)
    axis = b - a
    width = np.maximum(np.hypot(axis[:, 0], axis[:, 1]), 1e-6)
    return (a + b) / 2, axis / width[:, None], width


def iris_centres(points: np.ndarray) -> np.ndarray:
    """(2, 2): each iris's centre, the mean of its five points (right eye first)."""
    return points[IRISES, :2].astype(np.float64).mean(1)


def iris_offsets(points: np.ndarray) -> np.ndarray:
    """(2, 2) gaze measure, per eye (right, left): the iris centre relative to the midpoint of
    the eye corners, along the corner axis (x, towards image right) and across it (y,
    downwards), in eye widths. Scale- and roll-free; about +-0.25 at the extremes in x."""
    mid, axis, width = eye_frames(points)
    d = iris_centres(points) - mid
    across = np.stack([-axis[:, 1], axis[:, 0]], 1)
    return np.stack([(d * axis).sum(1), (d * across).sum(1)], 1) / width[:, None]


def iris_reach(points: np.ndarray, margin: float = 0.03) -> np.ndarray:
    """(2,): how far each iris centre of this face may go along its eye from the middle, in
    eye widths, so that the iris's edge stops `margin` eye widths short of the corner (and
    never less than where it is in `points`)."""
    _, _, width = eye_frames(points)
    ring = points[IRISES[:, 1:], :2].astype(np.float64) - iris_centres(points)[:, None]
    radius = np.hypot(ring[..., 0], ring[..., 1]).mean(1) / width
    rest = np.abs(iris_offsets(points)[:, 0])
    return np.maximum(0.5 - radius - margin, rest + 0.01)


# What mediapipe's native code writes to stderr as a FaceMesh starts and reads its first
# image: five lines that say nothing to a user, once per session in a server's log (the
# environment variables glog and TensorFlow read do not reach its absl logging).
START_UP_CHATTER = re.compile(r"Created TensorFlow Lite XNNPACK delegate|before absl::InitializeLog"
                              r"|inference_feedback_manager\.cc|landmark_projection_calculator\.cc")
_STDERR_SWAP = threading.Lock()  # overlapping swaps would leave descriptor 2 on a closed file


@contextlib.contextmanager
def start_up_chatter_dropped():
    """Lines written to file descriptor 2 meanwhile go to stderr afterwards, but for those
    matching START_UP_CHATTER. (Native code writes to the descriptor, past sys.stderr.) The
    descriptor is the process's: other threads' lines are held back until the end too."""
    with _STDERR_SWAP, tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not START_UP_CHATTER.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class FaceLandmarker:
    """One face's landmarks per image, or None when there is no face.

    static=False is tracking mode for video (fast: it tracks from the previous frame);
    static=True detects afresh on every image, for photos.
    """

    def __init__(self, static: bool = False, min_confidence: float = 0.5):
        import mediapipe as mp  # imported lazily: it takes a second to load

        with start_up_chatter_dropped():
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
            )
            # The graph starts its models on its own threads: one image, waited for, has
            # them all logged here (and the first real frame does not wait for them).
            self._mesh.process(np.zeros((64, 64, 3), np.uint8))
        self._face_seen = False  # the first face still logs a start-up line

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        """(478, 3) float32 pixel coordinates for an RGB uint8 image, or None if no face."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        with contextlib.nullcontext() if self._face_seen else start_up_chatter_dropped():
            result = self._mesh.process(np.ascontiguousarray(rgb))
        self._face_seen = self._face_seen or bool(result.multi_face_landmarks)
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        pts = np.array([(p.x, p.y, p.z) for p in lm], dtype=np.float32)
        pts *= np.array([w, h, w], dtype=np.float32)
        return pts

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
