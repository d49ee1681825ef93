"""`avatar bench live`: glass-to-glass and per-stage latency of a running avatar server.

Headless aiortc clients stream a clip at its camera rate; every avatar frame that comes
back is matched to the camera frame it shows (the server keeps input timestamps on its
output and reports them over the stats channel). Glass-to-glass here is client send
(frame handed to the encoder) -> client receive (frame decoded): encode, network,
server queue + compute, encode, decode.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.identity import default_home

from .bench.client import AvatarClient, ClientError, ClipTrack, nearest

STAGES = ("queue", "convert", "landmarks", "retarget", "render", "total")
BUSY_WAIT_S = 15.0


@dataclass
class RunConfig:
    """One configuration to measure: which identity (and so which engine) serves it."""
    label: str
    identity: str = "demo"

    @classmethod
    def parse(cls, text: str) -> "RunConfig":
        values = {}
        for part in filter(None, text.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in ("identity",):
                raise ValueError(f"bad configuration {text!r}: use identity=NAME")
            values[key] = value
        return cls(label=text, **values)


@dataclass
class SessionResult:
    config: str
    session: int
    sent: int = 0
    received: int = 0
    matched: int = 0
    latencies_ms: list = field(default_factory=list)  # (send time offset s, latency ms)
    arrivals: list = field(default_factory=list)  # receive times (s from start)
    server_stages: dict = field(default_factory=dict)  # stage -> list of per-second p50
    error: str | None = None


def percentiles(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "max": round(float(v.max()), 2), "n": int(v.size)}


# ---- the local server ------------------------------------------------------------------

@contextlib.contextmanager
def local_server(home: Path, max_sessions: int):
    """`avatar serve` in a child process on a free loopback port; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "--home", str(home), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-sessions", str(max_sessions)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            if proc.poll() is not None:
                raise ClientError(f"the local server exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise ClientError("the local server did not start within 60 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def check_server(url: str) -> None:
    if not _healthy(url):
        raise ClientError(f"no avatar server answers at {url} (GET /healthz failed)")


def ws_url(url: str) -> str:
    url = url if url.endswith("/") else url + "/"
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):] + "ws"
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):] + "ws"
    raise ClientError(f"--url must start with http:// or https://, got {url!r}")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---- driving frames --------------------------------------------------------------------

def load_frames(video: Path | None, seconds: float = 8.0) -> tuple[list[np.ndarray], float]:
    """The driving clip's first seconds as RGB frames, or a synthetic default."""
    if video is None:
        return synthetic_frames(seconds), 30.0
    from engines.video import open_video

    frames = []
    with open_video(video) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 30)
        for frame in c.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= seconds * fps:
                break
    if not frames:
        raise ClientError(f"{video}: no frames")
    return frames, fps


def synthetic_frames(seconds: float) -> list[np.ndarray]:
    """A talking, nodding demo face at 512x512, made with the warp engine: a driving
    clip that needs no data files."""
    import cv2

    from engines.identity import IdentityStore, identities_dir
    from engines.warp import WarpRenderer

    demo = IdentityStore(identities_dir()).load("demo")
    renderer = WarpRenderer(demo.reference, demo.neutral)
    centre = (demo.neutral[13, 1] + demo.neutral[14, 1]) / 2
    frames = []
    for i in range(int(seconds * 30)):
        t = i / 30
        pts = demo.neutral.copy()
        pts[demo.neutral[:, 1] > centre, 1] += 6 * max(0.0, np.sin(2 * np.pi * 1.3 * t))
        pts[:, 0] += 4 * np.sin(2 * np.pi * 0.4 * t)
        frames.append(cv2.resize(renderer.render(pts), (512, 512), interpolation=cv2.INTER_LINEAR))
    return frames


# ---- one measured run ------------------------------------------------------------------

