"""Media path: newest-frame holder, the outgoing avatar track, and the per-frame compute.

Why a 1-slot holder: aiortc queues every decoded frame. If compute is slower than the
camera, a FIFO grows and latency drifts upward without bound (aiortc issue #1192). We keep
only the newest frame and count the ones we skip, so latency stays ~one compute step.
"""
from __future__ import annotations

import asyncio
import fractions
import time
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from engines.measure import StageTimer
from engines.pipeline import AvatarPipeline, Prepared
from engines.watermark import Marker
from .telemetry import COMPUTE_STAGES, FrameRecord

# Camera frames are scaled so their longer side is at most this before landmarks, in either
# orientation: mediapipe finds the face on a 128² copy and reads it from a 192² crop, so more
# pixels buy nothing (a 720x1280 portrait at 360x640 moved landmarks 0.2% of the eye
# distance, jitter unchanged) and cost conversion time.
LANDMARK_SIDE = 640
MIN_SIDE = 16  # smaller frames are rejected (nothing to track)
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)


class LatestFrame:
    """A 1-slot mailbox: put() replaces an unread item (counted in `dropped`)."""

    def __init__(self):
        self._item = None
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, item) -> None:
        if self._item is not None:
            self.dropped += 1
        self._item = item
        self._ready.set()

    async def get(self):
        await self._ready.wait()
        item, self._item = self._item, None
        self._ready.clear()
        return item


_STOP = object()


class AvatarTrack(MediaStreamTrack):
    """The outgoing video: whatever avatar frame the session computed last.

    recv() waits for a new frame rather than repeating old ones, so each sent frame is
    one computed output whose pts equals its input frame's pts.
    """

    kind = "video"

    def __init__(self, on_sent=None):
        super().__init__()
        self._latest = LatestFrame()
        self._on_sent = on_sent  # on_sent(pts, wall time) once a frame's packets are out
        self._in_flight: int | None = None

    def push(self, frame: av.VideoFrame) -> None:
        self._latest.put(frame)

    async def recv(self) -> av.VideoFrame:
        # aiortc's sender calls recv() again only after it has encoded and sent every
        # packet of the frame before: now is when that frame left (for the chain figures).
        if self._in_flight is not None and self._on_sent is not None:
            self._on_sent(self._in_flight, time.time())
        self._in_flight = None
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._latest.get()
        if frame is _STOP:
            raise MediaStreamError
        self._in_flight = frame.pts
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            self._latest.put(_STOP)  # wake a pending recv()
        super().stop()


def input_size(width: int, height: int) -> tuple[int, int] | None:
    """The size to convert a camera frame to, or None if it is unusable.

    Caps the longer side to LANDMARK_SIDE, keeping the aspect and even dimensions (yuv420
    needs them)."""
    if width < MIN_SIDE or height < MIN_SIDE or width > 16 * height or height > 16 * width:
        return None
    scale = min(1.0, LANDMARK_SIDE / max(width, height))
    w = max(MIN_SIDE, int(width * scale) // 2 * 2)
    h = max(MIN_SIDE, int(height * scale) // 2 * 2)
    return w, h


@dataclass
class PreparedFrame:
    """A camera frame after the first stage: its render prepared, the stage times so far."""
    pts: int
    time_base: fractions.Fraction
    recv_time: float
    face_found: bool
    prepared: Prepared
    timer: StageTimer


class FrameProcessor:
    """The two compute stages of a frame. Each stage runs on its own single thread:

      prepare() on the first thread: camera frame -> RGB -> landmarks -> retarget -> the
                renderer's first half (the neural engine's warp and network input)
      finish() on the second thread: the renderer's second half (the warp engine's warp, the
                neural generator) -> watermark -> output frame

    so frame n+1 is prepared while frame n finishes, and with the neural engine each thread
    has about half the work. The pipeline is not thread-safe: everything on it but the
    renderer's second half (landmarker, retargeter, controls, identity changes) belongs to
    the first thread, and the second half only ever runs on the second."""

    def __init__(self, pipeline: AvatarPipeline, marker: Marker):
        self.pipeline = pipeline
        self.marker = marker  # every frame that leaves carries the session's watermark
        self.source_size: tuple[int, int] | None = None
        self.t0 = time.monotonic()

    def prepare(self, frame: av.VideoFrame, recv_time: float) -> PreparedFrame | None:
        size = input_size(frame.width, frame.height)
        if size is None:
            return None
        if (frame.width, frame.height) != self.source_size:
            # New camera resolution: the neutral pose was measured in other pixels.
            if self.source_size is not None:
                self.pipeline.recalibrate()
            self.source_size = (frame.width, frame.height)
        timer = StageTimer()
        # AREA: a box filter, the right one for shrinking (and 0.7x the time of swscale's
        # default bicubic for a 720x1280 camera).
        rgb = timer.run("convert", frame.reformat, size[0], size[1], "rgb24", interpolation="AREA")
        rgb = timer.run("convert", rgb.to_ndarray)
        points = timer.run("landmarks", self.pipeline.detect, rgb)
        target = timer.run("retarget", self.pipeline.retarget, points, time.monotonic() - self.t0)
        prepared = timer.run("render", self.pipeline.prepare, target)
        pts = frame.pts if frame.pts is not None else int(recv_time * 90000)
        return PreparedFrame(pts, frame.time_base or VIDEO_TIME_BASE, recv_time, points is not None, prepared, timer)

    def finish(self, p: PreparedFrame, viewer_label: bool = False) -> tuple[av.VideoFrame, FrameRecord, np.ndarray | None]:
        """The output frame and its record; with `viewer_label`, also the viewers' copy: the
        visible badge drawn first and then marked, as a badge drawn over a watermark
        would erase it."""
        timer = p.timer
        out = timer.run("render", self.pipeline.finish, p.prepared)
        labelled = timer.run("mark", self.marker, out, True) if viewer_label else None
        out = timer.run("mark", self.marker, out)
        video = timer.run("convert", av.VideoFrame.from_ndarray, np.ascontiguousarray(out), "rgb24")
        # Keep the input's timestamp so each output frame names the camera frame it shows.
        video.pts, video.time_base = p.pts, p.time_base
        done = time.time()
        stages = {s: timer.ms.get(s, 0.0) for s in COMPUTE_STAGES}
        stages["total"] = (done - p.recv_time) * 1e3
        # Whatever is not compute was waiting: for a thread, or for the previous frame.
        stages["queue"] = max(0.0, stages["total"] - sum(timer.ms.values()))
        return video, FrameRecord(p.pts, p.recv_time, done, p.face_found, stages), labelled


async def drain(track: MediaStreamTrack) -> None:
    """Consume a track we do not use (audio, extra video) so aiortc's queue stays empty."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass
