"""server/rooms/janus.py against a real Janus (deploy/janus config, VideoRoom over HTTP, loopback).

One Janus process serves the module: deploy/janus copied to a temporary folder with a
free HTTP port and a short session timeout (so the keepalive is exercised), stopped at
the end. Media is synthetic: a moving colour pattern (320x240 @ 30 fps) and a 440 Hz sine.
"""
from __future__ import annotations

import asyncio
import contextlib
import fractions
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

import server.rooms.janus as janus
from server.rooms.janus import JanusError, JanusPublisher, JanusSession, JanusSubscriber

pytestmark = pytest.mark.skipif(shutil.which("janus") is None,
                                reason="Janus is not installed (Debian: apt-get install janus)")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "janus"
ADMIN_KEY = re.search(r'admin_key = "([^"]+)"', (DEPLOY / "janus.plugin.videoroom.jcfg").read_text()).group(1)
SESSION_TIMEOUT = 4  # s, instead of 60: a session idle for longer is gone unless kept alive
WIDTH, HEIGHT, FPS = 320, 240, 30
RATE, SAMPLES = 48000, 960  # 20 ms audio frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_janus(folder: Path, session_timeout: int | None = SESSION_TIMEOUT):
    """A running Janus with the repository's config (copied to `folder`) on a free port; its
    API URL. session_timeout: shortened for the keepalive tests, None keeps the config's."""
    shutil.copytree(DEPLOY, folder)
    port = free_port()
    http = folder / "janus.transport.http.jcfg"
    http.write_text(re.sub(r"\bport = 8088\b", f"port = {port}", http.read_text(), count=1))
    if session_timeout is not None:
        core = folder / "janus.jcfg"
        core.write_text(re.sub(r"\bsession_timeout = \d+", f"session_timeout = {session_timeout}",
                               core.read_text()))
    log_path = folder.parent / "janus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["janus", "--configs-folder", str(folder), "--disable-colors"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/janus"
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"janus exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/info", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"janus did not answer {url}/info within 15 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def janus_url(tmp_path_factory):
    with running_janus(tmp_path_factory.mktemp("janus") / "conf") as url:
        yield url


@pytest.fixture(autouse=True)
def short_keepalive(monkeypatch):
    monkeypatch.setattr(janus, "KEEPALIVE_INTERVAL", SESSION_TIMEOUT / 3)


_rooms = iter(range(4200, 5000))


@pytest.fixture
def room() -> int:
    return next(_rooms)


class PatternTrack(MediaStreamTrack):
    """A moving colour pattern at FPS, pts in 1/90000; counts the frames pulled (recv calls)."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self.pulled = 0
        self._start = None
        self._gradient = np.broadcast_to(np.linspace(0, 255, WIDTH, dtype=np.uint8), (HEIGHT, WIDTH))

    async def recv(self):
        if self._start is None:
            self._start = time.monotonic()
        i = self.pulled
        await asyncio.sleep(max(0.0, self._start + i / FPS - time.monotonic()))
        image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        image[..., 0] = (i * 4) % 256  # red pulses
        image[..., 1] = self._gradient  # green: dark left, bright right
        image[..., 2] = np.roll(self._gradient, i * 4, axis=1)  # blue moves
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = i * 90000 // FPS, fractions.Fraction(1, 90000)
        self.pulled += 1
        return frame


class SineTrack(MediaStreamTrack):
    """A 440 Hz sine at 48 kHz, mono s16, 20 ms frames, amplitude 0.3 (RMS ~ 6950)."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self.pulled = 0
        self._start = None

    async def recv(self):
        if self._start is None:
            self._start = time.monotonic()
        i = self.pulled
        await asyncio.sleep(max(0.0, self._start + i * SAMPLES / RATE - time.monotonic()))
        t = (np.arange(SAMPLES) + i * SAMPLES) / RATE
        samples = (0.3 * 32767 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, i * SAMPLES, fractions.Fraction(1, RATE)
        self.pulled += 1
        return frame


class Viewer:
    """Reads a JanusSubscriber's tracks: counts decoded video frames, keeps audio RMS."""

    def __init__(self):
        self.video = 0
        self.audio = 0
        self.last_image = None
        self.rms: list[float] = []
        self.tasks: list[asyncio.Task] = []

    def on_track(self, track):
        self.tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track):
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    assert (frame.width, frame.height) == (WIDTH, HEIGHT)
                    self.video += 1
                    self.last_image = frame
                else:
                    self.audio += 1
                    if self.audio > 10:  # past the codec's start-up
                        samples = frame.to_ndarray().astype(np.float64)
                        self.rms.append(float(np.sqrt(np.mean(samples ** 2))))
        except MediaStreamError:
            pass

    def stop(self):
        for task in self.tasks:
            task.cancel()


