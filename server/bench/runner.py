"""Running a measurement: the server (a local child or --url), the driving clip, the
sessions, and the loop that measures one, several (--compare) or more and more (--scale)
configurations."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import VP8_SPEED_MAX as MAX_SPEED, VP8_SPEED_MIN as MIN_SPEED
from ..media.stages import KINDS as COMPUTE_KINDS
from ..security import check_call_frame
from .avsync import (MouthMeter, SpeechTrack, ToneTrack, audio_series, mouth_series, speech_samples, summary,
                     windowed_offsets)
from .client import AvatarClient, ClientError, ClipTrack, EncodedClip, ReplayTrack, encode_clip
from .stats import SessionResult, analyse, drift, meets_target, ratios, series, summarize

BUSY_WAIT_S = 15.0
# Seconds between readings of a local server's memory. A PSS reading walks the page tables of
# each of its processes (~10 ms apiece, holding that process's memory-map lock): read every
# second, it raised three sessions' glass-to-glass p95 from 36-41 to 52-60 ms (from a thread)
# or 68-78 ms (on this event loop, as before).
MEMORY_EVERY_S = 10.0
CLIENT_ENCODE = ("live", "once")  # the bench client's camera: encoded as sent, or replayed (Camera)


@dataclass
class RunConfig:
    """One configuration to measure: which identity (and so which engine) serves it, and
    the server's settings under comparison: whether video frames complete on the RTP marker
    bit (server/media/jitter.py) on both receive hops, OpenCV's threads and the VP8 encoder's
    speed (server/media/vp8.py), and where sessions compute (server/media/stages.py); and whether the bench
    client encodes its camera live or replays one encode (Camera); `url` is the server that
    serves it, filled in once the servers run."""
    label: str
    identity: str = "demo"
    marker: bool = True
    opencv_threads: int = 0  # the server's --opencv-threads (0: OpenCV's default)
    vp8_speed: int | None = None  # the server's --vp8-speed (None: its default)
    compute: str | None = None  # the server's --compute (None: its default)
    client_encode: str | None = None  # "live" or "once" (None: --client-encode's)
    frame: str | None = None  # a call frame "WxH" the session sends (the scene composed), None: the square
    url: str | None = None
    server_pid: int | None = None  # the local server's process, to read its CPU time

    @classmethod
    def parse(cls, text: str) -> "RunConfig":
        values: dict = {}
        for part in filter(None, text.split(",")):
            key, sep, value = part.partition("=")
            if sep and key == "identity":
                values[key] = value
            elif sep and key == "marker" and value in ("on", "off"):
                values[key] = value == "on"
            elif sep and key == "opencv-threads" and value.isdigit() and int(value) <= 64:
                values["opencv_threads"] = int(value)
            elif sep and key == "vp8-speed" and value.isdigit() and MIN_SPEED <= int(value) <= MAX_SPEED:
                values["vp8_speed"] = int(value)
            elif sep and key == "compute" and value in COMPUTE_KINDS:
                values[key] = value
            elif sep and key == "client-encode" and value in CLIENT_ENCODE:
                values["client_encode"] = value
            elif sep and key == "frame" and _call_frame(value):
                values[key] = value
            else:
                raise ValueError(f"bad configuration {text!r}: use identity=NAME, marker=on|off, "
                                 f"opencv-threads=N, vp8-speed={MIN_SPEED}..{MAX_SPEED}, "
                                 f"compute={'|'.join(COMPUTE_KINDS)}, client-encode={'|'.join(CLIENT_ENCODE)} "
                                 "and/or frame=WxH (a call frame, e.g. 1280x720), e.g. identity=demo,marker=off")
        return cls(label=text, **values)

    def server_flags(self) -> tuple[str, ...]:
        """`avatar serve` flags for this configuration's server settings."""
        flags = () if self.marker else ("--no-marker-completion",)
        if self.opencv_threads:
            flags += ("--opencv-threads", str(self.opencv_threads))
        if self.vp8_speed is not None:
            flags += ("--vp8-speed", str(self.vp8_speed))
        if self.compute is not None:
            flags += ("--compute", self.compute)
        return flags


