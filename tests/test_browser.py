"""A real browser: Debian's chromium with a fake camera playing a driver clip, driven over
the DevTools protocol. Skipped when /usr/bin/chromium is missing."""
from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import pytest

from helpers import Client, clip, running_server
from server.bench.chromium import CHROMIUM, DevTools, browser_page, write_y4m
from server.telemetry import STAGES

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


PAGE_STATE = """(() => {
  const v = document.getElementById('avatar');
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality().totalVideoFrames : 0;
  let mean = 0;
  if (v.videoWidth) {
    const c = document.createElement('canvas');
    c.width = 64; c.height = 64;
    const g = c.getContext('2d');
    g.drawImage(v, 0, 0, 64, 64);
    const d = g.getImageData(0, 0, 64, 64).data;
    let s = 0;
    for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
    mean = s / (d.length / 4 * 3);
  }
  return {frames: q, width: v.videoWidth, mean, stats: window.avatar.statsCount,
          summary: document.getElementById('stats-summary').textContent,
          message: document.getElementById('message').textContent,
          error: window.avatar.lastError,
          // The avatar track's receiver: the page asks for the smallest playout delay.
          playout: (() => {
            const r = window.avatar.pc && window.avatar.pc.getReceivers().find((x) => x.track.kind === 'video');
            return r ? (r.jitterBufferTarget ?? r.playoutDelayHint ?? null) : null;
          })(),
          stages: window.avatar.session && window.avatar.session.stages,
          // Without a room there is no viewer link to show.
          shareShown: getComputedStyle(document.getElementById('share')).display !== 'none'};
})()"""


async def poll(tools: DevTools, done, seconds: float, expression: str = PAGE_STATE) -> dict:
    """`expression` (the page's state) until done(state) or the time is up; the last state."""
    deadline = time.monotonic() + seconds
    state = {}
    while time.monotonic() < deadline:
        state = await tools.eval(expression) or {}
        if done(state):
            break
        await asyncio.sleep(0.5)
    return state


def camera(tmp_path) -> Path:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    y4m = tmp_path / "camera.y4m"
    write_y4m(clip("drive_wink.mp4"), y4m)
    return y4m


@pytest.mark.slow
async def test_browser_shows_avatar_and_stats(tmp_path, monkeypatch):
    y4m = camera(tmp_path)
    async with running_server(tmp_path, monkeypatch) as srv:
        async with browser_page(f"{srv.url}?autostart=1", y4m, tmp_path / "profile") as tools:
            state = await poll(tools, lambda s: s.get("frames", 0) > 30 and s.get("stats", 0) >= 3
                               and s.get("mean", 0) > 20, 45)
            shot = await tools.call("Page.captureScreenshot", format="png")
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "browser.png").write_bytes(base64.b64decode(shot["data"]))
        print("page state:", state)
        assert state.get("frames", 0) > 30, state
        assert state.get("width") == 256, state
        assert state.get("mean", 0) > 20, f"avatar video looks black: {state}"
        assert state.get("stats", 0) >= 3 and "fps" in state.get("summary", ""), state
        assert srv.state.metrics.frames_processed > 30
        assert state.get("playout") == 0, f"the avatar receiver keeps a playout delay: {state}"
        assert state.get("stages") == list(STAGES), state  # the overlay's names come from the server
        assert state.get("shareShown") is False, state


@pytest.mark.slow
async def test_browser_says_busy_then_reconnects_when_a_slot_frees(tmp_path, monkeypatch):
    y4m = camera(tmp_path)
    async with running_server(tmp_path, monkeypatch, max_sessions=1) as srv:
        occupant = await Client(srv.ws_url).connect()
        assert (await occupant.hello())["type"] == "session"
        async with browser_page(f"{srv.url}?autostart=1", y4m, tmp_path / "profile") as tools:
            state = await poll(tools, lambda s: "busy" in s.get("message", ""), 20)
            assert "busy" in state.get("message", ""), state
            await occupant.close()  # the slot frees: the page's automatic reconnect gets it
            state = await poll(tools, lambda s: s.get("frames", 0) > 10 and s.get("mean", 0) > 20, 45)
        assert state.get("frames", 0) > 10 and "Streaming" in state.get("message", ""), state