async def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def publisher_of(url: str, room: int, *tracks) -> JanusPublisher:
    pub = JanusPublisher(url, room, "avatar", admin_key=ADMIN_KEY, secret="room-secret")
    await pub.__aenter__()
    try:
        await pub.publish(tracks)
    except BaseException:
        await pub.close()
        raise
    return pub


async def watch(url: str, room: int, n: int) -> list[tuple[JanusSubscriber, Viewer]]:
    viewers = [Viewer() for _ in range(n)]
    subs = [JanusSubscriber(url, room, on_track=v.on_track) for v in viewers]
    await asyncio.gather(*(s.__aenter__() for s in subs))
    return list(zip(subs, viewers))


async def close_all(watching):
    for _, viewer in watching:
        viewer.stop()
    await asyncio.gather(*(sub.close() for sub, _ in watching))


async def participants(url: str, room: int) -> list[dict]:
    async with JanusSession(url) as session:
        handle = await session.attach()
        reply = await session.message(handle, {"request": "listparticipants", "room": room})
        return reply.data["participants"]


async def test_five_subscribers_receive_video_and_audio(janus_url, room):
    video, audio = PatternTrack(), SineTrack()
    pub = await publisher_of(janus_url, room, video, audio)
    watching = []
    try:
        watching = await watch(janus_url, room, 5)
        assert all(sub.feed_id == pub.feed_id for sub, _ in watching)
        assert all(sorted(t.kind for t in sub.tracks) == ["audio", "video"] for sub, _ in watching)
        await wait_until(lambda: all(v.video >= 30 and len(v.rms) >= 25 for _, v in watching), 10,
                         "each of 5 viewers decodes 30 video frames and 25 audio frames")
        for _, viewer in watching:
            assert min(viewer.rms) > 2000, viewer.rms  # the sine, not silence (sent RMS ~ 6950)
            green = viewer.last_image.to_ndarray(format="rgb24")[..., 1].astype(float)
            assert green[:, -40:].mean() - green[:, :40].mean() > 150  # the pattern, not noise
    finally:
        await close_all(watching)
        await pub.close()


async def sent_rates(pub: JanusPublisher, video: PatternTrack, seconds: float = 2.0) -> tuple[float, float]:
    """(frames pulled from the track, video RTP packets sent) per second."""

    async def packets():
        stats = await pub.pc.getStats()
        return sum(s.packetsSent for s in stats.values() if s.type == "outbound-rtp" and s.kind == "video")

    pulled, sent, start = video.pulled, await packets(), time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - start
    return (video.pulled - pulled) / elapsed, (await packets() - sent) / elapsed


async def test_publisher_sends_one_stream_whatever_the_number_of_viewers(janus_url, room):
    video, audio = PatternTrack(), SineTrack()
    pub = await publisher_of(janus_url, room, video, audio)
    watching = []
    try:
        assert len(pub.pc.getSenders()) == 2  # one video, one audio: encoded once
        watching = await watch(janus_url, room, 1)
        await wait_until(lambda: watching[0][1].video >= 10, 10, "the first viewer gets video")
        await asyncio.sleep(1)
        pulled_before, since = video.pulled, time.monotonic()
        frames_1, packets_1 = await sent_rates(pub, video)
        watching += await watch(janus_url, room, 4)
        await wait_until(lambda: all(v.video >= 10 for _, v in watching), 10, "all 5 viewers get video")
        await asyncio.sleep(1)  # past the keyframes the new viewers asked for
        frames_5, packets_5 = await sent_rates(pub, video)
        frames_overall = (video.pulled - pulled_before) / (time.monotonic() - since)
        counts = [v.video for _, v in watching]
        await asyncio.sleep(0.5)
        assert all(v.video > c for (_, v), c in zip(watching, counts))  # all 5 still watching
    finally:
        await close_all(watching)
        await pub.close()
    print(f"1 viewer: {frames_1:.1f} frames/s, {packets_1:.0f} packets/s; "
          f"5 viewers: {frames_5:.1f} frames/s, {packets_5:.0f} packets/s; overall {frames_overall:.1f} frames/s")
    # Pulled once per frame, at the track's rate. Measured over the whole span: the track keeps a
    # fixed schedule, so frames an encoder pulled late in one 2 s window are caught up in the next.
    assert 25 <= frames_overall <= 33
    assert packets_5 / frames_5 < 1.5 * packets_1 / frames_1  # per frame: one stream, not five


