"""Motion transfer from a driver's face to an identity's face.

Each driver frame is split into head pose (a 3-D similarity fitted on the rigid points)
and expression (what is left once the pose is undone, relative to the driver's own
neutral). The expression is carried over into the identity's frame and added to the
identity's neutral shape, then the identity is posed the way the driver moved. A driver
with a wide face therefore moves a narrow identity without widening it.

Gaze is carried over in each eye's own frame: the driver's iris offset from its eye
corners, in eye widths, relative to the driver's neutral (a winking eye takes the open
eye's), is added to the identity's own offset and the identity's irises are placed
there, kept inside the eye opening.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .render import geometry
from .landmarks import IRISES, LEFT_IRIS, RIGHT_IRIS, RIGID, inter_ocular, iris_offsets, iris_reach
from .render.mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER

# Per eye (as in IRISES): its upper and lower lid, each from the image-left to the image-right
# corner, then its iris.
EYE_POINTS = np.array([RIGHT_EYE_UPPER + RIGHT_EYE_LOWER + RIGHT_IRIS,
                       LEFT_EYE_UPPER[::-1] + LEFT_EYE_LOWER[::-1] + LEFT_IRIS])


GAIN_RANGE = (0.0, 2.0)  # 0: no motion, 1: the driver's, 2: exaggerated
VERGENCE = 0.3  # share of the difference between the eyes' horizontal turns kept (_gaze_change)


def check_gain(name: str, value: object) -> float:
    """`value` if it is a number in GAIN_RANGE, else ValueError naming `name`. Compares
    before any float conversion, so NaN, infinities and 400-digit integers fail cleanly."""
    low, high = GAIN_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}")
    return value


@dataclass
class RetargetControls:
    expression_gain: float = 1.0  # GAIN_RANGE: 0 (poker face) .. 2 (exaggerated)
    head_gain: float = 1.0  # GAIN_RANGE; scales turn, nod, roll and shift
    freeze_head: bool = False

    def validated(self) -> "RetargetControls":
        for name in ("expression_gain", "head_gain"):
            check_gain(name, getattr(self, name))
        return self


class OneEuroFilter:
    """Casiez et al.'s One Euro filter over a whole landmark array.

    Slow motion gets a low cut-off (jitter removed), fast motion a high one (no lag).
    Speeds are measured in inter-ocular distances per second, so the same settings work
    for a face 80 or 400 pixels wide.
    """

    def __init__(self, min_cutoff: float = 1.5, beta: float = 4.0, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x = self._dx = self._t = None

    @staticmethod
    def _alpha(cutoff, dt):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, unit: float = 1.0) -> np.ndarray:
        if self._x is None or t <= self._t:
            self._x, self._dx, self._t = x.astype(np.float64), np.zeros_like(x, np.float64), t
            return x
        dt = t - self._t
        dx = (x - self._x) / dt
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * dx + (1 - a_d) * self._dx
        speed = np.linalg.norm(self._dx, axis=-1, keepdims=True) / max(unit, 1e-6)
        cutoff = self.min_cutoff + self.beta * speed
        a = 1.0 / (1.0 + (1.0 / (2 * np.pi * cutoff)) / dt)
        self._x = a * x + (1 - a) * self._x
        self._t = t
        return self._x.astype(x.dtype)


def eye_geometry(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both eyes (as in IRISES) in their own frames: from the corners' midpoint, in eye widths,
    along the eye (towards image right) and across it (downwards). Returns per eye the lids
    (2, 2 lids, 9 points, 2) and the iris centre (2, 2: what iris_offsets measures), and
    the way back to pixels (2, 3, 2): rows mid, a, b with pixel = mid + along * a + across * b."""
    p = points[EYE_POINTS, :2].astype(np.float64)  # (2 eyes, 23 points, 2)
    mid = (p[:, 0] + p[:, 8]) * 0.5
    to_px = np.empty((2, 3, 2))
    to_px[:, 0] = mid
    to_px[:, 1] = p[:, 8] - p[:, 0]  # along: the corner-to-corner vector, one eye width long
    to_px[:, 2, 0], to_px[:, 2, 1] = -to_px[:, 1, 1], to_px[:, 1, 0]  # across: it, turned to point down
    to_eye = to_px[:, 1:].transpose(0, 2, 1) / (to_px[:, 1] ** 2).sum(1)[:, None, None]
    local = (p - mid[:, None]) @ to_eye
    return local[:, :18].reshape(2, 2, 9, 2), local[:, 18:].sum(1) * 0.2, to_px


