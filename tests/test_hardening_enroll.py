"""Issue #33, enrollment and verify: what an outside probe found, each kept from coming back.
Frames held at full size, a resolution switch past the probe, no memory cap, a killed writer's
staging folder, slow uploads holding the queue, `avatar verify` on a size bomb and a high
declared frame rate, control characters in names, and world-readable logs."""
from __future__ import annotations

import asyncio
import fractions
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from engines.identity import Consent, IdentityError, IdentityStore, check_label
from engines.neural.data import extract
from helpers import clip, running_server, wait_for
from server.enroll import queue as enrollment
from server.enroll.worker import MAX_PIXELS
from server.http.enroll import ENROLLMENTS
from test_enroll_web import FIELDS, Api, fake_worker, leftovers, make_video, video  # noqa: F401 (fixtures)

CONSENT = Consent("I agree", "Jo Doe", "test", "2026-01-01T00:00:00+00:00", ["enrollment"])


def make_switching_video(path: Path, parts: list[tuple[float, tuple[int, int]]], fps: int = 10) -> Path:
    """One VP8 stream of noise whose frame size changes at each part [(seconds, (w, h)), ...]:
    a keyframe of each new size, as a camera switch makes."""
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *parts[0][1], "yuv420p"
        rng = np.random.default_rng(0)
        pts = 0
        for seconds, (w, h) in parts:
            encoder = av.CodecContext.create("libvpx", "w")
            encoder.width, encoder.height, encoder.pix_fmt = w, h, "yuv420p"
            encoder.time_base, encoder.options = fractions.Fraction(1, fps), {"deadline": "realtime", "cpu-used": "8"}
            frames = [av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), np.uint8), format="rgb24")
                      for _ in range(round(seconds * fps))]
            for frame in [*frames, None]:
                if frame is not None:
                    frame.pts, frame.time_base, pts = pts, encoder.time_base, pts + 1
                for packet in encoder.encode(frame):
                    packet.stream = stream
                    out.mux(packet)
    return path


