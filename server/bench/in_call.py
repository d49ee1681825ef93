"""`avatar bench in-call`: what the "Avatar camera" extension path costs against the presenter
page, in one run, in Debian's Chromium with a fake camera playing a clip.

Rounds alternate the two paths on an in-process server, each in a fresh Chromium:
  page       the presenter page (/?autostart=1) shows the avatar beside the camera;
  extension  a stand-in meeting page on another origin picks "Avatar camera" and shows the
             1280x720 call frame the extension composes (the avatar fitted, unstretched).
For each window after a warm-up: the frames the page presented (requestVideoFrameCallback),
the server's latency for the session (receive -> avatar out, p50/p95 of its last frames),
Chromium's CPU (its whole process tree) and the server's, and for the extension the time it
spends composing each call frame, which is what it adds to the avatar's latency (plus the
wait for the next paint, as any camera frame). Prints a table, writes JSON."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from aiohttp import web

from engines.measure import machine_info, percentiles
from .chromium import CHROMIUM, browser_page, write_y4m
from .runner import cpu_seconds

PRESENTED = """(async () => {
  const v = document.querySelector(%r);
  let n = 0;
  const tick = () => { n += 1; v.requestVideoFrameCallback(tick); };
  v.requestVideoFrameCallback(tick);
  await new Promise((r) => setTimeout(r, %d));
  return n;
})()"""

PICK = """(async () => {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const avatar = devices.find((d) => d.label.startsWith('Avatar camera'));
  if (!avatar) return 'no Avatar camera in enumerateDevices';
  const v = document.getElementById('call');
  v.srcObject = await navigator.mediaDevices.getUserMedia({video: {deviceId: {exact: avatar.deviceId}}, audio: true});
  await v.play();
  return 'ok';
})()"""

MEETING = b"""<!doctype html><meta charset="utf-8"><title>Stand-in meeting</title>
<video id="call" autoplay muted playsinline width="640" height="360"></video>"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", type=Path, required=True, help="the fake camera's clip (a talking head)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured per window (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=4.0, help="before each window (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="page/extension pairs (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("bench-in-call.json"),
                        help="where to write the results (default: %(default)s)")


def run(args) -> int:
    if not shutil.which(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} is needed (apt-get install chromium)")
    report = asyncio.run(bench(args.video, args.seconds, args.warmup, args.rounds))
    print(format_table(report))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


async def bench(video: Path, seconds: float, warmup: float, rounds: int) -> dict:
    from server.config import ServerConfig
    from server.extension import write_extension
    from server.http.app import start_server

    with tempfile.TemporaryDirectory(prefix="bench-in-call-") as tmp:
        tmp = Path(tmp)
        os.environ["AVATAR_HOME"] = str(tmp / "home")
        camera = tmp / "camera.y4m"
        write_y4m(video, camera, 8.0)
        windows = []
        async with start_server(ServerConfig(port=0)) as srv, _meeting_site() as site:
            extension = write_extension(tmp / "extension", srv.url)
            for r in range(rounds):
                for path in ("page", "extension"):
                    profile = tmp / f"profile-{r}-{path}"
                    if path == "page":
                        url, flags, selector = f"{srv.url}?autostart=1", (), "#avatar"
                    else:
                        url, selector = f"{site}/meeting.html", "#call"
                        flags = (f"--load-extension={extension}", f"--disable-extensions-except={extension}",
                                 "--autoplay-policy=no-user-gesture-required")
                    windows.append(await _window(srv, path, url, flags, selector, camera, profile, seconds, warmup))
                    print(f"round {r + 1} {path}: {windows[-1]['fps']:.1f} fps, Chromium "
                          f"{windows[-1]['chromium_cpu_percent']:.0f}% of a core", flush=True)
    return summarize(windows, seconds, video)