def place_irises(points: np.ndarray, offsets: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """Move each iris (its five points together) of `points` (in place) so that its centre
    sits at `offsets` (per eye, as iris_offsets measures them) in points' own eyes, kept
    inside the eye opening: along the eye within +-reach, across it between the lids."""
    lids, now, to_px = eye_geometry(points)
    want = np.empty((2, 2))
    for k, ((x, y), r) in enumerate(zip(offsets.tolist(), reach.tolist())):
        x = min(max(x, -r), r)
        top, bottom = (float(np.interp(x, np.maximum.accumulate(lid[:, 0]), lid[:, 1])) for lid in lids[k])
        want[k] = x, (min(max(y, top), bottom) if top <= bottom else (top + bottom) * 0.5)
    shift = ((want - now)[:, None] @ to_px[:, 1:])[:, 0]
    points[IRISES, :2] += shift[:, None]
    return points


class Retargeter:
    """Turns a stream of driver landmarks into target landmarks for one identity.

    update() takes the driver's (478, 3) points, or None when no face was found, with the
    frame time in seconds, and returns the identity's (478, 3) points in the identity
    image's pixels. The driver's neutral is the mean of its first `calibration_frames`
    faces; recalibrate() starts that again (e.g. when a new person sits down).
    """

    def __init__(self, identity_neutral: np.ndarray, controls: RetargetControls | None = None,
                 calibration_frames: int = 10, ease_seconds: float = 0.4, smoothing: bool = True):
        self.identity_neutral = identity_neutral.astype(np.float64)
        self._identity_gaze, self._reach = iris_offsets(self.identity_neutral), iris_reach(self.identity_neutral)
        self.controls = (controls or RetargetControls()).validated()
        self.calibration_frames = calibration_frames
        self.ease_seconds = ease_seconds
        self.filter = OneEuroFilter() if smoothing else None
        self._center = self.identity_neutral[RIGID].mean(0)
        self.recalibrate()

    def recalibrate(self) -> None:
        self._calib: list[np.ndarray] = []
        self._driver_neutral: np.ndarray | None = None
        self._driver_gaze: np.ndarray | None = None
        self._to_identity: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self._last_t: float | None = None
        if self.filter:
            self.filter.reset()

    @property
    def calibrated(self) -> bool:
        return len(self._calib) >= self.calibration_frames

    def set_identity(self, identity_neutral: np.ndarray) -> None:
        """Switch identity, keeping the driver's calibration."""
        self.identity_neutral = identity_neutral.astype(np.float64)
        self._identity_gaze, self._reach = iris_offsets(self.identity_neutral), iris_reach(self.identity_neutral)
        self._center = self.identity_neutral[RIGID].mean(0)
        self._to_identity = None if self._driver_neutral is None else self._fit_to_identity()
        self._last = None

    def update(self, driver: np.ndarray | None, t: float) -> np.ndarray:
        if driver is None:
            return self._ease_to_neutral(t)
        pts = driver.astype(np.float64)
        if self.filter:
            pts = self.filter(pts, t, unit=inter_ocular(pts))
        self._calibrate(pts)
        out = self._transfer(pts)
        self._last, self._last_t = out, t
        return out.astype(np.float32)

    def _calibrate(self, pts: np.ndarray) -> None:
        if self.calibrated:
            return
        if self._calib:  # align to the first calibration face so head sway does not blur the mean
            pts = geometry.apply(geometry.fit_similarity(pts[RIGID], self._calib[0][RIGID]), pts)
        self._calib.append(pts)
        self._driver_neutral = np.mean(self._calib, axis=0)
        self._driver_gaze = iris_offsets(self._driver_neutral)
        self._to_identity = self._fit_to_identity()

    def _fit_to_identity(self) -> np.ndarray:
        return geometry.fit_similarity(self._driver_neutral[RIGID], self.identity_neutral[RIGID])

    def _transfer(self, pts: np.ndarray) -> np.ndarray:
        neutral, to_id, c = self._driver_neutral, self._to_identity, self.controls
        pose = geometry.fit_similarity(neutral[RIGID], pts[RIGID])  # driver neutral -> now
        expression = geometry.apply(np.linalg.inv(pose), pts) - neutral
        expression_id = expression @ to_id[:3, :3].T * c.expression_gain
        shape = self.identity_neutral + expression_id
        if not c.freeze_head:
            pose_id = to_id @ pose @ np.linalg.inv(to_id)  # the same head motion, in identity space
            if c.head_gain != 1.0:
                pose_id = geometry.scale_motion(pose_id, self._center, c.head_gain)
            shape = geometry.apply(pose_id, shape)
        # Gaze, in the eyes' own frames: the expression above moved the irises with the
        # identity's head scale, not its eye size, and could push them onto the lids.
        return place_irises(shape, self._identity_gaze + self._gaze_change(pts) * c.expression_gain, self._reach)

    def _gaze_change(self, pts: np.ndarray) -> np.ndarray:
        """(2, 2): how far each of the driver's eyes turned from its neutral, in eye widths.
        Eyes turn together: the two eyes' horizontal turns differ mostly by landmark noise
        (correlation 0.94 on drive_expressive, their difference 0.04 eye widths), which drew
        a cross-eyed avatar when one eye's noise added to a photo's own slight convergence;
        so only VERGENCE of the difference is kept (a driver crossing their eyes still
        shows). An eye much less open than the other (a wink: lid gap over width ~0.3 open,
        under 0.1 shut) takes the other eye's turn instead of its own, a guess under the lid."""
        lids, iris, _ = eye_geometry(pts)
        change = iris - self._driver_gaze
        gap = np.sqrt(((lids[:, 0, 1:-1] - lids[:, 1, 1:-1]) ** 2).sum(-1)).sum(1) / 7
        right, left = (min(max((g - 0.08) / 0.15, 0.0), 1.0) for g in gap.tolist())
        if right != left:
            borrow = np.array([[max(left - right, 0.0)], [max(right - left, 0.0)]])
            change = change + borrow * (change[::-1] - change)
        together = change[:, 0].mean()
        change[:, 0] = together + VERGENCE * (change[:, 0] - together)
        return change

    def _ease_to_neutral(self, t: float) -> np.ndarray:
        """Face lost: glide back to the identity's neutral instead of freezing or jumping."""
        if self._last is None:
            return self.identity_neutral.astype(np.float32)
        dt = max(0.0, t - self._last_t)
        keep = math.exp(-dt / self.ease_seconds)
        self._last = self.identity_neutral + (self._last - self.identity_neutral) * keep
        self._last_t = t
        if self.filter:
            self.filter.reset()  # do not smooth from a stale face when it comes back
        return self._last.astype(np.float32)