def upscaled_selfscan(path: Path, frames: int, size=(720, 1280)) -> Path:
    """The shared self-scan's first frames, scaled up to a portrait `size` (a phone's recording)."""
    import cv2

    from helpers import read_frames

    w, h = size
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=30, options={"deadline": "realtime", "cpu-used": "8"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for rgb in read_frames(clip("selfscan_a.mp4"), frames):
            big = cv2.resize(rgb, (h, h), interpolation=cv2.INTER_CUBIC)[:, (h - w) // 2:(h + w) // 2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(big), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


# ---- 1. enrollment memory --------------------------------------------------------------------
def peak_growth(warm: str, measured: str) -> float:
    """MB by which a new Python process's peak RSS grows while it runs `measured` after `warm`
    (so the libraries and models `warm` loaded are not counted). RSS, not tracemalloc: decoded
    frames live in FFmpeg's buffers, which tracemalloc does not see."""
    script = textwrap.dedent("""
        from pathlib import Path
        import numpy as np
        def peak():
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        {warm}
        before = peak()
        {measured}
        print((peak() - before) / 1024)
    """).format(warm=warm, measured=measured)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.split()[-1])


def test_extract_keeps_crops_not_frames(tmp_path):
    """A 720x1280 frame is 2.6 MB; extract keeps its 256² crop (0.2 MB: the same crop as cut
    from the frame held whole) and one frame at a time: 50 frames more cost 10 MB, not 130
    (give or take the few tens of MB a crop or mediapipe's threads take for a moment)."""
    from engines.identity import crop_with_box
    from engines.video import read_video

    source, saved = upscaled_selfscan(tmp_path / "portrait.webm", 60), tmp_path / "scan.npz"
    growth = peak_growth(f"from engines.neural.data import extract; extract(Path({str(source)!r}), 10, progress=False)",
                         f"d = extract(Path({str(source)!r}), 60, progress=False)\n"
                         f"np.savez({str(saved)!r}, crops=d.crops, box=d.box, index=d.frame_index)")
    assert growth < 70, f"50 frames more took {growth:.0f} MB more"
    data = np.load(saved)
    frames = list(read_video(source))
    expected = np.stack([crop_with_box(frames[i], *data["box"]) for i in data["index"]])
    assert np.array_equal(data["crops"], expected)


def test_every_frame_size_is_checked(tmp_path):
    """The probe decodes only the first frame; training decodes them all and refuses one past
    the limit, or a size change (one crop box serves every frame), before keeping anything."""
    growing = make_switching_video(tmp_path / "grows.webm", [(2, (160, 160)), (0.3, (1600, 1600))])
    with pytest.raises(IdentityError, match="frame 21 is 1600x1600, over the limit"):
        extract(growing, progress=False, max_pixels=MAX_PIXELS)
    switching = make_switching_video(tmp_path / "switches.webm", [(1, (160, 160)), (1, (320, 240))])
    with pytest.raises(IdentityError, match="frame size changes from 160x160 to 320x240 at frame 11"):
        extract(switching, progress=False)


async def test_a_resolution_switching_upload_fails_its_job(tmp_path, monkeypatch):
    """480² for 6 s, then 1600² (past 1920x1080 pixels): the probe passes it, the training
    worker (the real one) refuses it at the first frame past the limit."""
    recording = make_switching_video(tmp_path / "switch.webm", [(6, (480, 480)), (0.3, (1600, 1600))])
    async with running_server(tmp_path, monkeypatch) as srv, aiohttp.ClientSession() as http:
        api = Api(http, srv.url)
        status, job = await api.enroll(recording.read_bytes())
        assert status == 201, job
        job = await api.until(job["id"], ("done", "failed"), timeout=120)
        assert job["state"] == "failed" and "frame 61 is 1600x1600, over the limit" in job["error"], job
        assert str(tmp_path) not in job["error"] and leftovers(srv) == []


HUNGRY_WORKER = textwrap.dedent("""
    import sys
    if sys.argv[1] == "train":  # the real worker, its enrollment a stand-in that wants 2 GiB at once
        import engines.neural.enroll
        def enroll(*args, **kwargs):
            import torch
            return torch.empty(2**31, dtype=torch.uint8)
        engines.neural.enroll.enroll = enroll
    from server.enroll.worker import main
    sys.exit(main(sys.argv[1:]))
""")


async def test_training_past_its_memory_cap_fails_out_of_memory(tmp_path, monkeypatch, video):
    script = tmp_path / "hungry_worker.py"
    script.write_text(HUNGRY_WORKER)
    monkeypatch.setattr(enrollment, "WORKER", [sys.executable, str(script)])
    async with running_server(tmp_path, monkeypatch, enroll_max_memory=2**30) as srv, \
            aiohttp.ClientSession() as http:
        api = Api(http, srv.url)
        job = await api.until((await api.enroll(video))[1]["id"], ("done", "failed"), timeout=60)
        assert job["state"] == "failed", job
        assert job["error"] == "out of memory: the training needs more than the 1.0 GiB this server gives it"


# ---- 2. a writer killed mid-write ------------------------------------------------------------
STALLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from engines.identity import Consent, IdentityStore
    def stall(staging):  # the generator files would go here; the face is written already
        print(staging, flush=True)
        time.sleep(120)
    consent = Consent("I agree", "Jo Doe", "test", "2026-01-01T00:00:00+00:00", ["enrollment"])
    IdentityStore(sys.argv[1]).write("jo", "Jo", "warp", consent, np.zeros((256, 256, 3), np.uint8),
                                     np.zeros((478, 3), np.float32), (0, 0, 256, 256), {}, tool="test", extra=stall)
""")


async def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_start(tmp_path, monkeypatch):
    root = tmp_path / "home" / "identities"
    writer = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        staging = Path(writer.stdout.readline().strip())
        assert (staging / "reference.png").is_file() and (staging / "neutral.npy").is_file()
        assert IdentityStore(root).sweep_staging() == [] and staging.is_dir(), "a live writer's folder stays"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    legacy = root / ".jo-k2x9_a0q"  # how staging folders were named before
    legacy.mkdir()
    (legacy / "reference.png").write_bytes(b"a face")
    assert staging.is_dir(), "killed while writing: its staging folder is left behind"
    async with running_server(tmp_path, monkeypatch):
        assert not staging.exists() and not legacy.exists(), list(root.iterdir())


def write(store: IdentityStore, display_name: str, consent: Consent = CONSENT):
    return store.write("jo", display_name, "warp", consent, np.zeros((256, 256, 3), np.uint8),
                       np.zeros((478, 3), np.float32), (0, 0, 256, 256), {}, tool="test")


# ---- 3. slow uploads -------------------------------------------------------------------------
async def slow_upload(url: str, name: str, rate: int | None) -> bytes:
    """A POST /enrollments that sends its fields, then `rate` bytes a second of a recording it
    says is 10 MB (None: nothing more); the server's answer, read until it closes."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    boundary = "slowslowslow"
    parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
                     for key, value in {**FIELDS, "name": name}.items())
    parts += (f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="v.webm"\r\n'
              "Content-Type: video/webm\r\n\r\n").encode() + b"\0" * 4096  # enough for the fields to end
    writer.write(f"POST /enrollments HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                 f"boundary={boundary}\r\nContent-Length: {len(parts) + 10 * 2**20}\r\n\r\n".encode() + parts)

    async def trickle():
        while rate:
            await asyncio.sleep(0.25)
            writer.write(b"\0" * (rate // 4))
            await writer.drain()

    sending = asyncio.create_task(trickle())
    answer = b""
    try:
        async with asyncio.timeout(15):
            while chunk := await reader.read(65536):
                answer += chunk
    except ConnectionResetError:  # the server closed with some of the body unread: its answer came first
        pass
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    return answer


async def test_slow_uploads_are_closed_and_hold_no_queue_place(tmp_path, monkeypatch, fake_worker, video):
    """Three uploads trickling 1 KB/s (or nothing) where the queue has three places: a real
    upload still gets one, and the slow ones are answered 408 and closed once their grace is over."""
    fake_worker("slow")
    async with running_server(tmp_path, monkeypatch, enroll_queue=3, enroll_idle_timeout=2,
                              enroll_uploads_per_address=4) as srv, aiohttp.ClientSession() as http:
        queue = srv.runner.app[ENROLLMENTS]
        rates = (1024, 1024, None)  # bytes a second; None: nothing after the fields
        slow = [asyncio.create_task(slow_upload(srv.url, f"slow{i}", rate)) for i, rate in enumerate(rates)]
        await wait_for(lambda: len(queue.uploading) == 3, 10, "the slow uploads' fields")
        started = time.monotonic()
        status, job = await Api(http, srv.url).enroll(video)
        assert status == 201, job
        answers = await asyncio.gather(*slow)
        assert time.monotonic() - started < 8
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408") and b'"too_slow"' in answer, answer[:300]
        assert b"KiB/s, under this server's minimum of 64 KiB/s" in answers[0]
        assert b"nothing of the upload arrived for 2 s" in answers[2]
        assert queue.uploading == set() and queue.claimed == set()
        assert leftovers(srv) == [f"{job['id']}.upload"], "nothing of the slow ones stays on disk"


async def test_uploads_per_address_are_bounded(tmp_path, monkeypatch, fake_worker, video):
    fake_worker("done")
    async with running_server(tmp_path, monkeypatch, enroll_idle_timeout=1,
                              enroll_uploads_per_address=2) as srv, aiohttp.ClientSession() as http:
        queue, api = srv.runner.app[ENROLLMENTS], Api(http, srv.url)
        slow = [asyncio.create_task(slow_upload(srv.url, f"slow{i}", None)) for i in range(2)]
        await wait_for(lambda: len(queue.uploading) == 2, 10, "the slow uploads' fields")
        status, body = await api.enroll(video)
        assert (status, body["error"]) == (429, "too_many_uploads"), body
        await asyncio.gather(*slow)
        status, job = await api.enroll(video)
        assert status == 201, job


# ---- 4. verify, names, logs ------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG of a few bytes that claims width x height."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_verify_refuses_an_image_claiming_a_huge_size(tmp_path, capsys):
    from server.cli import main

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))
    assert main(["verify", str(bomb)]) == 2, "an error, not 'not marked'"
    assert "over the limit" in capsys.readouterr().err
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(9000, 9000))  # under Pillow's own limit, over ours
    assert main(["verify", str(big)]) == 2
    assert "9000x9000 is over the limit" in capsys.readouterr().err