async def open_session(url: str, track, token, identity) -> AvatarClient:
    """A client with a started session. A 'busy' answer is waited out for BUSY_WAIT_S: the
    sessions of the previous run (--compare, --scale) hold their slots until cleaned up."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        client = await AvatarClient(ws_url(url)).connect()
        try:
            await client.start_session(track, token, identity)
            return client
        except ClientError as e:
            await client.close()
            if e.code != "busy" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def run_sessions(url: str, configs: list[RunConfig], frames, fps, duration, warmup, token,
                       server_pid=None) -> tuple[list[SessionResult], list]:
    """One session per entry of `configs`, all at once, for warmup + duration seconds."""
    memory = []
    clients, tracks = [], []
    try:
        for cfg in configs:
            track = ClipTrack(frames, fps, loop=True)
            tracks.append(track)
            clients.append(await open_session(url, track, token, cfg.identity))
        start = time.time()
        while time.time() - start < warmup + duration:
            await asyncio.sleep(1.0)
            memory.append((round(time.time() - start, 1), rss_mb(server_pid)))
    finally:
        for t in tracks:
            t.stop()
        await asyncio.sleep(0.3)
        for c in clients:
            await c.close()
    results = [analyse(cfg.label, i, c, t, start + warmup, start + warmup + duration)
               for i, (cfg, c, t) in enumerate(zip(configs, clients, tracks))]
    return results, memory


def analyse(label, index, client: AvatarClient, track: ClipTrack, t0: float, t1: float) -> SessionResult:
    """The session's frames sent from t0 (after warmup) to t1 (the end of the measured time)."""
    res = SessionResult(label, index)
    sent = {p: t for p, t in track.sent_at.items() if t0 <= t < t1}
    res.sent = len(sent)
    res.received = sum(1 for _, t, _ in client.received if t0 <= t < t1)
    matched = client.matched()
    sent_pts = nearest(list(sent), [p for p, _ in matched]) if sent else []
    for pts, (_, recv_t) in zip(sent_pts, matched):
        if pts is not None:
            res.matched += 1
            res.latencies_ms.append((round(sent[pts] - t0, 3), round((recv_t - sent[pts]) * 1e3, 2)))
            res.arrivals.append(recv_t - t0)
    for s in client.stats:
        if s.get("time", 0) >= t0:
            for stage in STAGES:
                value = (s.get("stages_ms", {}).get(stage) or {}).get("p50")
                if value is not None:
                    res.server_stages.setdefault(stage, []).append(value)
    return res


def summarize(results: list[SessionResult], duration: float) -> dict:
    lat = [ms for r in results for _, ms in r.latencies_ms]
    arrivals = [np.diff(sorted(r.arrivals)) * 1e3 for r in results if len(r.arrivals) > 2]
    gaps = np.concatenate(arrivals) if arrivals else np.array([])
    sent, matched = sum(r.sent for r in results), sum(r.matched for r in results)
    return {
        "sessions": len(results),
        "glass_to_glass_ms": percentiles(lat),
        "fps_per_session": round(matched / max(len(results), 1) / duration, 2),
        "sent": sent,
        "matched": matched,
        "dropped": sent - matched,
        "matched_ratio": round(matched / sent, 4) if sent else 0.0,
        "jitter_ms": round(float(np.std(gaps)), 2) if gaps.size else None,
        "server_stages_p50_ms": {s: round(float(np.mean([v for r in results for v in r.server_stages.get(s, [])])), 2)
                                 for s in STAGES if any(r.server_stages.get(s) for r in results)},
    }


# ---- the command -----------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server to measure, e.g. http://127.0.0.1:8080/ "
                                 "(default: start a local server and stop it afterwards)")
    p.add_argument("--token", default=None, help="session token, if the server needs one")
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions (default 1)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds ignored at the start (default 3)")
    p.add_argument("--identity", default="demo", help="identity to drive (default demo)")
    p.add_argument("--video", type=Path, default=None,
                   help="driving clip (default: a synthetic talking demo face, 512x512 at 30 fps)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="two configurations (identity=NAME) measured interleaved in one run; prints B/A")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds for --compare (default 4)")
    p.add_argument("--scale", type=int, default=None, metavar="N",
                   help="measure 1..N sessions and report the largest that meets the target")
    p.add_argument("--target-p95", type=float, default=150.0, help="target glass-to-glass p95 ms (150)")
    p.add_argument("--target-fps", type=float, default=20.0, help="target fps per session (20)")
    p.add_argument("--out", type=Path, default=Path("bench-live"),
                   help="folder for report.json, report.html and latency.png (default ./bench-live)")


