"""The voice drives the face live: phones recognized as speech arrives, and the identity's
landmarks one frame at a time (what a voice agent's session renders, server/voice_session.py).

StreamingRecognizer feeds pocketsphinx's phone decoder 16 kHz speech in small pieces and reads
its best path so far (start_utt / process_raw / seg): the latest phones may still change as
more speech comes, so a caller reads the phones of a time only some lookahead after it. An
utterance ends at a pause (or every MAX_UTTERANCE seconds, at the next quiet 10 ms) and its
phones are then final.

StreamingAnimator is animate.VoiceAnimator for one frame at a time: the mouth from the phones
around the frame's time (coarticulation.mouth_track), the head's slow drift, blinks and
glances from schedules drawn as time goes on. Pure compute: arrays in, arrays out.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from ..landmarks import RIGID, iris_offsets, iris_reach
from ..retarget import place_irises
from .animate import (
    BLINK_EVERY,
    BLINK_SHAPE,
    GLANCE_EVERY,
    GLANCE_MOVE,
    GLANCE_SIZE,
    PITCH,
    PIVOT_DEPTH,
    ROLL,
    SHIFT,
    YAW,
)
from .coarticulation import REACH, mouth_track
from .recognize import FRAME, RATE, _decoder
from .rig import FaceRig
from .speech import Phone
from .visemes import VISEMES, Viseme

MAX_UTTERANCE = 20.0  # seconds: a longer stretch without a pause is ended at its next quiet 10 ms
PAUSE = 0.25  # seconds under QUIET end an utterance
QUIET = 300  # RMS of s16 samples under which 10 ms count as quiet


class StreamingRecognizer:
    """feed(pcm16k, at) -> the phones heard so far in the current utterance (times in the
    caller's seconds: `at` is where the first fed sample of an utterance plays); end() makes
    them final. One decoder; not thread-safe (one thread feeds it)."""

    def __init__(self):
        self.decoder = _decoder()
        self.start: float | None = None  # caller's time of the utterance's first sample
        self.samples = 0  # fed in this utterance
        self.quiet = 0  # samples of trailing quiet

    @property
    def active(self) -> bool:
        return self.start is not None

    def feed(self, pcm: np.ndarray, at: float) -> list[Phone]:
        """Speech (int16 mono at 16 kHz) that plays from `at` on. Returns the current
        utterance's phones (its last ones provisional), or [] if it ended here at a pause."""
        if self.start is None:
            self.decoder.start_utt()
            self.start, self.samples, self.quiet = at, 0, 0
        self.decoder.process_raw(np.ascontiguousarray(pcm, np.int16).tobytes(), False, False)
        self.samples += len(pcm)
        rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0
        self.quiet = self.quiet + len(pcm) if rms < QUIET else 0
        return self.phones()

    def should_end(self) -> bool:
        """At a pause, or a long utterance at its next quiet moment."""
        return self.active and self.samples > RATE * 0.5 and (
            self.quiet >= PAUSE * RATE or (self.samples > MAX_UTTERANCE * RATE and self.quiet > 0))

    def phones(self) -> list[Phone]:
        if self.start is None:
            return []
        return [Phone(self.start + s.start_frame * FRAME, self.start + (s.end_frame + 1) * FRAME, s.word)
                for s in (self.decoder.seg() or [])]

    def end(self) -> list[Phone]:
        """End the utterance: its final phones ([] if none was going)."""
        if self.start is None:
            return []
        self.decoder.end_utt()
        phones = self.phones()
        self.start = None
        return phones


class StreamingAnimator:
    """frame(t, phones) -> (478, 3) float32 target landmarks at time t (seconds, increasing),
    with the mouth of `phones` (those within a second of t are enough), the head's drift,
    blinks and glances. With no phones near t the mouth is closed."""

    def __init__(self, neutral: np.ndarray, seed: int = 0, visemes: dict[str, Viseme] = VISEMES):
        self.rig = FaceRig(neutral)
        self.visemes = visemes  # the mouth shapes: the identity's own (learn.own_visemes), or the general ones
        self.rng = np.random.default_rng(seed)
        self._gaze, self._reach = iris_offsets(self.rig.neutral), iris_reach(self.rig.neutral)
        self._pivot = self.rig.neutral[RIGID].mean(0) + np.array([0.0, 0.0, PIVOT_DEPTH * self.rig.unit])
        # Drift: (amplitude, period, phase) per wave, per axis (yaw, pitch, roll, x, y).
        self._waves = [[(a, p, self.rng.uniform(0, 2 * np.pi)) for a, p in axis]
                       for axis in (YAW, PITCH, ROLL, SHIFT, SHIFT)]
        self._blinks = [self.rng.uniform(0.5, BLINK_EVERY[0])]  # blink start times
        self._glances = [(0.0, np.zeros(2))]  # (time a glance begins, offset it moves to)
        self._glance_from = np.zeros(2)

    def frame(self, t: float, phones: list[Phone], openness=None) -> np.ndarray:
        """`openness`: the recognized speech's own (envelope.SoundOpenness), or None."""
        near = [p for p in phones if p.end > t - 2 * REACH and p.start < t + 2 * REACH]
        mouth = mouth_track(near, np.array([t]), visemes=self.visemes, openness=openness)
        shape = self.rig.pose(mouth, np.array([self._blink(t)]))[0]
        place_irises(shape, self._gaze + self._glance(t), self._reach)
        yaw, pitch, roll, x, y = (sum(a * math.sin(2 * math.pi * t / p + ph) for a, p, ph in axis)
                                  for axis in self._waves)
        turn = Rotation.from_euler("yxz", [yaw, pitch, roll], degrees=True).as_matrix()
        moved = (shape - self._pivot) @ turn.T + self._pivot
        moved[:, :2] += np.array([x, y]) * self.rig.unit
        return moved.astype(np.float32)

    def _blink(self, t: float) -> float:
        while self._blinks[-1] < t + 1:
            self._blinks.append(self._blinks[-1] + self.rng.uniform(*BLINK_EVERY))
        closing, shut, opening = BLINK_SHAPE
        return max(float(np.interp(t - s, [0, closing, closing + shut, closing + shut + opening], [0, 1, 1, 0],
                                   left=0, right=0)) for s in self._blinks[-3:])

    def _glance(self, t: float) -> np.ndarray:
        while self._glances[-1][0] < t:
            self._glances.append((self._glances[-1][0] + self.rng.uniform(*GLANCE_EVERY),
                                  self.rng.uniform(-1, 1, 2) * GLANCE_SIZE))
        # The last glance that began at or before t, moving from the one before it.
        k = max((i for i, (s, _) in enumerate(self._glances) if s <= t), default=0)
        start, target = self._glances[k]
        before = self._glances[k - 1][1] if k else target
        w = min(1.0, max(0.0, (t - start) / GLANCE_MOVE))
        del self._glances[:max(0, k - 1)]
        offset = before + (target - before) * w
        return np.repeat(offset[None], 2, axis=0)
