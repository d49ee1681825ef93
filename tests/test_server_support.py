"""Helpers for the server tests: an in-process server and an aiortc test client.

(Named test_server_* so it stays with the server tests; it holds no tests itself.)
"""
from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

from server.app import start_server
from server.config import ServerConfig

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data"
TIME_BASE = fractions.Fraction(1, 90000)


def clip(name: str) -> Path:
    path = CLIPS / name
    if not path.is_file():
        pytest.skip(f"shared clips not found at {CLIPS}")
    return path


def read_frames(path: Path, seconds: float) -> list[np.ndarray]:
    """The clip's first `seconds` as RGB arrays (decoded up front: the sender must not stall)."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        limit = int(seconds * float(stream.average_rate or 30))
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= limit:
                break
    return frames


class ClipTrack(VideoStreamTrack):
    """Plays RGB frames at `fps` in real time, pts = index * 90000 / fps; loops if asked."""

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0, loop: bool = False):
        super().__init__()
        self.frames, self.fps, self.loop = frames, fps, loop
        self.index = 0
        self.start = None
        self.sent: dict[int, int] = {}  # pts -> frame index

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        if self.index >= len(self.frames) and not self.loop:
            self.stop()
            raise MediaStreamError
        due = self.start + self.index / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        i = self.index % len(self.frames)
        frame = av.VideoFrame.from_ndarray(self.frames[i], format="rgb24")
        frame.pts = int(round(self.index * 90000 / self.fps))
        frame.time_base = TIME_BASE
        self.sent[frame.pts] = i
        self.index += 1
        return frame


@contextlib.contextmanager
def zero_rtp_timestamp_origin(monkeypatch):
    """aiortc adds a random 32-bit origin to RTP timestamps on each sender. Client and server
    run in this process, so pin the origin to 0 on both: then the pts the client receives
    equal the server's output pts, which the server keeps equal to its input pts, which equal
    the pts the client sent. That gives an exact driver-frame <-> avatar-frame matching."""
    import aiortc.rtcrtpsender as sender
    real = sender.random32

    def random32():
        if sys._getframe(1).f_code.co_name == "_run_rtp":
            return 0
        return real()

    monkeypatch.setattr(sender, "random32", random32)
    yield


class Client:
    """A signaling + WebRTC client, as a browser would be."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.ws = None
        self.pc: RTCPeerConnection | None = None
        self.received: list[tuple[int, np.ndarray]] = []  # (pts, rgb)
        self.stats: list[dict] = []
        self.tasks: list[asyncio.Task] = []
        self.keep_frames = True

    async def connect(self, **headers):
        self.ws = await websockets.connect(self.ws_url, additional_headers=headers or None,
                                           max_size=2 ** 20)
        return self

    async def send(self, msg) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def recv(self, timeout: float = 20.0) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, msg, timeout: float = 20.0) -> dict:
        await self.send(msg)
        return await self.recv(timeout)

    async def hello(self, token=None, identity="demo") -> dict:
        msg = {"v": 1, "type": "hello", "identity": identity}
        if token is not None:
            msg["token"] = token
        return await self.request(msg)

    async def start_media(self, track) -> dict:
        """Offer the camera track + a 'stats' data channel; apply the answer."""
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(track)
        channel = pc.createDataChannel("stats")
        channel.on("message", lambda m: self.stats.append(json.loads(m)))
        pc.on("track", lambda t: self.tasks.append(asyncio.ensure_future(self._collect(t))))
        await pc.setLocalDescription(await pc.createOffer())
        reply = await self.request({"v": 1, "type": "offer", "sdp": pc.localDescription.sdp})
        assert reply["type"] == "answer", reply
        await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
        return reply

    async def _collect(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                rgb = frame.to_ndarray(format="rgb24") if self.keep_frames else None
                self.received.append((frame.pts, rgb))
        except MediaStreamError:
            pass

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()


@contextlib.asynccontextmanager
async def running_server(tmp_path, monkeypatch, **overrides):
    """An in-process server on a free port with its own AVATAR_HOME."""
    monkeypatch.setenv("AVATAR_HOME", str(tmp_path / "home"))
    config = ServerConfig(port=0, **overrides)
    async with start_server(config) as srv:
        yield srv


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
