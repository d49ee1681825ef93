"""Headless Chromium for benchmarks and tests: a fake camera playing a clip, driven over the
DevTools protocol (just enough of it: a command and its result, and page evaluation)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import av
import websockets

CHROMIUM = "/usr/bin/chromium"


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
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{CHROMIUM} did not start (no DevTools port)")
            await asyncio.sleep(0.05)
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
