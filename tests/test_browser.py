"""A real browser: Debian's chromium with a fake camera playing a driver clip, driven over
the DevTools protocol. Skipped when /usr/bin/chromium is missing."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import av
import pytest
import websockets

from helpers import Client, clip, running_server, wait_for
from server.telemetry import STAGES

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def write_y4m(src: Path, dst: Path, seconds: float = 4.0) -> None:
    """Chromium's fake camera reads .y4m; it loops the file."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="yuv4mpegpipe") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream("rawvideo", rate=30)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
        for i, frame in enumerate(inp.decode(vin)):
            if i >= seconds * 30:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts = None
            for packet in vout.encode(frame):
                out.mux(packet)
        for packet in vout.encode():
            out.mux(packet)


class DevTools:
    """Just enough of the Chrome DevTools protocol: send a command, await its result."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        return result["result"].get("value")


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


@contextlib.asynccontextmanager
async def browser_page(url: str, y4m: Path, profile: Path, *flags: str):
    """Chromium with a fake camera playing y4m, opened on url (more command-line `flags`);
    yields its DevTools session."""
    proc = subprocess.Popen([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={y4m}", f"--user-data-dir={profile}",
        "--remote-debugging-port=0", "--window-size=1280,900", *flags, url,
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        await wait_for(port_file.exists, 20, "chromium's DevTools port")
        await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = await asyncio.to_thread(
            lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10)))
        page = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2 ** 25) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


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
