"""Helpers for the server tests: an in-process server and an aiortc test client.

(Named test_server_* so it stays with the server tests; it holds no tests itself.)
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np

from conftest import read_frames as read_clip_frames
from conftest import shared_clip as clip  # noqa: F401  (re-exported for the tests)
from server.app import start_server
from server.client import AvatarClient, ClipTrack  # noqa: F401  (re-exported for the tests)
from server.client import zero_rtp_timestamp_origin as pin_rtp_origin
from server.config import ServerConfig

FPS = 30  # every shared clip is 30 fps (shared/data/README.md)


def read_frames(path: Path, seconds: float) -> list[np.ndarray]:
    """The clip's first `seconds` as RGB arrays (decoded up front: the sender must not stall)."""
    return read_clip_frames(path, limit=round(seconds * FPS))


class Client(AvatarClient):
    """The bench's client, keeping every received frame for inspection."""

    def __init__(self, ws_url: str):
        super().__init__(ws_url, keep_frames=True)


@contextlib.contextmanager
def zero_rtp_timestamp_origin(monkeypatch):
    """Pin aiortc's RTP timestamp origin to 0 (client and server share this process), so
    received pts equal sent pts: an exact driver-frame <-> avatar-frame matching."""
    with pin_rtp_origin():
        yield


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