def _call_frame(text: str) -> bool:
    try:
        check_call_frame(text)
    except ValueError:
        return False
    return True


# ---- the server ------------------------------------------------------------------------

@contextlib.contextmanager
def local_server(home: Path, max_sessions: int, extra: tuple[str, ...] = ()):
    """`avatar serve` in a child process on a free loopback port (more flags in `extra`);
    stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "--home", str(home), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-sessions", str(max_sessions)]
    cmd += extra
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


# ---- driving frames --------------------------------------------------------------------

@dataclass
class Camera:
    """What every bench session sends as its camera: the driving clip's RGB frames at `fps`,
    encoded live by each session's sender, or replayed from one encode (`encoded`)."""
    frames: list[np.ndarray]
    fps: float
    encoded: EncodedClip | None = None

    @classmethod
    def load(cls, video: Path | None, encode_once: bool = False) -> "Camera":
        """The clip (load_frames); with `encode_once`, also encoded now for replay, by the VP8
        encoder this process's senders use (vp8.install the client's speed first)."""
        frames, fps = load_frames(video)
        return cls(frames, fps, encode_clip(frames, fps) if encode_once else None)

    def track(self, replay: bool = False) -> ClipTrack:
        """A new looping camera track for one session: replaying the encode if `replay`."""
        if replay:
            return ReplayTrack(self.encoded, self.fps, loop=True)
        return ClipTrack(self.frames, self.fps, loop=True)

    @property
    def size(self) -> str:
        return f"{self.frames[0].shape[1]}x{self.frames[0].shape[0]}"


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
    from engines.render.warp import WarpRenderer

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


# ---- sessions --------------------------------------------------------------------------

async def open_session(url: str, track, token, cfg: RunConfig, **publish) -> AvatarClient:
    """A client with a started session on cfg's server (else `url`). A 'busy' answer is
    waited out for BUSY_WAIT_S: the sessions of the previous run (--compare, --scale) hold
    their slots until cleaned up."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        started = time.perf_counter()
        client = await AvatarClient(ws_url(cfg.url or url), marker_completion=cfg.marker).connect()
        try:
            await client.start_session(track, token, cfg.identity, frame=cfg.frame, **publish)
            client.connect_ms = (time.perf_counter() - started) * 1e3
            return client
        except ClientError as e:
            await client.close()
            if e.code != "busy" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def run_sessions(url: str, configs: list[RunConfig], camera: Camera, duration, warmup, token,
                       server_pid=None) -> tuple[list[SessionResult], list]:
    """One session per entry of `configs`, all at once, for warmup + duration seconds."""
    memory = []
    clients, tracks = [], []
    try:
        for cfg in configs:
            track = camera.track(replay=cfg.client_encode == "once")
            tracks.append(track)
            clients.append(await open_session(url, track, token, cfg))
        start = time.time()
        cpu_start = server_cpu_start = machine_start = None

        async def read_memory():
            memory.append((round(time.time() - start, 1), await asyncio.to_thread(memory_mb, server_pid)))

        while time.time() - start < warmup + duration:
            await asyncio.sleep(1.0)
            if not memory or time.time() - start - memory[-1][0] >= MEMORY_EVERY_S:
                await read_memory()
            if cpu_start is None and time.time() - start >= warmup:
                cpu_start = (time.process_time(), time.time())
                server_cpu_start = {pid: cpu_seconds(pid) for pid in {c.server_pid for c in configs}}
                machine_start = machine_cpu_ticks()
        cpu = client_cpu_percent(cpu_start, len(configs))
        machine = machine_cpu_percent(machine_start)
        server_cpu = {pid: server_cpu_percent(pid, server_cpu_start[pid], cpu_start,
                                              sum(c.server_pid == pid for c in configs))
                      for pid in server_cpu_start or {}}
        await read_memory()  # at the end too, however short the run
    finally:
        for t in tracks:
            t.stop()
        await asyncio.sleep(0.3)
        for c in clients:
            await c.close()
    # Server-side times can be set against the client's only on one machine's clock.
    same_clock = server_pid is not None
    results = [analyse(cfg.label, i, c, t, start + warmup, start + warmup + duration, same_clock)
               for i, (cfg, c, t) in enumerate(zip(configs, clients, tracks))]
    for r, cfg, c in zip(results, configs, clients):
        r.landed, r.redirects = c.ws_url.split("?", 1)[0], len(c.redirects)  # no reservation id
        r.connect_ms = round(c.connect_ms, 1)
        r.client_cpu_percent = cpu
        r.server_cpu_percent = server_cpu.get(cfg.server_pid)
        r.machine_cpu_percent = machine
    return results, memory


@contextlib.asynccontextmanager
async def presenter_and_viewer(url: str, cfg: RunConfig, track, microphone, token, first_frame):
    """A presenter sending `track` and `microphone` into a room of its own, and one viewer of
    that room whose avatar frames a MouthMeter measures: (presenter, viewer, meter). At the
    end the tracks stop and both clients and the meter close; what they received stays."""
    room = f"bench-{secrets.token_hex(3)}"
    meter = MouthMeter()
    await asyncio.to_thread(meter.measure, first_frame)  # mediapipe loads now, not on the first frames
    meter.results.clear()
    viewer = await AvatarClient(ws_url(cfg.url or url), marker_completion=cfg.marker).connect()
    presenter = None
    try:
        await viewer.watch(room, token)
        viewer.on_video = meter.submit
        presenter = await open_session(url, track, token, cfg, room=room, audio=microphone)
        yield presenter, viewer, meter
    finally:
        track.stop()
        microphone.stop()
        await asyncio.sleep(0.3)
        for client in (presenter, viewer):
            if client is not None:
                await client.close()
        meter.close()


async def run_avsync(url: str, cfg: RunConfig, camera: Camera, duration, warmup, token, server_pid=None
                     ) -> tuple[SessionResult, dict]:
    """One session presenting in a room with a tone that follows the clip's mouth as its
    microphone, and one viewer of that room measuring the A/V offset it gets (avsync.py).
    The session's own glass-to-glass is measured as usual."""
    mouth = await asyncio.to_thread(mouth_series, camera.frames)
    track = camera.track(replay=cfg.client_encode == "once")
    tone = ToneTrack(mouth, camera.fps, lambda: track.start)
    async with presenter_and_viewer(url, cfg, track, tone, token, camera.frames[0]) as (presenter, viewer, meter):
        start = time.time()
        await asyncio.sleep(warmup + duration)
    t0 = start + warmup
    result = analyse(cfg.label, 0, presenter, track, t0, t0 + duration, server_pid is not None)
    video = [(t, m) for t, m in meter.results if t >= t0]
    audio_t, audio_v = audio_series([(t, f) for t, f in viewer.audio if t >= t0])  # timed mid-frame
    figure = summary(windowed_offsets(*zip(*video), audio_t, audio_v) if video and len(audio_t) else [])
    figure.update(viewer_video_frames=len(video), viewer_audio_frames=len(audio_t),
                  frames_not_measured=meter.skipped)
    return result, figure


VOICE_TO_MOUTH_MS = 250.0  # goal (issue #36): the mouth moves at the viewer at most this long after the sound left
VOICE_SENTENCES = (  # eSpeak NG's English; lip closures (p b m), rounding and open vowels
    "Maybe Bob met my mom by the pub.",
    "How would you know what the old man wanted?",
    "Pam, please pass the bottle of apple milk!",
    "Five wide eyes watched a bright kite fly high.",
)


