"""Helpers shared by the tests: the shared clips, an in-process server, a test client.

Fixtures live in conftest.py; plain functions and classes live here (`from helpers import ...`).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest

from server.bench.avsync import TimedMicrophone
from server.bench.client import AvatarClient, ClipTrack  # noqa: F401  (for the tests)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = ["selfscan_a.mp4", "selfscan_b.mp4", "drive_wink.mp4", "drive_expressive.mp4"]
FPS = 30  # every shared clip is 30 fps (shared/data/README.md)


def shared_clip(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared clip {name} not found in {SHARED} (real clips are not part of the repo)")
    return path


clip = shared_clip


def read_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """The clip's first `limit` frames (all without a limit) as RGB arrays, decoded up front
    so a sender never stalls on decoding."""
    from engines.video import read_video

    return list(read_video(path, limit))


def read_seconds(path: Path, seconds: float) -> list[np.ndarray]:
    """The clip's first `seconds` as RGB arrays."""
    return read_frames(path, limit=round(seconds * FPS))


class Client(AvatarClient):
    """The bench's client, keeping every received frame for inspection."""

    def __init__(self, ws_url: str):
        super().__init__(ws_url, keep_frames=True)


@contextlib.asynccontextmanager
async def running_server(tmp_path, monkeypatch, **overrides):
    """An in-process server on a free port with its own AVATAR_HOME."""
    from server.http.app import start_server
    from server.config import ServerConfig

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


class SineTrack(TimedMicrophone):
    """A microphone that hums: a 440 Hz sine, in real time from its first frame on."""

    def __init__(self, amplitude: float = 0.3):
        super().__init__(period=1.0)
        self.amplitude = amplitude

    def pcm(self, samples: np.ndarray) -> np.ndarray:
        return (self.amplitude * 32767 * np.sin(2 * np.pi * 440 * samples / 48000)).astype(np.int16)


def rms(frame) -> float:
    """Loudness of a decoded audio frame, 0..1."""
    return float(np.sqrt(np.mean((frame.to_ndarray().astype(np.float64) / 32768) ** 2)))
