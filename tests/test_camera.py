"""`avatar camera`: the avatar in a call-shaped frame, up to the virtual camera device (which
these machines cannot have: v4l2loopback cannot be loaded here). The sink is a recorder."""
from __future__ import annotations

import asyncio
import platform
import signal
import subprocess
import sys
import threading
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from engines.provenance import watermark
from engines.render.frame import DARK, fit_geometry, fit_interpolation, fit_to_frame
from helpers import clip, running_server
from server import camera
from server.audit import AuditLog, audit_path
from server.cli import build_parser


class RecordingSink:
    """What the tests put where the virtual camera goes: keeps every frame it is sent."""

    def __init__(self, width: int, height: int, fps: float):
        self.width, self.height, self.fps = width, height, fps
        self.frames: list[np.ndarray] = []
        self.closed = False

    def send(self, rgb: np.ndarray) -> None:
        assert not self.closed
        self.frames.append(rgb.copy())

    def close(self) -> None:
        self.closed = True

    def __str__(self) -> str:
        return "a recording sink"


def command(*argv: str):
    return build_parser().parse_args(list(argv))


def decoded(frames) -> watermark.Detection:
    return watermark.detect(np.array([watermark.project(watermark.luma(f)) for f in frames]))


def has_badge(avatar: np.ndarray) -> bool:
    """The badge's box (dark grey, 60%) with white text in the top-left corner (its size
    follows the frame's width: a 256-wide frame's box is about 76 x 18)."""
    k = avatar.shape[1] / 256
    corner = avatar[round(4 * k):round(22 * k), round(4 * k):round(80 * k)].max(axis=2)
    return (corner > 220).mean() > 0.05 and (corner < 110).mean() > 0.3


# ---- the fit ------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size, frame_size", [
    ((256, 256), (1280, 720)), ((257, 257), (1281, 721)), ((255, 256), (999, 333)),  # bars left and right
    ((256, 256), (721, 1281)), ((300, 101), (640, 480)),  # bars above and below
    ((256, 256), (256, 256)), ((512, 512), (101, 77)), ((7, 3), (5, 1)),  # none; shrinking; tiny
])
@pytest.mark.parametrize("fill", ["edge", "dark"])
def test_fit_keeps_the_picture_undistorted_and_centred(image_size, frame_size, fill):
    (iw, ih), (width, height) = image_size, frame_size
    rng = np.random.default_rng(iw * 7 + width)
    image = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (iw, ih), interpolation=cv2.INTER_LINEAR)
    out = fit_to_frame(image, width, height, fill)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    p = fit_geometry(iw, ih, width, height)
    # One side fills the frame, the other keeps the aspect to within the rounding of a pixel.
    assert p.width == width or p.height == height
    assert abs(p.width * ih - p.height * iw) <= max(iw, ih)
    assert p.x == (width - p.width) // 2 and p.y == (height - p.height) // 2  # centred
    expected = cv2.resize(image, (p.width, p.height), interpolation=fit_interpolation(image.shape, p))
    assert np.array_equal(out[p.y:p.y + p.height, p.x:p.x + p.width], expected)
    bars = [out[:, :p.x], out[:, p.x + p.width:], out[:p.y], out[p.y + p.height:]]
    for bar in (b for b in bars if b.size):
        if fill == "dark":
            assert (bar == DARK).all()
        else:  # the edge's colours, darker than the picture: never a stretch of it
            assert bar.mean() < 0.6 * image.mean() + 1