async def test_cleanup_leaves_the_room_without_publisher(janus_url, room):
    pub = await publisher_of(janus_url, room, PatternTrack())
    assert [p["id"] for p in await participants(janus_url, room) if p["publisher"]] == [pub.feed_id]
    session_id = pub.session.id
    await pub.__aexit__(None, None, None)
    await pub.close()  # idempotent
    assert [p for p in await participants(janus_url, room) if p["publisher"]] == []
    assert pub.pc.connectionState == "closed"
    probe = JanusSession(janus_url)
    try:
        with pytest.raises(JanusError, match="No such session") as raised:  # the session is destroyed
            await probe._post(f"/{session_id}", {"janus": "keepalive"}, "keepalive")
        assert raised.value.code == 458
    finally:
        await probe.destroy()
    # The room stays and takes a new publisher (publishers = 1 would refuse a second one).
    async with JanusPublisher(janus_url, room, "avatar", admin_key=ADMIN_KEY) as again:
        await again.publish([SineTrack()])


async def test_second_publisher_in_a_room_is_refused(janus_url, room):
    pub = await publisher_of(janus_url, room, SineTrack())
    try:
        with pytest.raises(JanusError, match="Maximum number of publishers"):
            await publisher_of(janus_url, room, SineTrack())
    finally:
        await pub.close()


async def test_subscribing_to_a_missing_room_is_a_clear_error(janus_url):
    with pytest.raises(JanusError, match=r"No such room \(999999\)") as raised:
        async with JanusSubscriber(janus_url, 999999):
            pass
    assert raised.value.code == 426
    with pytest.raises(JanusError, match="has no publisher"):  # a room with nobody in it
        async with JanusPublisher(janus_url, 999998, "avatar", admin_key=ADMIN_KEY):
            async with JanusSubscriber(janus_url, 999998):
                pass


async def test_creating_a_room_needs_the_admin_key(janus_url, room):
    with pytest.raises(JanusError, match="admin_key"):
        async with JanusPublisher(janus_url, room, "avatar"):
            pass
    with pytest.raises(JanusError, match="Unauthorized"):
        async with JanusPublisher(janus_url, room, "avatar", admin_key="wrong"):
            pass


async def test_janus_not_running_fails_fast():
    url = f"http://127.0.0.1:{free_port()}/janus"
    start = time.monotonic()
    with pytest.raises(JanusError, match="unreachable"):
        async with JanusPublisher(url, 1, "avatar", admin_key=ADMIN_KEY):
            pass
    with pytest.raises(JanusError, match="unreachable"):
        async with JanusSubscriber(url, 1):
            pass
    assert time.monotonic() - start < 2


async def test_keepalives_alone_keep_a_session_past_janus_session_timeout(janus_url, room, monkeypatch):
    async def no_long_poll(self):  # a pending long poll counts as activity too: leave only the keepalives
        pass

    monkeypatch.setattr(JanusSession, "_poll", no_long_poll)
    async with JanusSession(janus_url) as session:
        handle = await session.attach()
        await asyncio.sleep(SESSION_TIMEOUT + 3)
        reply = await session.message(handle, {"request": "exists", "room": room})
        assert reply.data["exists"] is False


async def test_a_request_janus_never_answers_times_out(room):
    """A server that accepts the connection but never answers: JanusError after the timeout."""
    stop = asyncio.Event()

    async def silent(reader, writer):
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    start = time.monotonic()
    try:
        with pytest.raises(JanusError, match="did not answer create session within 0.5 s"):
            async with JanusSession(f"http://127.0.0.1:{port}/janus", timeout=0.5):
                pass
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - start < 2
