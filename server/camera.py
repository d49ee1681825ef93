"""`avatar camera`: the avatar as a camera that desktop call apps (Zoom, Teams, Meet in a
browser, ...) pick like any other (issue #34).

    source ──driver frames──▶ avatar ──avatar frames──▶ fit to the call's frame ──▶ sink

  source  the webcam (`WebcamSource`, cv2.VideoCapture) or a video file played in a loop at
          its frame rate (`VideoSource`): a thread each, keeping only the newest frame
  avatar  `LocalAvatar`: AvatarPipeline on an identity of the local store, consent checked
          for live use (and again whenever the identity changes on disk), every frame
          watermarked with the audit use's id, the visible badge unless the identity turned
          it off; or `RemoteAvatar`: an aiortc client of a running avatar server (the
          server's session watermarks; it badges a call frame it composed, else the badge
          is drawn here)
  frame   the call's 16:9 frame: by default the identity's own photo around the face with
          the avatar pasted back (engines.render.scene, marked after composing, so the mark
          spans the whole frame); else engines.render.frame.fit_to_frame: the square avatar,
          undistorted, the bars beside it filled
  sink    `VirtualCamera` (pyvirtualcam: v4l2loopback on Linux, OBS's virtual camera on
          Windows and macOS), or anything with send(rgb) and close() (the tests' recorder)

Nothing queues: a slow avatar step skips camera frames (counted), never delays them. `run`
is the loop; `run_command` is the command (flags in `add_arguments`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import websockets
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from engines.identity import DEFAULT_IDENTITY
from engines.measure import StageTimer, timing_summary
from engines.provenance.label import draw_label
from engines.render.frame import FILLS, fit_to_frame, parse_frame_size
from engines.video import open_video
from server.bench.client import TIME_BASE, AvatarClient, ClientError, camera_frame

log = logging.getLogger("avatar.camera")

SIZE = (1280, 720)  # what a call app's camera tile expects
FPS = 30.0
LANDMARK_SIDE = 640  # driver frames are scaled to at most this (server/media/tracks.py: LANDMARK_SIDE)
KEEPALIVE = 1.0  # s without a new avatar frame before the last one is sent again
CONSENT_EVERY = 1.0  # s between consent checks of a local identity (a stat; a reload if it changed)
MODPROBE = 'sudo modprobe v4l2loopback video_nr=10 exclusive_caps=1 card_label="Avatar camera"'
INSTALL = {
    "Linux": f"load the v4l2loopback kernel module (package v4l2loopback-dkms): {MODPROBE}",
    "Windows": "install OBS Studio 26 or newer (it brings the \"OBS Virtual Camera\")",
    "Darwin": "install OBS Studio 30 or newer and start its virtual camera once (it installs the "
              "camera extension)",
}

DESCRIPTION = f"""\
Your avatar as a camera for desktop call apps: reads your webcam, drives the avatar, and
writes it to the system's virtual camera, which Zoom, Teams, Slack, or a browser's Meet
then offer as a camera. The frame is 16:9 (--size, default 1280x720) at --fps; the
avatar is pasted back into the identity's own photo (--fill scene), or the square avatar sits
in its middle, unstretched, the sides filled.

Two ways to make the avatar:
  local (default)   the engines run here, on an identity of this machine's store
                    (--identity, --home): its consent must cover live use; every frame
                    carries the invisible watermark of this use, which the audit log
                    records (`avatar audit`: kind session, address "local camera"); the
                    visible "AI avatar" badge unless the identity's owner turned it off.
  --server URL      a running avatar server does the work (--token, or $AVATAR_TOKEN):
                    this command sends it your camera over WebRTC and shows what comes
                    back; the server checks consent, watermarks and audits. With --fill
                    scene the server draws the badge too (the identity's setting, under
                    its mark); otherwise it is drawn here.

