"""Media path: newest-frame holder, the outgoing avatar track, and the per-frame compute.

Why a 1-slot holder: aiortc queues every decoded frame. If compute is slower than the
camera, a FIFO grows and latency drifts upward without bound (aiortc issue #1192). We keep
only the newest frame and count the ones we skip, so latency stays ~one compute step.
"""
from __future__ import annotations

import asyncio
import fractions
import itertools
import time
from dataclasses import dataclass

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from engines.measure import StageTimer
from engines.identity import Identity
from engines.pipeline import AvatarPipeline, Prepared
from engines.retarget import RetargetControls
from engines.provenance.label import draw_label
from engines.provenance.watermark import Marker, Payload
from engines.render.scene import framer
from ..telemetry import COMPUTE_STAGES, FrameRecord

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
        self.last_pts = 0  # of the frame pushed last

    def push(self, frame: av.VideoFrame) -> None:
        self.last_pts = frame.pts
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


def camera_planes(frame: av.VideoFrame) -> np.ndarray | None:
    """The camera frame as one I420 array ((h * 3/2, w): Y, then U, then V), or None if its
    size is unusable. A plain copy of the decoder's planes for the usual even-sized yuv420p
    frame, so the event loop spends microseconds here; the conversion to RGB happens where
    the session computes (FrameProcessor.prepare)."""
    if input_size(frame.width, frame.height) is None:
        return None
    if frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2:
        frame = frame.reformat(frame.width // 2 * 2, frame.height // 2 * 2, "yuv420p")
    return frame.to_ndarray()


def encoder_planes(rgb: np.ndarray) -> np.ndarray:
    """An avatar image as the I420 planes VP8 encodes, or the RGB itself if a side is odd
    (I420 cannot hold that). Converted where the session computes: OpenCV takes 0.1 ms for
    256², against 0.8 ms for swscale in aiortc's encoder, inside the server's own process."""
    if rgb.shape[0] % 2 or rgb.shape[1] % 2:
        return np.ascontiguousarray(rgb)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)


def video_frame(image: np.ndarray) -> av.VideoFrame:
    """The av frame of encoder_planes()' output: I420 planes (2-D) or RGB (3-D)."""
    return av.VideoFrame.from_ndarray(image, "yuv420p" if image.ndim == 2 else "rgb24")


@dataclass
class PreparedFrame:
    """A camera frame after the first stage: where its render waits, the stage times so far."""
    pts: int
    time_base: fractions.Fraction
    recv_time: float
    face_found: bool
    handle: int  # FrameProcessor.finish(handle) completes it
    ms: dict[str, float]