async def run_voice(url: str, cfg: RunConfig, camera: Camera, duration, warmup, token, server_pid=None) -> dict:
    """One presenter in a room with the camera off (control voice_only), eSpeak NG sentences as
    its microphone, and one viewer of that room. The viewer measures the A/V offset it gets,
    and the voice-to-mouth delay: from the sound leaving the presenter to the mouth moving
    at the viewer (both by windowed_offsets, the mouth against the sound's loudness)."""
    speech = SpeechTrack(await asyncio.to_thread(speech_samples, VOICE_SENTENCES))
    track = camera.track(replay=cfg.client_encode == "once")
    async with presenter_and_viewer(url, cfg, track, speech, token, camera.frames[0]) as (presenter, viewer, meter):
        await presenter.control(voice_only=True)
        start = time.time()
        await asyncio.sleep(warmup)
        cpu_start = (time.process_time(), time.time())
        server_start = cpu_seconds(server_pid) if server_pid else None
        await asyncio.sleep(duration)
        server_cpu = server_cpu_percent(server_pid, server_start, cpu_start, 1) if server_pid else None
    t0 = start + warmup
    seen = [(t, m) for t, m in meter.results if t >= t0]
    mouth_t, mouth_v = (np.array([t for t, _ in seen]), np.array([m for _, m in seen])) if seen else ([], [])
    heard_t, heard_v = audio_series([(t, f) for t, f in viewer.audio if t >= t0])
    said_t, said_v = speech.loudness_series()
    keep = said_t >= t0
    figure = {"av_offset": summary(windowed_offsets(mouth_t, mouth_v, heard_t, heard_v) if seen else []),
              "voice_to_mouth": summary(windowed_offsets(mouth_t, mouth_v, said_t[keep], said_v[keep], max_lag=1.0)
                                        if seen else [], target_ms=VOICE_TO_MOUTH_MS),
              "viewer_video_frames": len(mouth_t), "viewer_audio_frames": len(heard_t),
              "frames_not_measured": meter.skipped, "server_cpu_percent": server_cpu,
              "sentences": list(VOICE_SENTENCES)}
    return figure


def client_cpu_percent(since: tuple[float, float] | None, sessions: int) -> float | None:
    """This process's CPU use per session since `since` (process time, wall time), in % of
    one core: the bench clients encode and decode on the same cores as a local server."""
    if since is None:
        return None
    return _per_session(time.process_time() - since[0], since[1], sessions)


def machine_cpu_ticks() -> list[int] | None:
    """The machine's CPU time so far, all cores, per kind (/proc/stat's "cpu" line: user, nice,
    system, idle, iowait, irq, softirq, steal), or None where there is no /proc/stat."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def machine_cpu_percent(start: list[int] | None) -> dict | None:
    """What the whole machine did since `start` (machine_cpu_ticks), in % of one core, out of
    100 per core: busy (everything on it, not only this bench and its server) and steal (time
    a virtual machine's hypervisor gave its cores to others: noise from outside)."""
    end = machine_cpu_ticks()
    if start is None or end is None:
        return None
    d = [b - a for a, b in zip(start, end)]
    total = sum(d) or 1
    scale = 100 * (os.cpu_count() or 1) / total
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    return {"busy": round(busy * scale, 1), "steal": round(d[7] * scale, 1)}


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) a process and its descendants have used (the
    server's sessions compute in processes of their own), or None for no local process.
    Children that ended count in their parent's figures once it has reaped them."""
    return _over_tree(pid, _own_cpu_seconds)


def memory_mb(pid: int | None) -> float | None:
    """The memory a process and its descendants hold, in MB: the sum of their proportional
    set sizes, so pages they share (the libraries a fork server loaded once) count once, not
    once per process. None for no local process."""
    return _over_tree(pid, _own_pss_mb)


def _over_tree(pid: int | None, own) -> float | None:
    """own(pid) summed over a process and its living descendants; None if it is not there."""
    mine = None if pid is None else own(pid)
    if mine is None:
        return None
    return mine + sum(_over_tree(child, own) or 0.0 for child in _children(pid))


def _own_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, and of reaped children


def _own_pss_mb(pid: int) -> float | None:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0) / 1024


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    children: list[int] = []
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def server_cpu_percent(pid: int | None, start: float | None, since: tuple[float, float] | None,
                       sessions: int) -> float | None:
    """A local server's CPU use per session, in % of one core, since `since` (this process's
    time, wall time), when the server had used `start` CPU seconds (cpu_seconds)."""
    now = cpu_seconds(pid)
    if now is None or start is None or since is None:
        return None
    return _per_session(now - start, since[1], sessions)


def _per_session(cpu: float, wall_since: float, sessions: int) -> float:
    """`cpu` seconds used since wall time `wall_since`, per session, in % of one core."""
    return round(100 * cpu / max(time.time() - wall_since, 1e-6) / max(sessions, 1), 1)


# ---- the measurement loop --------------------------------------------------------------

async def measure(args: argparse.Namespace, url: str, pid: int | None, configs: list[RunConfig],
                  camera: Camera) -> dict:
    """The report's measured part: a scale sweep, an interleaved comparison or one run."""
    report = {"settings": {"duration_s": args.duration, "warmup_s": args.warmup, "fps_in": camera.fps,
                           "frames_in": camera.size,
                           "video": str(args.video) if args.video else "synthetic demo face"}}
    if args.scale:
        return await _scale(args, url, pid, configs[0], camera, report)
    if args.avsync:
        result, figure = await run_avsync(url, configs[0], camera, args.duration, args.warmup,
                                          args.token, pid)
        report["runs"] = {configs[0].label: summarize([result], args.duration)}
        report["sessions_detail"] = {configs[0].label: [series(result)]}
        report["avsync"] = figure
        return report
    if args.voice:
        report["runs"] = {}
        report["voice"] = await run_voice(url, configs[0], camera, args.duration, args.warmup, args.token, pid)
        return report
    if args.compare:
        return await _compare(args, url, pid, configs, camera, report)
    results, memory = await run_sessions(url, configs * args.sessions, camera, args.duration,
                                         args.warmup, args.token, pid)
    report["runs"] = {configs[0].label: summarize(results, args.duration)}
    report["sessions_detail"] = {configs[0].label: [series(r) for r in results]}
    report["server_memory_mb"] = memory  # [(seconds, MB)], server and session processes
    report["drift"] = drift(results, args.duration)
    return report


async def _scale(args, url, pid, config: RunConfig, camera: Camera, report: dict) -> dict:
    """1..N sessions of one configuration; the largest count meeting the target."""
    steps = []
    for n in range(1, args.scale + 1):
        results, _ = await run_sessions(url, [config] * n, camera, args.duration, args.warmup,
                                        args.token, pid)
        s = summarize(results, args.duration)
        s["meets_target"] = meets_target(s, args.target_p95, args.target_fps)
        steps.append(s)
    ok = [s["sessions"] for s in steps if s["meets_target"]]
    report["scale"] = {"steps": steps, "target": {"p95_ms": args.target_p95, "fps": args.target_fps},
                       "max_sessions_meeting_target": max(ok) if ok else 0}
    report["runs"] = {config.label: steps[0]}
    return report


async def _compare(args, url, pid, configs: list[RunConfig], camera: Camera, report: dict) -> dict:
    """A and B in alternating rounds, so drift hits both alike; B/A ratios."""
    per = {c.label: [] for c in configs}
    for _ in range(args.rounds):  # A B A B ...
        for cfg in configs:
            results, _ = await run_sessions(url, [cfg] * args.sessions, camera,
                                            args.duration / args.rounds, args.warmup, args.token, pid)
            per[cfg.label] += results
    # Each round measured duration / rounds seconds; the sessions column means at once.
    report["runs"] = {label: {**summarize(res, args.duration / args.rounds), "sessions": args.sessions,
                              "rounds": args.rounds} for label, res in per.items()}
    report["sessions_detail"] = {label: [series(r) for r in res] for label, res in per.items()}
    a, b = (report["runs"][c.label] for c in configs)
    report["compare"] = {"A": configs[0].label, "B": configs[1].label, "ratios_B_over_A": ratios(a, b)}
    return report