def run(args) -> int:
    for name in ("sessions", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.duration <= 0 or args.warmup < 0:
        raise ValueError("--duration must be positive and --warmup not negative")
    if args.scale is not None and not 1 <= args.scale <= 16:
        raise ValueError("--scale must be from 1 to 16")
    if args.compare:
        configs = [RunConfig.parse(c) for c in args.compare]
        if configs[0].label == configs[1].label:  # an A/A run shows the noise floor; keep both
            configs[1] = dataclasses.replace(configs[1], label=configs[1].label + " (B)")
    else:
        configs = [RunConfig(f"identity={args.identity}", args.identity)]
    frames, fps = load_frames(args.video)
    need = max(args.sessions, args.scale or 1)
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url, None
            ws_url(url)  # a malformed URL fails here, before any connection is tried
            check_server(url)
        else:
            # The same identities `avatar serve` would offer: an enrolled one can be measured.
            url, pid = stack.enter_context(local_server(args.home or default_home(), need))
        report = asyncio.run(_measure(args, url, pid, configs, frames, fps))
    report["machine"] = machine_info()
    report["server"] = {"url": url, "local": not args.url}
    write_reports(report, args.out)
    print(format_table(report))
    print(f"report: {args.out / 'report.json'}, {args.out / 'report.html'}, {args.out / 'latency.png'}")
    return 0


async def _measure(args, url, pid, configs, frames, fps) -> dict:
    report = {"settings": {"duration_s": args.duration, "warmup_s": args.warmup, "fps_in": fps,
                           "frames_in": f"{frames[0].shape[1]}x{frames[0].shape[0]}",
                           "video": str(args.video) if args.video else "synthetic demo face"}}
    if args.scale:
        steps = []
        for n in range(1, args.scale + 1):
            results, _ = await run_sessions(url, configs[:1] * n, frames, fps, args.duration, args.warmup,
                                            args.token, pid)
            s = summarize(results, args.duration)
            s["meets_target"] = bool(s["glass_to_glass_ms"]["p95"] is not None
                                     and s["glass_to_glass_ms"]["p95"] <= args.target_p95
                                     and s["fps_per_session"] >= args.target_fps)
            steps.append(s)
        ok = [s["sessions"] for s in steps if s["meets_target"]]
        report["scale"] = {"steps": steps, "target": {"p95_ms": args.target_p95, "fps": args.target_fps},
                           "max_sessions_meeting_target": max(ok) if ok else 0}
        report["runs"] = {configs[0].label: steps[0]}
        return report
    if args.compare:
        per = {c.label: [] for c in configs}
        for _ in range(args.rounds):  # A B A B ...: drift hits both alike
            for cfg in configs:
                results, _ = await run_sessions(url, [cfg] * args.sessions, frames, fps,
                                                args.duration / args.rounds, args.warmup, args.token, pid)
                per[cfg.label] += results
        # Each round measured duration / rounds seconds; the sessions column means at once.
        report["runs"] = {label: {**summarize(res, args.duration / args.rounds), "sessions": args.sessions,
                                  "rounds": args.rounds} for label, res in per.items()}
        report["sessions_detail"] = {label: [_series(r) for r in res] for label, res in per.items()}
        a, b = (report["runs"][c.label] for c in configs)
        report["compare"] = {"A": configs[0].label, "B": configs[1].label, "ratios_B_over_A": {
            "p50": _ratio(b["glass_to_glass_ms"]["p50"], a["glass_to_glass_ms"]["p50"]),
            "p95": _ratio(b["glass_to_glass_ms"]["p95"], a["glass_to_glass_ms"]["p95"]),
            "fps": _ratio(b["fps_per_session"], a["fps_per_session"])}}
        return report
    results, memory = await run_sessions(url, configs * args.sessions, frames, fps, args.duration,
                                         args.warmup, args.token, pid)
    report["runs"] = {configs[0].label: summarize(results, args.duration)}
    report["sessions_detail"] = {configs[0].label: [_series(r) for r in results]}
    report["server_rss_mb"] = memory
    report["drift"] = drift(results, args.duration)
    return report


def drift(results: list[SessionResult], duration: float) -> dict | None:
    """p95 of the first and the last minute (or fifth, for runs under five minutes)."""
    window = 60.0 if duration >= 300 else duration / 5
    first = [ms for r in results for t, ms in r.latencies_ms if t < window]
    last = [ms for r in results for t, ms in r.latencies_ms if t >= duration - window]
    if not first or not last:
        return None
    a, b = float(np.percentile(first, 95)), float(np.percentile(last, 95))
    return {"window_s": window, "first_p95_ms": round(a, 2), "last_p95_ms": round(b, 2),
            "change": round(b / a - 1, 4)}


def _series(r: SessionResult) -> dict:
    return {"session": r.session, "sent": r.sent, "received": r.received, "matched": r.matched,
            "latency_ms": r.latencies_ms, "server_stages_p50_ms": r.server_stages}


def _ratio(b, a):
    return round(b / a, 3) if a and b is not None else None


def machine_info() -> dict:
    import aiortc
    import av

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "aiortc": aiortc.__version__, "av": av.__version__,
            "backend": "CPU (warp engine)"}


