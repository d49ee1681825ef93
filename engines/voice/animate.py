"""Speech to the identity's landmarks, frame by frame: the mouth from the phones
(coarticulation.py), on the face rig (rig.py), with the life a still face lacks: the head
drifting slowly and a little (a few slow sine waves per axis, never repeating exactly), a blink
every 2 to 6 seconds and the eyes' small glances. The result is what retargeting gives the
renderer from a driver's face: (478, 3) points in the identity's reference pixels."""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from ..landmarks import RIGID, iris_offsets, iris_reach
from ..retarget import place_irises
from .coarticulation import mouth_track
from .rig import FaceRig
from .speech import Phone
from .visemes import VISEMES, Viseme

FPS = 30
# Head drift: per axis, (amplitude, period in seconds) of the sine waves that add up to it.
YAW = ((1.6, 7.3), (0.6, 3.1))  # degrees
PITCH = ((1.0, 5.7), (0.4, 2.3))
ROLL = ((0.7, 9.1), (0.3, 4.3))
SHIFT = ((0.010, 6.1), (0.004, 2.9))  # inter-ocular distances, each of x and y
PIVOT_DEPTH = 0.8  # the head turns about a point this far behind its rigid points (inter-ocular distances)
BLINK_EVERY = (2.0, 6.0)  # seconds between blinks, uniformly
BLINK_SHAPE = (0.08, 0.05, 0.15)  # seconds closing, shut, opening
GLANCE_EVERY = (1.0, 4.0)  # seconds between small gaze shifts
GLANCE_SIZE = (0.03, 0.012)  # eye widths, along and across the eye
GLANCE_MOVE = 0.05  # seconds a glance takes


class VoiceAnimator:
    """frames(phones, duration) -> (F, 478, 3) float32 target landmarks at FPS for one identity."""

    def __init__(self, neutral: np.ndarray, seed: int = 0, fps: int = FPS, visemes: dict[str, Viseme] = VISEMES):
        self.rig = FaceRig(neutral)
        self.fps = fps
        self.seed = seed
        self.visemes = visemes  # the mouth shapes: the identity's own (learn.own_visemes), or the general ones
        self._gaze, self._reach = iris_offsets(self.rig.neutral), iris_reach(self.rig.neutral)
        self._pivot = self.rig.neutral[RIGID].mean(0) + np.array([0.0, 0.0, PIVOT_DEPTH * self.rig.unit])

    def frame_times(self, duration: float) -> np.ndarray:
        return np.arange(max(1, math.ceil(duration * self.fps))) / self.fps

    def frames(self, phones: list[Phone], duration: float, openness=None) -> np.ndarray:
        """`openness`: recognized speech's own (Speech.openness), blended into the mouth's gap."""
        times = self.frame_times(duration)
        rng = np.random.default_rng(self.seed)
        shapes = self.rig.pose(mouth_track(phones, times, visemes=self.visemes, openness=openness))
        for shape, offset in zip(shapes, glances(times, rng)):  # irises placed in the open eyes
            place_irises(shape, self._gaze + offset, self._reach)
        shapes += blinks(times, rng)[:, None, None] * self.rig.blink_field
        return self._posed(shapes, times, rng).astype(np.float32)

    def _posed(self, shapes: np.ndarray, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        angles = np.stack([drift(times, waves, rng) for waves in (YAW, PITCH, ROLL)], 1)
        turn = Rotation.from_euler("yxz", angles, degrees=True).as_matrix()  # (F, 3, 3)
        shift = np.stack([drift(times, SHIFT, rng), drift(times, SHIFT, rng), np.zeros_like(times)], 1)
        moved = np.einsum("fij,fpj->fpi", turn, shapes - self._pivot) + self._pivot
        return moved + shift[:, None, :] * self.rig.unit


def drift(times: np.ndarray, waves, rng: np.random.Generator) -> np.ndarray:
    """A slow wander: sine waves of the given (amplitude, period), at random phases."""
    return sum(a * np.sin(2 * np.pi * times / p + rng.uniform(0, 2 * np.pi)) for a, p in waves)


def blinks(times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(F,): how shut the eyes are (0 open, 1 shut), a blink every BLINK_EVERY seconds."""
    closing, shut, opening = BLINK_SHAPE
    out = np.zeros(len(times))
    start = rng.uniform(0.5, BLINK_EVERY[0])
    while start < times[-1] + 1:
        dt = times - start
        out = np.maximum(out, np.interp(dt, [0, closing, closing + shut, closing + shut + opening], [0, 1, 1, 0],
                                        left=0, right=0))
        start += rng.uniform(*BLINK_EVERY)
    return out


def glances(times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(F, 2, 2): each iris's offset from where the neutral face looks, in eye widths, both eyes
    together: held, then moved in GLANCE_MOVE to a new small offset every GLANCE_EVERY seconds."""
    knots_t, knots = [0.0], [np.zeros(2)]
    while knots_t[-1] < times[-1]:
        at = knots_t[-1] + rng.uniform(*GLANCE_EVERY)
        knots_t += [at, at + GLANCE_MOVE]
        knots += [knots[-1], rng.uniform(-1, 1, 2) * GLANCE_SIZE]
    knots = np.array(knots)
    path = np.stack([np.interp(times, knots_t, knots[:, k]) for k in (0, 1)], 1)
    return np.repeat(path[:, None, :], 2, axis=1)