The virtual camera:
  Linux    v4l2loopback: sudo apt install v4l2loopback-dkms, then
             {MODPROBE}
           and pass --device /dev/video10 if there are several loopback devices. With
           exclusive_caps=1, browsers list the device only while this command writes.
  Windows  OBS Studio 26+ installed ("OBS Virtual Camera"; --backend obs); or Unity
           Capture (--backend unitycapture).
  macOS    OBS Studio 30+ installed, its virtual camera started once (--backend obs).
Without one, the command stops at once with what to install. It needs the Python package
pyvirtualcam.

Only the newest webcam frame is used; stale ones are dropped. Ctrl-C or SIGTERM stops:
the webcam is released, the audit use (or the server session) ended. At the end the
median and p95 milliseconds of each stage are printed."""


class CameraError(RuntimeError):
    """The camera command cannot go on; the message (one line) says why and what to do."""


# ---- newest only ----------------------------------------------------------------------------
class Newest:
    """A thread-safe one-slot mailbox: put() replaces an unread item (counted in `dropped`
    once someone has taken one: before that, nobody was waiting yet); get() takes the item
    once, waiting up to `timeout`."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False
        self._taken = False
        self.dropped = 0

    def put(self, item) -> None:
        with self._cond:
            if self._item is not None and self._taken:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def get(self, timeout: float):
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._taken = self._taken or item is not None
            return item

    def close(self) -> None:
        """Wake every waiter; get() no longer waits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---- sources: the driver --------------------------------------------------------------------
@dataclass
class DriverFrame:
    rgb: np.ndarray  # RGB uint8, its longer side at most LANDMARK_SIDE
    t: float  # time.monotonic() when it was captured (or due, for a file)


def landmark_size(width: int, height: int) -> tuple[int, int]:
    """The size a driver frame is scaled to: longer side at most LANDMARK_SIDE, even sides."""
    scale = min(1.0, LANDMARK_SIDE / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


class _ThreadSource:
    """A driver read on a thread of its own into a Newest slot."""

    name = "source"
    FIRST_FRAME = 10.0  # s for the first frame before giving up

    def __init__(self):
        self._slot = Newest()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.frames = 0

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    def start(self) -> _ThreadSource:
        self._thread = threading.Thread(target=self._guarded, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _guarded(self) -> None:
        try:
            self._read()
        except Exception as e:  # the reader's failure is the command's: get() raises it
            self.error = f"{self.name}: {e}"
            log.debug("source failed", exc_info=True)
        finally:
            self._slot.close()

    def _read(self) -> None:
        raise NotImplementedError

    def _put(self, rgb: np.ndarray, t: float) -> None:
        self.frames += 1
        self._slot.put(DriverFrame(rgb, t))

    def get(self, timeout: float) -> DriverFrame | None:
        """The newest frame not yet taken, or None if none came within `timeout`;
        CameraError once the source has failed or ended."""
        item = self._slot.get(timeout)
        if item is None and self.error is not None:
            raise CameraError(self.error)
        return item

    def close(self) -> None:
        self._stop.set()
        self._slot.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)


class WebcamSource(_ThreadSource):
    """cv2.VideoCapture(index), read as fast as it delivers (so its buffers never hold stale
    frames), each frame scaled for the landmarks and converted to RGB on this thread."""

    def __init__(self, index: int):
        super().__init__()
        self.name = f"camera {index}"
        self.index = index
        level = cv2.getLogLevel()  # OpenCV logs every backend it tried: the one line below says it
        cv2.setLogLevel(0)  # silent
        try:
            self.capture = cv2.VideoCapture(index)
        finally:
            cv2.setLogLevel(level)
        if not self.capture.isOpened():
            self.capture.release()
            raise CameraError(f"cannot open camera {index} (is it there, and not in use by another program? "
                              "--camera N picks another, --video FILE plays a file)")
        self.capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # where the backend honours it

    def _read(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                ok, bgr = self.capture.read()
                t = time.monotonic()
                if not ok or bgr is None:
                    failures += 1
                    if failures > 30:
                        raise CameraError("the camera stopped delivering frames (unplugged?)")
                    self._stop.wait(0.05)
                    continue
                failures = 0
                h, w = bgr.shape[:2]
                size = landmark_size(w, h)
                if size != (w, h):
                    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
                self._put(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), t)
        finally:
            self.capture.release()  # on this thread: a read in progress is never cut off


class VideoSource(_ThreadSource):
    """A video file played in a loop at its frame rate, in real time, as a camera would."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self.name = str(self.path)
        container = open_video(self.path)  # VideoError (a ValueError) says what is wrong, now
        stream = container.streams.video[0]
        self.fps = float(stream.average_rate or FPS)
        container.close()

    def _read(self) -> None:
        start, index = time.monotonic(), 0
        while not self._stop.is_set():
            container = open_video(self.path)
            decoded = 0
            try:
                for frame in container.decode(video=0):
                    due = start + index / self.fps
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        return
                    if time.monotonic() - due > 1.0:  # fell behind (a stall): start the clock again
                        start, index = time.monotonic(), 0
                    w, h = landmark_size(frame.width, frame.height)
                    self._put(frame.reformat(width=w, height=h, format="rgb24").to_ndarray(), due)
                    index += 1
                    decoded += 1
            except av.error.FFmpegError as e:
                raise CameraError(f"cannot decode the video ({e})")
            finally:
                container.close()
            if decoded == 0:
                raise CameraError("the video has no decodable frames")


