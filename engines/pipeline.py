"""One avatar stream: driver frame -> landmarks -> retargeted landmarks -> identity frame.

The three stages are separate methods so a caller can overlap them (landmarks of frame
n+1 while frame n renders); process() runs them in order and times each.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .identity import Identity
from .landmarks import FaceLandmarker
from .retarget import RetargetControls, Retargeter
from .warp import WarpRenderer

log = logging.getLogger(__name__)


@dataclass
class StageTimes:
    landmarks_ms: float = 0.0
    retarget_ms: float = 0.0
    render_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.landmarks_ms + self.retarget_ms + self.render_ms


def make_renderer(identity: Identity):
    """The identity's renderer: its trained generator for engine "neural", else the warp.

    A neural bundle whose model cannot run here falls back to the warp (one log line)."""
    if identity.engine == "neural":
        from .neural.runtime import NeuralRenderer, RuntimeUnavailable

        try:
            return NeuralRenderer(identity)
        except (RuntimeUnavailable, ImportError, OSError) as e:
            log.warning("identity %r: neural engine unavailable (%s); rendering with the warp engine",
                        identity.name, e)
    return WarpRenderer(identity.reference, identity.neutral)


class AvatarPipeline:
    def __init__(self, identity: Identity, controls: RetargetControls | None = None,
                 smoothing: bool = True):
        self.landmarker = FaceLandmarker(static=False)
        self.identity = identity
        self.renderer = make_renderer(identity)
        self.retargeter = Retargeter(identity.neutral, controls, smoothing=smoothing)
        self.face_found = False

    @property
    def controls(self) -> RetargetControls:
        return self.retargeter.controls

    def set_controls(self, controls: RetargetControls) -> None:
        self.retargeter.controls = controls.validated()

    def set_identity(self, identity: Identity) -> None:
        self.renderer = make_renderer(identity)
        self.retargeter.set_identity(identity.neutral)
        self.identity = identity

    def recalibrate(self) -> None:
        self.retargeter.recalibrate()

    def detect(self, rgb: np.ndarray) -> np.ndarray | None:
        points = self.landmarker(rgb)
        self.face_found = points is not None
        return points

    def retarget(self, points: np.ndarray | None, t: float) -> np.ndarray:
        return self.retargeter.update(points, t)

    def render(self, target: np.ndarray) -> np.ndarray:
        return self.renderer.render(target)

    def process(self, rgb: np.ndarray, t: float) -> tuple[np.ndarray, StageTimes]:
        times = StageTimes()
        t0 = time.perf_counter()
        points = self.detect(rgb)
        t1 = time.perf_counter()
        target = self.retarget(points, t)
        t2 = time.perf_counter()
        out = self.render(target)
        t3 = time.perf_counter()
        times.landmarks_ms, times.retarget_ms, times.render_ms = (
            (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        return out, times

    def close(self) -> None:
        self.landmarker.close()