def test_fit_edge_fill_follows_the_edge_colours():
    image = np.zeros((256, 256, 3), np.uint8)
    image[:128, :, 0] = 200  # red above, blue below, on both edges
    image[128:, :, 2] = 200
    out = fit_to_frame(image, 1280, 720)
    for side in (out[:, :280], out[:, 1000:]):
        top, bottom = side[:300].reshape(-1, 3).mean(0), side[420:].reshape(-1, 3).mean(0)
        assert top[0] > 3 * top[2] and bottom[2] > 3 * bottom[0]
    # darker towards the frame's border
    assert out[100, 0, 0] < out[100, 279, 0] and out[100, 1279, 0] < out[100, 1000, 0]


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError):
        fit_to_frame(np.zeros((4, 4), np.uint8), 16, 9)
    with pytest.raises(ValueError):
        fit_to_frame(np.zeros((4, 4, 3), np.uint8), 0, 9)
    with pytest.raises(ValueError):
        fit_to_frame(np.zeros((4, 4, 3), np.uint8), 16, 9, fill="stretch")


# ---- the command, up to the device -----------------------------------------------------------
def test_local_camera_sends_marked_labelled_avatars_and_audits_the_use(tmp_path):
    video = clip("drive_wink.mp4")
    sinks, seen = [], []
    args = command("--home", str(tmp_path), "camera", "--video", str(video), "--frames", "12", "--fill", "edge")

    def open_sink(width, height, fps):
        sinks.append(RecordingSink(width, height, fps))
        return sinks[-1]

    assert camera.run_command(args, open_sink=open_sink, on_frame=lambda a, f, ms: seen.append((a, ms))) == 0
    sink = sinks[0]
    assert sink.closed and (sink.width, sink.height, sink.fps) == (1280, 720, 30)
    assert len(sink.frames) == len(seen) == 12
    for frame, (avatar, ms) in zip(sink.frames, seen):
        assert frame.shape == (720, 1280, 3) and frame.dtype == np.uint8
        assert avatar.shape == (256, 256, 3)
        centre = frame[:, 280:1000]  # the square avatar scaled to the frame's height, centred, undistorted
        assert np.array_equal(centre, cv2.resize(avatar, (720, 720), interpolation=cv2.INTER_LINEAR))
        assert frame[:, :280].mean() < centre.mean() and frame[:, 1000:].mean() < centre.mean()
        assert {"landmarks", "retarget", "render", "mark", "fit", "send"} <= set(ms)
    assert all(has_badge(avatar) for avatar, _ in seen)  # the demo identity keeps the badge on

    log = AuditLog(audit_path(tmp_path))
    try:
        uses = log.query(kind="session")
    finally:
        log.close()
    assert len(uses) == 1, uses
    use = uses[0]
    assert use["identity"] == "demo" and use["address"] == "local camera"
    assert use["status"] == "ok" and use["frames"] == 12 and use["ended"]
    detection = decoded([f[:, 280:1000] for f in sink.frames])  # what a call app receives, its middle
    assert detection.found, detection
    assert detection.payload.use == int(use["use_id"][:6], 16)


def test_by_default_the_avatar_is_pasted_back_into_its_photo_and_the_whole_frame_is_marked(tmp_path):
    """--fill scene (the default): the call gets the identity's own photo around the face with
    the moving avatar in it (issue #35), not a square between bars; the badge sits in the
    frame's corner and the watermark decodes from the whole frame."""
    from engines.identity import IdentityStore, identities_dir
    from engines.render.scene import composer

    sinks = []

    def open_sink(width, height, fps):
        sinks.append(RecordingSink(width, height, fps))
        return sinks[-1]

    args = command("--home", str(tmp_path), "camera", "--video", str(clip("drive_wink.mp4")), "--frames", "12")
    stages = []
    assert camera.run_command(args, open_sink=open_sink, on_frame=lambda a, f, ms: stages.append(ms)) == 0
    frames = sinks[0].frames
    assert len(frames) == 12 and all(f.shape == (720, 1280, 3) for f in frames)
    assert all("compose" in ms for ms in stages)
    demo = IdentityStore(identities_dir(tmp_path)).load("demo")
    scene = composer(demo, 1280, 720)
    # Outside the face square the frame is the still photo (the mark's few levels aside):
    # no bars, no square edge.
    outside = np.ones((720, 1280), bool)
    outside[max(0, scene.sy):scene.sy + scene.side, max(0, scene.sx):scene.sx + scene.side] = False
    outside[:140, :380] = False  # the badge
    diff = np.abs(frames[-1].astype(int) - scene.background.astype(int))[outside]
    assert np.median(diff) <= 3, np.median(diff)
    # Inside it the driver's motion shows: frames differ there, not outside.
    square = (slice(max(0, scene.sy), scene.sy + scene.side), slice(max(0, scene.sx), scene.sx + scene.side))
    motion = [np.abs(a[square].astype(int) - b[square].astype(int)).mean() for a, b in zip(frames, frames[1:])]
    assert max(motion) > 1.0, motion
    cv2.imwrite(str(tmp_path / "scene.png"), cv2.cvtColor(frames[-1], cv2.COLOR_RGB2BGR))  # to look at
    assert all(has_badge(f) for f in frames)
    detection = decoded(frames)
    assert detection.found, detection