# ---- the avatar -----------------------------------------------------------------------------
class LocalAvatar:
    """The engines, here: driver frame -> landmarks -> retarget -> render -> badge + mark.

    Consent is checked for live use every CONSENT_EVERY s (a stat of the manifest; reloaded
    when it changed, so a revocation or an expiry stops the camera within a second, as it
    ends a server's session). A label switch on disk follows too, unless `label` was given."""

    def __init__(self, source, store, identity, marker, label: bool | None = None, compose=None):
        from engines.pipeline import AvatarPipeline

        self.source, self.store, self.identity, self.marker = source, store, identity, marker
        self.compose = compose  # avatar square -> the call's frame (a SceneComposer), or None
        self.forced_label = label
        self.label = identity.label_viewers if label is None else label
        self.stamp = store.consent_stamp(identity.name)
        self.checked = time.monotonic()
        self.pipeline = AvatarPipeline(identity)
        self.t0 = time.monotonic()

    def check_consent(self) -> None:
        """ConsentError (an IdentityError) when the consent no longer covers live use."""
        stamp = self.store.consent_stamp(self.identity.name)
        if stamp != self.stamp:
            identity = self.store.load(self.identity.name)  # IdentityError if deleted or broken
            self.stamp, self.identity.consent = stamp, identity.consent
            if self.forced_label is None:
                self.label = identity.label_viewers
        self.identity.consent.check("live-avatar")

    def next(self, timeout: float) -> tuple[np.ndarray, dict[str, float]] | None:
        """The avatar of the newest camera frame and ms per stage, or None if no camera frame
        came within `timeout`."""
        if time.monotonic() - self.checked >= CONSENT_EVERY:
            self.check_consent()
            self.checked = time.monotonic()
        timer = StageTimer()
        frame = timer.run("wait", self.source.get, timeout)
        if frame is None:
            return None
        points = timer.run("landmarks", self.pipeline.detect, frame.rgb)
        target = timer.run("retarget", self.pipeline.retarget, points, frame.t - self.t0)
        out = timer.run("render", self.pipeline.render, target)
        if self.compose is not None:
            out = timer.run("compose", self.compose, out)
        out = timer.run("mark", self.marker, out, self.label)  # the badge first, then the mark over all
        return out, timer.ms

    def close(self) -> None:
        self.pipeline.close()