def still_video(path: Path, frames: int, fps: int = 240) -> Path:
    """A still 640x360 picture, `frames` times at `fps`: a few KB."""
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps, options={"deadline": "realtime", "cpu-used": "8"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        still = av.VideoFrame.from_ndarray(np.random.default_rng(0).integers(0, 255, (360, 640, 3), np.uint8),
                                           format="rgb24")
        for i in range(frames):
            still.pts = i
            for packet in stream.encode(still):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_verify_memory_does_not_grow_with_the_declared_frame_rate(tmp_path):
    """Declared at 240 fps, a 2-second segment is 480 frames (110 MB of 640x360 held whole,
    1.2 GB at 1080p); verify keeps their projections' sums."""
    from engines.provenance.verify import verify_file

    short, fast = still_video(tmp_path / "short.webm", 20), still_video(tmp_path / "fast.webm", 600)
    growth = peak_growth(f"from engines.provenance.verify import verify_file; verify_file({str(short)!r})",
                         f"verify_file({str(fast)!r})")
    assert growth < 30, f"480 frames a segment took {growth:.0f} MB more than 20"
    verdict = verify_file(fast)
    assert verdict.frames == 600 and verdict.segments[0].frames >= 400 and not verdict.found


@pytest.mark.parametrize("text", ["Jo\nDoe", "Jo\u202eeoD", "Jo\u2028Doe", "Jo\u2029", "\u2066Jo", "Jo\x00",
                                  "\ufeffJo", "Jo\tDoe"])
def test_names_people_read_refuse_control_characters(text, tmp_path):
    with pytest.raises(IdentityError, match="control character"):
        check_label(text, "display_name")
    store = IdentityStore(tmp_path / "identities")
    with pytest.raises(IdentityError, match="display_name has a control character"):
        write(store, text)
    subject = Consent("I agree", text, "test", "2026-01-01T00:00:00+00:00", ["enrollment"])
    with pytest.raises(IdentityError, match="consent.subject has a control character"):
        write(store, "Jo", subject)
    assert not store.root.exists(), "nothing written"
    assert write(store, "Jo").display_name == "Jo"


def test_names_keep_accents_joiners_and_emoji():
    for text in ("Zoë O'Brien-Łukasz", "محمد\u200cرضا", "Jo \U0001F468\u200d\U0001F469\u200d\U0001F467", "李小龍"):
        assert check_label(text, "display_name") == text


async def test_enrollment_fields_refuse_control_characters(tmp_path, monkeypatch, fake_worker, video):
    async with running_server(tmp_path, monkeypatch) as srv, aiohttp.ClientSession() as http:
        api = Api(http, srv.url)
        for fields in (dict(display_name="Jo\u202eeoD"), dict(subject="Jo\nDoe"), dict(subject="Jo\u2028Doe")):
            status, body = await api.enroll(video, **fields)
            assert (status, body.get("error")) == (400, "bad_field"), (fields, body)
            assert "control character" in body["message"]
        status, job = await api.enroll(video, statement="I, Jo Doe, agree.\nSigned, Jo.")
        assert status == 201, "a statement may have lines"


async def test_worker_logs_are_private(tmp_path, monkeypatch, fake_worker, video):
    fake_worker("done")
    async with running_server(tmp_path, monkeypatch) as srv, aiohttp.ClientSession() as http:
        api = Api(http, srv.url)
        job = await api.until((await api.enroll(video))[1]["id"], ("done", "failed"))
        log = srv.runner.app[ENROLLMENTS].log_path(job["id"])
        assert job["state"] == "done" and oct(os.stat(log).st_mode & 0o777) == "0o600"
        assert json.loads((log.parent / f"{job['id']}.json").read_text())["state"] == "done"
