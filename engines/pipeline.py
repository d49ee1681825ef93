"""One avatar stream: driver frame -> landmarks -> retargeted landmarks -> identity frame.

The three stages are separate methods so a caller can overlap them (landmarks of frame
n+1 while frame n renders); process() runs them in order and times each.
"""
from __future__ import annotations

import logging

import numpy as np

from .identity import Identity
from .landmarks import FaceLandmarker
from .measure import StageTimer
from .retarget import RetargetControls, Retargeter
from .warp import WarpRenderer

log = logging.getLogger(__name__)


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
    return WarpRenderer.for_identity(identity)


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

    def process(self, rgb: np.ndarray, t: float) -> tuple[np.ndarray, dict[str, float]]:
        """The avatar frame for one driver frame, and ms per stage (landmarks, retarget, render)."""
        timer = StageTimer()
        points = timer.run("landmarks", self.detect, rgb)
        target = timer.run("retarget", self.retarget, points, t)
        return timer.run("render", self.render, target), timer.ms

    def close(self) -> None:
        self.landmarker.close()