async def _window(srv, path, url, flags, selector, camera, profile, seconds, warmup) -> dict:
    async with browser_page(url, camera, profile, *flags) as tools:
        await _until(tools, f"location.href === {url!r} && document.readyState === 'complete'")
        if path == "extension":
            picked = await tools.eval(PICK)
            if picked != "ok":
                raise RuntimeError(f"the meeting page could not pick the Avatar camera: {picked}")
        await _until(tools, f"(document.querySelector({selector!r}).videoWidth || 0) > 0", 30)
        await asyncio.sleep(warmup)
        browser = _browser_pid(profile)
        start = (time.time(), cpu_seconds(browser), cpu_seconds(os.getpid()))
        presented = await tools.eval(PRESENTED % (selector, int(seconds * 1000)))
        wall = time.time() - start[0]
        chromium = (cpu_seconds(browser) or 0) - (start[1] or 0)
        chromium_cpu = 100 * chromium / wall
        # Chromium is a child of this process: the server's share is the rest of its tree.
        server_cpu = 100 * ((cpu_seconds(os.getpid()) or 0) - (start[2] or 0) - chromium) / wall
        stats = await tools.eval("navigator.mediaDevices.avatarCameraStats || null")
    session = next(iter(srv.state.sessions.values()), None)
    latency = session.stats.summary()["latency_ms"] if session is not None else {}
    return {"path": path, "fps": presented / wall, "server_latency_ms": latency,
            "chromium_cpu_percent": chromium_cpu, "server_cpu_percent": server_cpu,
            "compose_ms": percentiles(stats["composeMs"]) if stats else None}


async def _until(tools, condition: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not await tools.eval(condition):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.2)


def _browser_pid(profile: Path) -> int | None:
    """Chromium's main process: the one whose command line names this profile and is no child."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and f"--user-data-dir={profile}".encode() in cmdline \
                and not any(arg.startswith(b"--type=") for arg in cmdline):
            return int(proc.name)
    return None


class _meeting_site:
    """The stand-in meeting page, served from another port: another origin."""

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_get("/meeting.html", lambda _r: web.Response(body=MEETING, content_type="text/html"))
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def summarize(windows: list[dict], seconds: float, video: Path) -> dict:
    def median(path, key, sub=None):
        values = [w[key][sub] if sub else w[key] for w in windows if w["path"] == path and w[key]]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    rows = {path: {"fps": median(path, "fps"),
                   "server_latency_p50_ms": median(path, "server_latency_ms", "p50"),
                   "server_latency_p95_ms": median(path, "server_latency_ms", "p95"),
                   "chromium_cpu_percent": median(path, "chromium_cpu_percent"),
                   "server_cpu_percent": median(path, "server_cpu_percent")}
            for path in ("page", "extension")}
    compose = [w["compose_ms"] for w in windows if w["compose_ms"]]
    rows["extension"]["compose_p50_ms"] = statistics.median(c["p50"] for c in compose) if compose else None
    rows["extension"]["compose_p95_ms"] = statistics.median(c["p95"] for c in compose) if compose else None
    ratios = {k: rows["extension"][k] / rows["page"][k] for k in rows["page"]
              if rows["page"][k] and rows["extension"].get(k) is not None}
    return {"machine": machine_info("warp (CPU)"), "video": str(video), "seconds": seconds,
            "summary": rows, "extension_over_page": ratios, "windows": windows}


def format_table(report: dict) -> str:
    rows, ratios = report["summary"], report["extension_over_page"]
    lines = [f"{'median over windows':<28}{'page':>10}{'extension':>12}{'B/A':>8}"]
    for key in ("fps", "server_latency_p50_ms", "server_latency_p95_ms", "chromium_cpu_percent",
                "server_cpu_percent", "compose_p50_ms", "compose_p95_ms"):
        a, b = rows["page"].get(key), rows["extension"].get(key)
        cell = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        ratio = f"{ratios[key]:.2f}" if key in ratios else ""
        lines.append(f"{key:<28}{cell(a):>10}{cell(b):>12}{ratio:>8}")
    cpu = report["machine"].get("cpu", "")
    lines.append(f"machine: {cpu}; compose = what the extension adds per frame to the avatar's latency")
    return "\n".join(lines)