class RemoteAvatar:
    """An aiortc client of an avatar server, on a thread with its own event loop: sends the
    source as its camera track, keeps only the newest avatar frame that comes back."""

    CONNECT = 20.0  # s for the session to start

    def __init__(self, source, url: str, token: str | None, identity: str, label: bool = True,
                 frame: tuple[int, int] | None = None):
        self.ws_url = ws_url(url)
        self.url, self.source, self.token, self.identity_name, self.label = url, source, token, identity, label
        self.frame = frame  # (w, h): the server pastes the avatar back into the identity's scene at that size
        self._slot = Newest()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: str | None = None
        self.session: dict = {}
        self.received = 0

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    def start(self) -> RemoteAvatar:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="camera-client", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.CONNECT):
            self.close()
            raise CameraError(f"no avatar session with {self.url} within {self.CONNECT:.0f} s")
        if self.error is not None:
            self.close()
            raise CameraError(self.error)
        return self

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        client = _Client(self.ws_url)
        client.on_video = self._on_video
        track = SourceTrack(self.source)
        try:
            await client.connect()
            frame = None if self.frame is None else "%dx%d" % self.frame
            self.session = await client.start_session(track, self.token, self.identity_name, frame=frame)
            client.pc.on("connectionstatechange", lambda: client.pc.connectionState == "failed"
                         and self._fail("the connection to the avatar server failed"))
            self._ready.set()
            log.info("avatar session %s on %s (identity %s)", self.session.get("id", "?")[:8], self.url,
                     self.session.get("identity"))
            watch = asyncio.ensure_future(self._watch(client))
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({watch, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watch, stop):
                task.cancel()
            await asyncio.gather(watch, stop, return_exceptions=True)
            if self.error is None:
                with contextlib.suppress(Exception):
                    await client.send({"v": 1, "type": "bye"})
        except ClientError as e:
            self.error = str(e)
        except Exception as e:
            self.error = f"avatar server {self.url}: {type(e).__name__}: {e}"
            log.debug("client failed", exc_info=True)
        finally:
            track.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)
            track.close()
            self._ready.set()
            self._slot.close()

    async def _watch(self, client) -> None:
        """Read the server's messages until an error or the socket closes; bound the client's
        stats list (the bench keeps every message)."""
        try:
            while True:
                message = await client.recv(timeout=None)
                del client.stats[:-4]
                if message.get("type") == "error":
                    self._fail(f"the avatar server ended the session: {message.get('code')}: {message.get('message')}")
                    return
        except websockets.exceptions.ConnectionClosed:
            self._fail("the avatar server closed the session")

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        if self._stop is not None:
            self._stop.set()

    def _on_video(self, frame, now: float) -> None:
        t = time.perf_counter()
        rgb = frame.to_ndarray(format="rgb24")
        if self.label and self.frame is None:  # a call frame comes badged by the server, under its mark
            rgb = draw_label(rgb)  # over the server's mark, which the rest of the frame still carries
        self.received += 1
        self._slot.put((rgb, {"convert": (time.perf_counter() - t) * 1e3}))

    def next(self, timeout: float) -> tuple[np.ndarray, dict[str, float]] | None:
        t = time.perf_counter()
        item = self._slot.get(timeout)
        if item is None:
            error = self.source.error or self.error  # a dead webcam, not the session it ended
            if error is not None:
                raise CameraError(error)
            return None
        rgb, ms = item
        ms["wait"] = (time.perf_counter() - t) * 1e3
        return rgb, ms

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)


def ws_url(url: str) -> str:
    """The signaling WebSocket of a server's http(s) URL."""
    base = url if url.endswith("/") else url + "/"
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(http) and len(base) > len(http) + 1:
            return ws + base[len(http):] + "ws"
    raise CameraError(f"--server must be an http:// or https:// URL, not {url[:100]!r}")