class FrameProcessor:
    """The two compute stages of a frame, run where the session computes (a process of its
    own or this one, server/media/stages.py), each stage on its own single thread:

      prepare() on the first thread: I420 camera planes -> RGB -> landmarks -> retarget ->
                the renderer's first half (the neural engine's warp and network input)
      finish() on the second thread: the renderer's second half (the warp engine's warp, the
                neural generator) -> composed into the asked call frame, if any (the
                identity's scene, engines/render/scene.py) -> watermark -> the avatar image

    so frame n+1 is prepared while frame n finishes, and with the neural engine each thread
    has about half the work. The pipeline is not thread-safe: everything on it but the
    renderer's second half (landmarker, retargeter, controls, identity changes) belongs to
    the first thread, and the second half only ever runs on the second. Arrays in and out,
    no av frames or asyncio: what crosses to a process is plain data."""

    KEEP = 4  # prepared frames waiting for finish(); older ones were abandoned

    def __init__(self, identity: Identity, payload: Payload, frame: tuple[int, int] | None = None):
        self.pipeline = AvatarPipeline(identity)
        self.marker = Marker(payload)  # every frame that leaves carries the session's watermark
        self.frame = frame  # (width, height) the client asked for (a call's 16:9), or None: the square
        self.compose = self._framer(identity)
        self.source_size: tuple[int, int] | None = None
        self.t0 = time.monotonic()
        self._prepared: dict[int, tuple[Prepared, object]] = {}  # handle -> (prepared, its composer or None)
        self._handles = itertools.count()

    def prepare(self, i420: np.ndarray) -> tuple[int, bool, dict[str, float]] | None:
        """Stage one of a camera frame: (handle for finish(), face found, ms per stage), or
        None if its size is unusable."""
        height, width = i420.shape[0] * 2 // 3, i420.shape[1]
        size = input_size(width, height)
        if size is None:
            return None
        if (width, height) != self.source_size:
            # New camera resolution: the neutral pose was measured in other pixels.
            if self.source_size is not None:
                self.pipeline.recalibrate()
            self.source_size = (width, height)
        timer = StageTimer()
        # OpenCV's BT.601 conversion: 0.07 ms for 512², against 0.5-0.8 through an av frame
        # and swscale, and nearer the camera's RGB (mean error 0.26 against 1.24 levels).
        rgb = timer.run("convert", cv2.cvtColor, i420, cv2.COLOR_YUV2RGB_I420)
        if size != (width, height):  # AREA: a box filter, the right one for shrinking
            rgb = timer.run("convert", cv2.resize, rgb, size, interpolation=cv2.INTER_AREA)
        points = timer.run("landmarks", self.pipeline.detect, rgb)
        target = timer.run("retarget", self.pipeline.retarget, points, time.monotonic() - self.t0)
        handle = next(self._handles)
        # With the composer of this moment: an identity switch on this thread changes it for
        # the frames prepared after it, not under one the second thread is finishing.
        self._prepared[handle] = (timer.run("render", self.pipeline.prepare, target), self.compose)
        self._prepared.pop(handle - self.KEEP, None)
        return handle, points is not None, timer.ms

    def finish(self, handle: int, viewer_label: bool = False, plain: bool = True
               ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, float]]:
        """The avatar image of a prepared frame (None unless `plain`), the viewers' copy if
        `viewer_label` (the visible badge drawn first and then marked, as a badge drawn over
        a watermark would erase it), both as encoder_planes(), and ms per stage. Each copy
        costs a mark, the dearest stage at call sizes, so only the ones asked for are made."""
        timer = StageTimer()
        prepared, compose = self._prepared.pop(handle)
        out = timer.run("render", self.pipeline.finish, prepared)
        if compose is not None:  # into the call frame first: badge and mark span all of it
            out = timer.run("compose", compose, out)
        labelled = self._marked(timer, timer.run("mark", draw_label, out)) if viewer_label else None
        plain_planes = self._marked(timer, out) if plain or labelled is None else None
        return plain_planes, labelled, timer.ms

    def _marked(self, timer: StageTimer, rgb: np.ndarray) -> np.ndarray:
        """encoder_planes(rgb), marked: in its I420 luma rows (a tenth of the cost of marking
        three channels), or as RGB when a side is odd and the planes are RGB."""
        planes = timer.run("convert", encoder_planes, rgb)
        return timer.run("mark", self.marker if planes.ndim == 3 else self.marker.mark_i420, planes)

    # On the first thread, like prepare():
    def set_controls(self, controls: RetargetControls) -> None:
        self.pipeline.set_controls(controls)

    def set_identity(self, identity: Identity) -> None:
        self.pipeline.set_identity(identity)
        self.compose = self._framer(identity)

    def _framer(self, identity: Identity):
        """avatar square -> the asked frame: composed into the identity's scene (or fitted,
        for one without a scene); None when the square itself is sent."""
        return None if self.frame is None else framer(identity, *self.frame)

    def recalibrate(self) -> None:
        self.pipeline.recalibrate()

    def close(self) -> None:
        self.pipeline.close()


def avatar_frame(image: np.ndarray, p: PreparedFrame, finish_ms: dict[str, float]) -> tuple[av.VideoFrame, FrameRecord]:
    """The outgoing frame of a finished avatar image, and its record."""
    ms = dict(p.ms)
    for stage, value in finish_ms.items():
        ms[stage] = ms.get(stage, 0.0) + value
    t = time.perf_counter()
    video = video_frame(image)
    ms["convert"] = ms.get("convert", 0.0) + (time.perf_counter() - t) * 1e3
    # Keep the input's timestamp so each output frame names the camera frame it shows.
    video.pts, video.time_base = p.pts, p.time_base
    done = time.time()
    stages = {s: ms.get(s, 0.0) for s in COMPUTE_STAGES}
    stages["total"] = (done - p.recv_time) * 1e3
    # Whatever is not compute was waiting: for a thread, a process, or the previous frame.
    stages["queue"] = max(0.0, stages["total"] - sum(ms.values()))
    return video, FrameRecord(p.pts, p.recv_time, done, p.face_found, stages)


async def drain(track: MediaStreamTrack) -> None:
    """Consume a track we do not use (audio, extra video) so aiortc's queue stays empty."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass
