"""`avatar bench live`: its flags and what running it does."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
from pathlib import Path

from engines.identity import IdentityError, IdentityStore, default_home, identities_dir
from engines.measure import machine_info

from ..media import vp8
from ..config import VP8_SPEED_AIORTC, VP8_SPEED_MAX, VP8_SPEED_MIN
from .report import format_table, write_reports
from .runner import CLIENT_ENCODE, Camera, RunConfig, check_server, local_server, measure, ws_url

# What renders an identity of each engine (engines/pipeline.py make_renderer).
ENGINE_BACKENDS = {"warp": "CPU (warp engine)",
                   "neural": "neural engine, or the warp engine if its model cannot run (the server logs which)"}


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
                   help="two configurations measured interleaved in one run; prints B/A. Each is "
                        "identity=NAME, marker=on|off (marker=off: frames complete as in plain "
                        "aiortc, one frame later, on the server and in this client) and/or "
                        "opencv-threads=N, vp8-speed=N, compute=process|thread (the server's "
                        "--opencv-threads, --vp8-speed, --compute), client-encode=live|once (this "
                        "client's, as --client-encode), frame=WxH (the session sends a call frame "
                        "of that size, the identity's scene composed: issue #35), e.g. --compare "
                        "marker=off marker=on, or --compare identity=demo frame=1280x720")
    p.add_argument("--client-vp8-speed", type=int, default=VP8_SPEED_AIORTC, metavar="N",
                   help=f"libvpx speed of this client's camera encode ({VP8_SPEED_MIN}..{VP8_SPEED_MAX}; "
                        f"default {VP8_SPEED_AIORTC}: aiortc's own settings, denoiser on, as a browser "
                        "encodes a camera in software). It shares the server's cores; the server's own "
                        "encoder is its --vp8-speed")
    p.add_argument("--client-encode", choices=CLIENT_ENCODE, default=None,
                   help="live: each session's camera is encoded as it is sent, on this machine's cores "
                        "beside the server's, as one machine must. once: the clip is encoded once before "
                        "the run and replayed, each frame sent after the time its encode took: "
                        "glass-to-glass still counts a browser's encode, but the CPU it takes is not "
                        "here, as with browsers on their own machines. Default: once with --scale (the "
                        "server's own capacity), else live")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds for --compare (default 4)")
    p.add_argument("--scale", type=int, default=None, metavar="N",
                   help="measure 1..N sessions and report the largest that meets the target")
    p.add_argument("--avsync", action="store_true",
                   help="A/V sync at a viewer: the session presents in a room with a tone that follows "
                        "the clip's mouth as its microphone; a viewer of the room measures how much the "
                        "avatar's mouth lags the sound (p50/p95 ms per 10 s window, drift). Not with "
                        "--compare, --scale or --sessions")
    p.add_argument("--voice", action="store_true",
                   help="the voice drives the face: the session presents in a room with the camera off "
                        "(control voice_only) and eSpeak NG sentences as its microphone; a viewer of the "
                        "room measures the A/V offset it gets and the delay from the sound leaving the "
                        "presenter to the mouth moving at the viewer (per 10 s window), and the server's "
                        "CPU. Not with --compare, --scale, --sessions or --avsync")
    p.add_argument("--target-p95", type=float, default=150.0, help="target glass-to-glass p95 ms (150)")
    p.add_argument("--target-fps", type=float, default=20.0, help="target fps per session (20)")
    p.add_argument("--out", type=Path, default=Path("bench-live"),
                   help="folder for report.json, report.html and latency.png (default ./bench-live)")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    configs = run_configs(args)
    vp8.install(args.client_vp8_speed)  # this process's senders: the bench client's cameras
    camera = Camera.load(args.video, encode_once=any(c.client_encode == "once" for c in configs))
    need = max(args.sessions, args.scale or 1)
    home = args.home or default_home()
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url, None
            ws_url(url)  # a malformed URL fails here, before any connection is tried
            check_server(url)
        else:
            # The same identities `avatar serve` would offer: an enrolled one can be measured.
            # One server per server-side setting (the marker setting is the client's too).
            servers = {k: stack.enter_context(local_server(home, need, extra=k))
                       for k in sorted({c.server_flags() for c in configs})}
            configs = [dataclasses.replace(c, url=u, server_pid=p)
                       for c in configs for u, p in [servers[c.server_flags()]]]
            url, pid = next(iter(servers.values()))
        report = asyncio.run(measure(args, url, pid, configs, camera))
    report["machine"] = machine_info(backend=served_backend(args.url, home, configs))
    report["server"] = {"url": url, "local": not args.url}
    encodes = {c.client_encode for c in configs}
    report["client"] = {"vp8_speed": args.client_vp8_speed,
                        "encode": encodes.pop() if len(encodes) == 1 else "per configuration"}
    write_reports(report, args.out)
    print(format_table(report))
    print(f"report: {args.out / 'report.json'}, {args.out / 'report.html'}, {args.out / 'latency.png'}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse settings that cannot make a measurement, before anything starts."""
    for name in ("sessions", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.duration <= 0 or args.warmup < 0:
        raise ValueError("--duration must be positive and --warmup not negative")
    if not VP8_SPEED_MIN <= args.client_vp8_speed <= VP8_SPEED_MAX:
        raise ValueError(f"--client-vp8-speed must be {VP8_SPEED_MIN}..{VP8_SPEED_MAX}")
    if args.scale is not None and not 1 <= args.scale <= 16:
        raise ValueError("--scale must be from 1 to 16")
    if args.avsync and (args.compare or args.scale or args.sessions != 1):
        raise ValueError("--avsync measures one presenter and one viewer: not with --compare, --scale or --sessions")
    if args.voice and (args.compare or args.scale or args.sessions != 1 or args.avsync):
        raise ValueError("--voice measures one presenter and one viewer: not with --compare, --scale, "
                         "--sessions or --avsync")
    if (args.avsync or args.voice) and args.duration < 10:
        raise ValueError("--avsync and --voice need --duration of at least 10 s (offsets are measured per 10 s window)")
    if args.url and any(c.opencv_threads or c.vp8_speed is not None or c.compute for c in run_configs(args)):
        raise ValueError("opencv-threads=N, vp8-speed=N and compute=KIND need the local server; for --url, "
                         "start it with --opencv-threads N, --vp8-speed N or --compute KIND")
    if args.url and any(not c.marker for c in run_configs(args)):
        raise ValueError("marker=off needs the local server (it starts one with --no-marker-completion); "
                         "for --url, start that server with --no-marker-completion yourself")


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """--compare's two configurations, else the one --identity names."""
    # --scale asks what the server can serve: three cameras encoded on its own 2 cores took
    # it from three sessions to two (README).
    encode = args.client_encode or ("once" if args.scale else "live")
    if not args.compare:
        return [RunConfig(f"identity={args.identity}", args.identity, client_encode=encode)]
    configs = [RunConfig.parse(c) for c in args.compare]
    configs = [dataclasses.replace(c, client_encode=c.client_encode or encode) for c in configs]
    if configs[0].label == configs[1].label:  # an A/A run shows the noise floor; keep both
        configs[1] = dataclasses.replace(configs[1], label=configs[1].label + " (B)")
    return configs


def served_backend(url: str | None, home: Path, configs: list[RunConfig]) -> str:
    """What rendered the avatar frames. A local server serves `home`'s identities, each with
    its manifest's engine; a remote server's engines cannot be seen from here."""
    if url:
        return f"as served by {url}"
    store = IdentityStore(identities_dir(home))
    backends = {}
    for cfg in configs:
        try:
            engine = store.load(cfg.identity).engine
            backends[cfg.identity] = ENGINE_BACKENDS.get(engine, f"{engine} engine")
        except IdentityError:
            backends[cfg.identity] = "unknown engine"
    if len(set(backends.values())) == 1:
        return next(iter(backends.values()))
    return "; ".join(f"{name}: {backend}" for name, backend in backends.items())