class _Client(AvatarClient):
    """The bench's client keeping nothing (the bench keeps every frame's time): each avatar
    frame goes to on_video only."""

    async def _collect(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video" and self.on_video is not None:
                    self.on_video(frame, time.time())
        except MediaStreamError:
            pass


class SourceTrack(MediaStreamTrack):
    """The source as an aiortc video track: the newest driver frame each time the sender asks,
    as yuv420p, pts from its capture time."""

    kind = "video"

    def __init__(self, source):
        super().__init__()
        from concurrent.futures import ThreadPoolExecutor

        self.source = source
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="camera-track")
        self._t0: float | None = None
        self._last_pts = -1

    async def recv(self):
        loop = asyncio.get_running_loop()
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            try:
                item = await loop.run_in_executor(self._executor, self.source.get, 0.25)
            except CameraError:
                self.stop()
                raise MediaStreamError
            if item is not None:
                break
        if self._t0 is None:
            self._t0 = item.t
        frame = av.VideoFrame.from_ndarray(*camera_frame(item.rgb))
        self._last_pts = max(self._last_pts + 1, int((item.t - self._t0) * 90000))
        frame.pts, frame.time_base = self._last_pts, TIME_BASE
        return frame

    def close(self) -> None:
        self._executor.shutdown(wait=False)


# ---- the sink -------------------------------------------------------------------------------
def install_hint() -> str:
    return INSTALL.get(platform.system(), "install a virtual camera pyvirtualcam supports")


class VirtualCamera:
    """The OS's virtual camera through pyvirtualcam, fed RGB frames of one size."""

    def __init__(self, width: int, height: int, fps: float, device: str | None = None, backend: str | None = None):
        try:
            import pyvirtualcam
            from pyvirtualcam.camera import BACKENDS
        except ImportError:
            raise CameraError("avatar camera needs the Python package pyvirtualcam (pip install pyvirtualcam), "
                              f"and a virtual camera: {install_hint()}") from None
        if backend is not None and backend not in BACKENDS:
            raise CameraError(f"--backend {backend!r} is not available on {platform.system()} "
                              f"(available: {', '.join(BACKENDS) or 'none'})")
        if not BACKENDS:
            raise CameraError(f"pyvirtualcam has no virtual camera backend on {platform.system()}")
        try:
            self.camera = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                              device=device, backend=backend)
        except Exception as e:  # noqa: BLE001  RuntimeError with each backend's reason a line; a backend's own errors
            reasons = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise CameraError(f"no virtual camera device{f' {device}' if device else ''} ({reasons}): "
                              f"{install_hint()}") from None
        self.device, self.backend = self.camera.device, self.camera.backend
        native = self.camera.native_fmt
        self.native = native.name if native is not None else "?"

    def send(self, rgb: np.ndarray) -> None:
        self.camera.send(rgb)

    def close(self) -> None:
        self.camera.close()

    def __str__(self) -> str:
        return f"{self.device} ({self.backend}, {self.native})"


# ---- the loop -------------------------------------------------------------------------------
@dataclass
class RunStats:
    frames: int = 0  # sent to the sink, repeats included
    repeats: int = 0  # the last frame again, after KEEPALIVE without a new one
    seconds: float = 0.0
    stages: dict[str, list[float]] = field(default_factory=dict)  # ms per frame, the last 10 000
    KEEP = 10_000

    def add(self, ms: dict[str, float]) -> None:
        for stage, value in ms.items():
            values = self.stages.setdefault(stage, [])
            values.append(value)
            if len(values) > 2 * self.KEEP:
                del values[:-self.KEEP]

    def summary(self) -> dict[str, dict]:
        return {stage: timing_summary(values[-self.KEEP:]) for stage, values in self.stages.items()}


