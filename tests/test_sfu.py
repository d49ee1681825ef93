"""A room published through a real Janus: viewers watch through the SFU, and the avatar
server's CPU does not grow with their number (it encodes once). Skipped without `janus`."""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from helpers import AvatarClient, SineTrack, rms, wait_for
from server.bench.runner import cpu_seconds, local_server
from server.rooms.janus import JanusSubscriber
from server.rooms.sfu import janus_room_id
from test_janus import ADMIN_KEY, running_janus
from test_rooms import drive

pytestmark = pytest.mark.skipif(shutil.which("janus") is None, reason="janus not installed (apt-get install janus)")
CPU_WINDOW = 6.0  # seconds of server CPU per measurement


async def server_cpu(pid: int) -> float:
    """The server's CPU use over CPU_WINDOW, in % of one core."""
    before, start = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(CPU_WINDOW)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - start)


class Watcher:
    """A viewer through Janus, counting what it receives."""

    def __init__(self):
        self.frames, self.loudness, self.tasks = 0, [], []

    def on_track(self, track):
        self.tasks.append(asyncio.ensure_future(self._pull(track)))

    async def _pull(self, track):
        while True:
            frame = await track.recv()
            if track.kind == "video":
                self.frames += 1
            else:
                self.loudness.append(rms(frame))


@pytest.mark.slow
async def test_room_through_janus_serves_five_viewers_at_one_encode(tmp_path):
    with running_janus(tmp_path / "janus", session_timeout=None) as janus_url, \
            local_server(tmp_path / "home", 2, extra=("--janus-url", janus_url,
                                                      "--janus-admin-key", ADMIN_KEY)) as (url, pid):
        presenter = await AvatarClient(url.replace("http", "ws") + "ws").connect()
        await presenter.start_session(drive(), room="main", audio=SineTrack())
        watchers, subscribers = [], []
        try:
            async def subscribe():
                w = Watcher()
                sub = JanusSubscriber(janus_url, janus_room_id("main"), on_track=w.on_track)
                await sub.__aenter__()
                watchers.append(w)
                subscribers.append(sub)

            deadline = time.monotonic() + 20
            while True:  # the room reaches Janus a moment after the presenter starts
                try:
                    await subscribe()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            await wait_for(lambda: watchers[0].frames > 30, 20, "frames through Janus")
            one = await server_cpu(pid)
            for _ in range(4):
                await subscribe()
            await wait_for(lambda: all(w.frames > 30 for w in watchers), 20, "frames at all five viewers")
            five = await server_cpu(pid)
            print(f"avatar server CPU: {one:.0f}% of a core with 1 Janus viewer, {five:.0f}% with 5")
            for w in watchers:
                assert max(w.loudness[-25:]) > 0.05, "the presenter's voice did not reach a viewer"
            assert five < one * 1.25 + 5, (one, five)  # each direct viewer would add a VP8 encode
        finally:
            for sub in subscribers:
                await sub.close()
            for w in watchers:
                for t in w.tasks:
                    t.cancel()
            await presenter.close()