# ---- reports ---------------------------------------------------------------------------

def format_table(report: dict) -> str:
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
             f"server: {'local' if report['server']['local'] else report['server']['url']}"]
    head = f"{'run':<22}{'sess':>5}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}{'fps/s':>8}{'matched':>9}{'jitter':>8}"
    lines.append(head + "   (glass-to-glass ms)")
    rows = [(label, s) for label, s in report["runs"].items()]
    if "scale" in report:
        rows = [(f"scale {s['sessions']}" + (" ok" if s["meets_target"] else ""), s) for s in report["scale"]["steps"]]
    for label, s in rows:
        g = s["glass_to_glass_ms"]
        fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
        lines.append(f"{label[:22]:<22}{s['sessions']:>5}{fmt(g['p50'])}{fmt(g['p95'])}{fmt(g['p99'])}"
                     f"{fmt(g['max'])}{s['fps_per_session']:8.1f}{100 * s['matched_ratio']:8.1f}%"
                     f"{fmt(s['jitter_ms'])}")
    for label, s in report["runs"].items():  # one line per configuration: where B's time goes
        if s["server_stages_p50_ms"]:
            lines.append(f"server stages p50 ms{f' ({label})' if len(report['runs']) > 1 else ''}: "
                         + ", ".join(f"{k} {v:.1f}" for k, v in s["server_stages_p50_ms"].items()))
    if "compare" in report:
        c = report["compare"]
        lines.append(f"B/A ({c['B']} over {c['A']}): " + ", ".join(f"{k} {v}" for k, v in c["ratios_B_over_A"].items()))
    if "scale" in report:
        lines.append(f"largest session count meeting p95 <= {report['scale']['target']['p95_ms']} ms at "
                     f">= {report['scale']['target']['fps']} fps: {report['scale']['max_sessions_meeting_target']}")
    if report.get("drift"):
        d = report["drift"]
        lines.append(f"drift: p95 first {d['window_s']:.0f} s {d['first_p95_ms']} ms, last {d['last_p95_ms']} ms "
                     f"({100 * d['change']:+.1f}%)")
    return "\n".join(lines)


def write_reports(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = make_plots(report)
    (out / "latency.png").write_bytes(plots["latency"])
    imgs = "\n".join(f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}">' for name, png in plots.items())
    html = (f"<!doctype html><meta charset=utf-8><title>avatar bench live</title>"
            f"<style>body{{font:14px sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}"
            f"img{{max-width:100%}}</style><h1>avatar bench live</h1>"
            f"<pre>{_escape(format_table(report))}</pre>{imgs}"
            f"<h2>raw</h2><pre>{_escape(json.dumps({k: v for k, v in report.items() if k != 'sessions_detail'}, indent=2))}</pre>")
    (out / "report.html").write_text(html)


def make_plots(report: dict) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail = report.get("sessions_detail", {})
    plots = {}
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, sessions in detail.items():
        for s in sessions:
            if s["latency_ms"]:
                t, ms = np.array(s["latency_ms"]).T
                ax.plot(t, ms, ".", ms=2, label=f"{label} #{s['session']}")
    ax.set(xlabel="time since warm-up (s)", ylabel="glass-to-glass (ms)", title="latency over time")
    if detail:
        ax.legend(fontsize=7, markerscale=4)
    plots["latency"] = _png(fig)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for label, sessions in detail.items():
        ms = [v for s in sessions for _, v in s["latency_ms"]]
        if ms:
            ax.hist(ms, bins=50, alpha=0.6, label=label)
    ax.set(xlabel="glass-to-glass (ms)", ylabel="frames", title="latency histogram")
    plots["histogram"] = _png(fig)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = list(report["runs"])
    bottom = np.zeros(len(labels))
    for stage in ("queue", "convert", "landmarks", "retarget", "render"):
        vals = np.array([report["runs"][l]["server_stages_p50_ms"].get(stage, 0.0) for l in labels])
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set(ylabel="ms (p50)", title="server stages")
    ax.legend(fontsize=8)
    plots["stages"] = _png(fig)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for label, sessions in detail.items():
        for s in sessions:
            if s["latency_ms"]:
                t = np.array(s["latency_ms"])[:, 0]
                counts, edges = np.histogram(t, bins=np.arange(0, t.max() + 1.0, 1.0))
                ax.plot(edges[:-1], counts, label=f"{label} #{s['session']}")
    ax.set(xlabel="time (s)", ylabel="fps delivered", title="fps over time")
    plots["fps"] = _png(fig)
    return plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