def run(avatar, sink, width: int, height: int, fps: float, stop: threading.Event, *,
        frames: int | None = None, fill: str = "edge", keepalive: float | None = KEEPALIVE,
        on_frame=None, stats: RunStats | None = None) -> RunStats:
    """Send avatar frames, fitted to width x height, to `sink` at most `fps` a second, until
    `stop` is set or `frames` were sent; what was sent, counted in `stats` as it goes.
    `avatar.next(timeout)` gives (avatar image, ms per stage) or None; on_frame(avatar,
    frame, ms), if given, sees every new frame sent."""
    stats = stats if stats is not None else RunStats()
    period = 1.0 / fps
    start = due = last_sent = time.monotonic()
    last = None
    while not stop.is_set() and (frames is None or stats.frames < frames):
        now = time.monotonic()
        if now < due and stop.wait(due - now):
            break
        got = avatar.next(min(0.25, keepalive or 0.25))
        now = time.monotonic()
        if got is None:
            if last is not None and keepalive is not None and now - last_sent >= keepalive:
                sink.send(last)  # a call app may take a camera that sends nothing for a dead one
                stats.frames += 1
                stats.repeats += 1
                last_sent = now
            continue
        image, ms = got
        t = time.perf_counter()
        out = image if image.shape[:2] == (height, width) else fit_to_frame(image, width, height, fill)
        t1 = time.perf_counter()
        sink.send(out)
        t2 = time.perf_counter()
        ms["fit"], ms["send"] = (t1 - t) * 1e3, (t2 - t1) * 1e3
        ms["total"] = sum(v for k, v in ms.items() if k != "wait")
        stats.add(ms)
        stats.frames += 1
        if on_frame is not None:
            on_frame(image, out, ms)
        last, last_sent = out, time.monotonic()
        due = max(due + period, last_sent - period)  # at most fps; a stall does not bunch frames after it
    stats.seconds = time.monotonic() - start
    return stats


# ---- the command ----------------------------------------------------------------------------
def frame_size(text: str) -> tuple[int, int]:
    try:
        return parse_frame_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def frame_rate(text: str) -> float:
    try:
        fps = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1 <= fps <= 60:
        raise argparse.ArgumentTypeError(f"{text}: between 1 and 60")
    return fps


def frame_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", default=DEFAULT_IDENTITY,
                        help="who the avatar is (default: %(default)s); with --server, an identity of the server")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--camera", type=int, default=0, metavar="N",
                        help="the webcam to read, as OpenCV numbers them (default: 0; on Linux /dev/videoN)")
    source.add_argument("--video", type=Path, default=None, metavar="FILE",
                        help="drive from a video file instead, looped at its frame rate (tests, demos)")
    parser.add_argument("--size", type=frame_size, default=SIZE, metavar="WxH",
                        help="the frame call apps receive (default: 1280x720); the avatar fills its height")
    parser.add_argument("--fps", type=frame_rate, default=FPS, help="frames per second at most (default: 30)")
    parser.add_argument("--fill", choices=("scene",) + FILLS, default="scene",
                        help="scene: the avatar pasted back into the identity's own photo (photo identities "
                        "made by `avatar identity create`; others, and --server, fall back to edge); edge: "
                        "the square avatar with its own edges blurred and darkened beside it; dark: a dark "
                        "grey beside it (default: %(default)s)")
    parser.add_argument("--label", action=argparse.BooleanOptionalAction, default=None,
                        help="draw the visible \"AI avatar\" badge (default: the identity's setting, on unless "
                        "its owner turned it off; with --server: on, and with --fill scene the server's "
                        "setting)")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="use a running avatar server (http://host:8080/) instead of the local engines")
    parser.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                        help="the server's presenter token (default: $AVATAR_TOKEN; none in demo mode)")
    parser.add_argument("--device", default=None, metavar="PATH",
                        help="the virtual camera device (Linux: the v4l2loopback device, e.g. /dev/video10; "
                        "default: the first one found)")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="pyvirtualcam's backend: v4l2loopback (Linux), obs (Windows, macOS), unitycapture "
                        "(Windows) (default: the first that works)")
    parser.add_argument("--frames", type=frame_count, default=None, metavar="N",
                        help="stop after N frames (scripts, measurements; default: run until Ctrl-C)")


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGINT and SIGTERM set `stop` (a second one interrupts at once), while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_command(args, open_sink=None, on_frame=None, stop: threading.Event | None = None) -> int:
    """`avatar camera`. open_sink(width, height, fps) replaces the virtual camera (tests)."""
    width, height = args.size
    open_sink = open_sink or (lambda w, h, fps: VirtualCamera(w, h, fps, args.device, args.backend))
    stop = stop or threading.Event()
    if args.server:
        ws_url(args.server)  # a malformed URL fails first
    source = VideoSource(args.video) if args.video is not None else None  # so does a bad file
    sink = open_sink(width, height, args.fps)  # no virtual camera: stop here, with what to install
    try:
        if source is None:
            if getattr(sink, "device", None) == f"/dev/video{args.camera}":
                raise CameraError(f"--camera {args.camera} is the virtual camera itself ({sink.device}): "
                                  "pick the real webcam")
            source = WebcamSource(args.camera)
        with stop_on_signals(stop):
            if args.server:
                stats, mode = _run_remote(args, source, sink, stop, on_frame), f"server {args.server}"
            else:
                stats, mode = _run_local(args, source, sink, stop, on_frame), "local engines"
    finally:
        if source is not None:
            source.close()
        sink.close()
    print(format_stats(stats, mode, width, height, source))
    return 0