def test_a_revoked_identity_stops_the_camera(tmp_path, monkeypatch):
    monkeypatch.setattr(camera, "CONSENT_EVERY", 0.0)  # check before every frame
    video = clip("drive_wink.mp4")
    args = command("--home", str(tmp_path), "camera", "--video", str(video), "--no-label")
    sinks = []

    def revoke_after_three(avatar, frame, ms):
        if len(sinks[0].frames) == 3:
            camera_store(tmp_path).revoke("demo", "test", "withdrawn")

    def open_sink(*size):
        sinks.append(RecordingSink(*size))
        return sinks[0]

    with pytest.raises(Exception, match="revoked"):
        camera.run_command(args, open_sink=open_sink, on_frame=revoke_after_three)
    assert sinks[0].closed and 3 <= len(sinks[0].frames) <= 4
    log = AuditLog(audit_path(tmp_path))
    try:
        (use,) = log.query(kind="session")
    finally:
        log.close()
    assert use["status"] == "error" and "withdrawn" in use["reason"] and use["frames"] >= 3


# The whole command in a process of its own, the virtual camera replaced by one that prints.
FAKE_DEVICE = """
import sys
from server import camera, cli

class Device:
    def __init__(self, width, height, fps, device=None, backend=None):
        self.sent = 0
    def send(self, rgb):
        self.sent += 1
        if self.sent == 3:
            print("sending", flush=True)
    def close(self):
        print("device closed after", self.sent, flush=True)

camera.VirtualCamera = Device
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_cleanly(tmp_path, signum):
    video = clip("drive_wink.mp4")
    process = subprocess.Popen([sys.executable, "-c", FAKE_DEVICE, "--home", str(tmp_path), "camera", "--video",
                                str(video)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    try:
        assert process.stdout.readline().strip() == "sending"
        process.send_signal(signum)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "device closed after" in out and "frames (0 repeated)" in out, out
    log = AuditLog(audit_path(tmp_path))
    try:
        (use,) = log.query(kind="session")
    finally:
        log.close()
    assert use["status"] == "ok" and use["ended"] and use["frames"] >= 3, use


def camera_store(home: Path):
    from engines.identity import IdentityStore, identities_dir

    return IdentityStore(identities_dir(home))


def tiny_clip(path: Path, frames: int = 6) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            rgb = np.full((64, 64, 3), 40 * i % 256, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))
    return path


@pytest.mark.skipif(platform.system() != "Linux" or Path("/sys/module/v4l2loopback").exists(),
                    reason="this machine may have a virtual camera (the test needs one without)")
def test_without_a_virtual_camera_the_command_says_what_to_install(tmp_path):
    video = tiny_clip(tmp_path / "tiny.mp4")
    done = subprocess.run([sys.executable, "-m", "server.cli", "--home", str(tmp_path / "home"), "camera",  # noqa: PLW1510
                           "--video", str(video)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: no virtual camera") and "modprobe v4l2loopback" in lines[0], lines[0]
    assert not (tmp_path / "home" / "audit.db").exists()  # nothing started, nothing to record


def test_sizes_and_rates_are_checked():
    for bad in (["--size", "1280"], ["--size", "1281x720"], ["--size", "16x9"], ["--fps", "0"], ["--fps", "x"],
                ["--frames", "0"], ["--server", "http://x", "--video", "a", "--camera", "1"]):
        with pytest.raises(SystemExit):
            command("camera", *bad)
    assert command("camera", "--size", "1920x1080").size == (1920, 1080)
    with pytest.raises(camera.CameraError, match="http"):
        camera.ws_url("ftp://example.org/")
    assert camera.ws_url("https://example.org:8443") == "wss://example.org:8443/ws"


async def test_server_mode_delivers_the_servers_avatar(tmp_path, monkeypatch):
    video = clip("drive_wink.mp4")
    sinks, seen = [], []

    def open_sink(*size):
        sinks.append(RecordingSink(*size))
        return sinks[0]

    async with running_server(tmp_path, monkeypatch) as srv:
        args = command("camera", "--video", str(video), "--server", srv.url, "--frames", "40", "--size", "640x360",
                       "--fill", "edge")
        stop = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(
            camera.run_command, args, open_sink=open_sink, on_frame=lambda a, f, ms: seen.append(a), stop=stop))
        try:
            assert await asyncio.wait_for(asyncio.shield(task), 40) == 0
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
        sink = sinks[0]
        assert sink.closed and len(sink.frames) == 40
        for frame, avatar in zip(sink.frames, seen):
            assert frame.shape == (360, 640, 3) and avatar.shape == (256, 256, 3)
            assert np.array_equal(frame[:, 140:500], cv2.resize(avatar, (360, 360), interpolation=cv2.INTER_LINEAR))
        assert all(has_badge(a) for a in seen)  # drawn here: the server labels only its rooms' viewers
        # The server's avatar, not a camera frame passed through: its session's watermark (once
        # VP8 has reached its bitrate, as in test_provenance).
        assert decoded([f[:, 140:500] for f in sink.frames[-30:]]).found
        await asyncio.sleep(0.5)
        assert not srv.state.sessions, "the camera ends its session when it stops"


async def test_server_mode_asks_the_server_to_paste_the_avatar_into_its_scene(tmp_path, monkeypatch, demo):
    """--fill scene (the default) with --server: the server composes the call frame (hello
    "frame"), so its watermark spans the whole frame and the scene is the identity's photo. It
    draws the badge too, under its mark, by the identity's setting: --no-label here cannot
    remove it, and no badge drawn after the mark flips its bits."""
    from engines.render.scene import composer

    sinks, seen = [], []
    async with running_server(tmp_path, monkeypatch) as srv:
        args = command("camera", "--video", str(clip("drive_wink.mp4")), "--server", srv.url, "--frames", "160",
                       "--size", "640x360", "--no-label")
        stop = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(
            camera.run_command, args, open_sink=lambda *size: sinks.append(RecordingSink(*size)) or sinks[0],
            on_frame=lambda a, f, ms: seen.append(a), stop=stop))
        try:
            assert await asyncio.wait_for(asyncio.shield(task), 40) == 0
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
    frames = sinks[0].frames
    assert len(frames) == 160 and all(a.shape == (360, 640, 3) for a in seen)
    assert all(np.array_equal(f, a) for f, a in zip(frames, seen)) and has_badge(frames[-1])
    scene = composer(demo, 640, 360)
    left = slice(0, max(scene.sx, 0))  # the photo beside the head and below the badge (after VP8)
    assert scene.sx > 40 and np.abs(frames[-1][60:, left].astype(int) - scene.background[60:, left]).mean() < 6
    # One 2-s segment, as `avatar verify` reads: the server badged the frame before its mark (a
    # badge drawn after it flips bits: 7/16 segments found at 500 kbps instead of 16/16).
    assert decoded(frames[100:]).found
