"""One avatar stream: driver frame -> landmarks -> retargeted landmarks -> identity frame.

The stages are separate methods so a caller can overlap them on two threads; process()
runs them in order and times each. Rendering itself comes in two halves, prepare() and
finish() (render() = both): the first is numpy/OpenCV glue that holds Python's GIL in
many short steps (for the neural engine: the warp and the network's input), the second
is one long call that releases it (the generator). A live session puts the first half
beside the landmarks and the second on its own thread, so neither thread does most of
the work while the other idles.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .identity import Identity
from .landmarks import FaceLandmarker
from .measure import StageTimer
from .retarget import RetargetControls, Retargeter
from .render.warp import WarpRenderer

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


@dataclass
class Prepared:
    renderer: object  # WarpRenderer or NeuralRenderer
    data: object  # what its prepare() returned


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

    def prepare(self, target: np.ndarray) -> "Prepared":
        """The first half of render(); finish() does the rest, on another thread if need be.
        It carries its renderer, so a frame prepared before set_identity() finishes as it began."""
        return Prepared(self.renderer, self.renderer.prepare(target))

    @staticmethod
    def finish(prepared: "Prepared") -> np.ndarray:
        return prepared.renderer.finish(prepared.data)

    def process(self, rgb: np.ndarray, t: float) -> tuple[np.ndarray, dict[str, float]]:
        """The avatar frame for one driver frame, and ms per stage (landmarks, retarget, render)."""
        timer = StageTimer()
        points = timer.run("landmarks", self.detect, rgb)
        target = timer.run("retarget", self.retarget, points, t)
        return timer.run("render", self.render, target), timer.ms

    def close(self) -> None:
        self.landmarker.close()