def _print_started(sink, source, what: str, width: int, height: int, fps: float) -> None:
    print(f"avatar camera: {what} from {source.name} -> {sink} at {width}x{height}, up to {fps:g} fps; "
          "pick it as the camera in your call app. Ctrl-C stops.", file=sys.stderr, flush=True)


def _run_local(args, source, sink, stop, on_frame) -> RunStats:
    from engines.identity import IdentityStore, identities_dir
    from engines.provenance.watermark import Marker, Payload
    from engines.render.scene import composer
    from server.audit import AuditLog, audit_path, local_user

    store = IdentityStore(identities_dir(args.home))
    identity = store.load(args.identity)
    identity.consent.check("live-avatar")
    source.start()
    log_ = AuditLog(audit_path(args.home), "avatar camera")
    try:
        with log_.use("session", local_user(), identity.name, address="local camera") as use:
            stats = RunStats()
            compose = composer(identity, *args.size) if args.fill == "scene" else None
            avatar = LocalAvatar(source, store, identity, Marker(Payload.here(use.id)), args.label, compose)
            try:
                _print_started(sink, source, f"identity {identity.name!r} (watermark use {use.id[:8]})",
                               *args.size, args.fps)
                run(avatar, sink, *args.size, args.fps, stop, frames=args.frames, fill=_square_fill(args.fill),
                    on_frame=on_frame, stats=stats)
            finally:
                use.frames = stats.frames  # also when it ends in an error (consent revoked, camera gone)
                avatar.close()
            use.reason = "stopped"
    finally:
        log_.close()
    return stats


def _square_fill(fill: str) -> str:
    """How a square avatar's bars are filled where no scene composed the frame."""
    return "edge" if fill == "scene" else fill


def _run_remote(args, source, sink, stop, on_frame) -> RunStats:
    source.start()
    avatar = RemoteAvatar(source, args.server, args.token, args.identity, True if args.label is None else args.label,
                          frame=args.size if args.fill == "scene" else None)
    avatar.start()
    try:
        _print_started(sink, source, f"identity {avatar.session.get('identity')!r} on {args.server} "
                       f"(session {avatar.session.get('id', '?')[:8]})", *args.size, args.fps)
        return run(avatar, sink, *args.size, args.fps, stop, frames=args.frames, fill=_square_fill(args.fill),
                   on_frame=on_frame)
    finally:
        avatar.close()


def format_stats(stats: RunStats, mode: str, width: int, height: int, source) -> str:
    fps = stats.frames / stats.seconds if stats.seconds else 0.0
    lines = [(f"{stats.frames} frames ({stats.repeats} repeated) at {width}x{height} in {stats.seconds:.1f} s "
              f"({fps:.1f} fps), {mode}; {source.dropped} camera frames skipped as stale"),
             f"{'stage':<12}{'median ms':>10}{'p95 ms':>10}"]
    for stage, s in stats.summary().items():
        if s["n"]:
            lines.append(f"{stage:<12}{s['median_ms']:>10.2f}{s['p95_ms']:>10.2f}")
    return "\n".join(lines)
