"""Admission control, hostile input, and clean teardown over many sessions."""
from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import threading

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from helpers import Client, ClipTrack, clip, read_seconds, running_server, wait_for

TOKENS = {"good-token": frozenset({"demo"}), "admin-token": "*"}


@pytest.fixture(scope="module")
def driver_frames():
    return read_seconds(clip("drive_wink.mp4"), 2.0)


async def streaming_client(srv, frames, token=None) -> Client:
    client = await Client(srv.ws_url).connect()
    reply = await client.hello(token=token)
    assert reply["type"] == "session", reply
    client.keep_frames = False
    await client.start_media(ClipTrack(frames, loop=True))
    await wait_for(lambda: len(client.received) >= 5, 20, "avatar frames")
    return client


async def expect_error(client: Client, msg, code: str) -> dict:
    reply = await client.request(msg)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    return reply


@pytest.mark.slow
async def test_three_sessions_served_fourth_busy(tmp_path, monkeypatch, driver_frames):
    async with running_server(tmp_path, monkeypatch, max_sessions=3) as srv:
        clients = [await streaming_client(srv, driver_frames) for _ in range(3)]
        try:
            fourth = await Client(srv.ws_url).connect()
            await expect_error(fourth, {"v": 1, "type": "hello"}, "busy")
            await asyncio.wait_for(fourth.ws.wait_closed(), 5)
            # All three keep streaming.
            counts = [len(c.received) for c in clients]
            await asyncio.sleep(1.5)
            assert all(len(c.received) > n for c, n in zip(clients, counts))
            assert srv.state.metrics.sessions_active == 3
        finally:
            for c in clients:
                await c.close()
        await wait_for(lambda: srv.state.metrics.sessions_active == 0, 10, "sessions to end")
        # A slot is free again.
        again = await Client(srv.ws_url).connect()
        assert (await again.hello())["type"] == "session"
        await again.close()


async def test_bad_input_gets_error_codes_and_healthy_session_streams(tmp_path, monkeypatch, driver_frames):
    async with running_server(tmp_path, monkeypatch, tokens=TOKENS) as srv:
        healthy = await streaming_client(srv, driver_frames, token="good-token")
        try:
            async def fresh() -> Client:
                return await Client(srv.ws_url).connect()

            c = await fresh()
            await expect_error(c, "{not json", "bad_json")
            await expect_error(c, "[1, 2]", "bad_message")
            await expect_error(c, {"v": 1, "type": "offer", "sdp": "v=0"}, "bad_message")  # before hello
            await expect_error(c, "x" * (70 * 1024), "too_large")
            await expect_error(c, {"v": 1, "type": "hello", "token": "wrong"}, "unauthorized")
            await asyncio.wait_for(c.ws.wait_closed(), 5)

            c = await fresh()
            await expect_error(c, {"v": 1, "type": "hello", "token": "good-token", "identity": "../../etc"},
                               "bad_value")
            for frame in ("1281x720", "7680x4320", 1280, "1280x"):  # a call frame the server will not send
                c = await fresh()
                await expect_error(c, {"v": 1, "type": "hello", "token": "good-token", "frame": frame}, "bad_value")
                await asyncio.wait_for(c.ws.wait_closed(), 5)
            c = await fresh()
            await expect_error(c, {"v": 1, "type": "hello", "token": "good-token", "identity": "alice"},
                               "forbidden_identity")
            c = await fresh()
            await expect_error(c, {"v": 1, "type": "hello", "token": "admin-token", "identity": "nobody"},
                               "unknown_identity")

            c = await fresh()
            assert (await c.hello(token="good-token"))["type"] == "session"
            await expect_error(c, {"v": 1, "type": "offer", "sdp": "v=0\r\nthis is not sdp"}, "bad_sdp")
            await expect_error(c, {"v": 1, "type": "offer", "sdp": 42}, "bad_sdp")
            await expect_error(c, {"v": 1, "type": "offer", "sdp": "v=0" + "a" * 40000}, "too_large")
            await expect_error(c, {"v": 1, "type": "control", "warp_speed": 9}, "unknown_control")
            await expect_error(c, {"v": 1, "type": "control", "expression_gain": 5}, "bad_value")
            await expect_error(c, {"v": 1, "type": "control", "expression_gain": "1"}, "bad_value")
            await expect_error(c, {"v": 1, "type": "control", "freeze_head": 1}, "bad_value")
            await expect_error(c, {"v": 1, "type": "control", "identity": "../../etc"}, "bad_value")
            await expect_error(c, {"v": 1, "type": "control", "identity": "alice"}, "forbidden_identity")
            await expect_error(c, {"v": 1, "type": "launch"}, "bad_message")
            await expect_error(c, b"\x00binary", "bad_message")
            ok = await c.request({"v": 1, "type": "control", "expression_gain": 1.5, "recalibrate": True})
            assert ok["type"] == "control_ok" and ok["controls"]["expression_gain"] == 1.5
            assert (await c.request({"v": 1, "type": "ping", "id": 7})) == {"v": 1, "type": "pong", "id": 7}
            # Flooding gets rate limited, then the connection is closed.
            # (300: the loop is shared with media, so the bucket refills a little meanwhile.)
            for _ in range(300):
                await c.send({"v": 1, "type": "ping"})
            codes = []
            try:
                while True:
                    codes.append((await c.recv(5)).get("code"))
            except Exception as e:
                print("flood ended by", repr(e), len(codes), codes.count("rate_limited"), codes[-3:])
            assert "rate_limited" in codes
            await asyncio.wait_for(c.ws.wait_closed(), 5)

            # Through all of that the healthy session kept streaming.
            n = len(healthy.received)
            await asyncio.sleep(1.0)
            assert len(healthy.received) > n + 10
            assert srv.state.metrics.sessions_active == 1
        finally:
            await healthy.close()


def _threads() -> tuple[int, int, int]:
    """(our Python threads, pooled default-executor threads, OS threads incl. native ones).

    The loop's default executor ('asyncio_N', used by aiortc's codecs) is a shared pool
    that grows lazily up to a fixed size: its threads are reuse, not leaks."""
    names = [t.name for t in threading.enumerate()]
    pooled = sum(n.startswith("asyncio_") for n in names)
    return len(names) - pooled, pooled, len(os.listdir("/proc/self/task"))


def _live_peer_connections() -> int:
    gc.collect()
    return sum(isinstance(o, RTCPeerConnection) for o in gc.get_objects())


def _shared_memory() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


@pytest.mark.slow
async def test_connect_disconnect_cycles_leak_nothing(tmp_path, monkeypatch, driver_frames):
    frames = driver_frames[:30]

    async def cycle(srv, i):
        client = await Client(srv.ws_url).connect()
        assert (await client.hello())["type"] == "session"
        if i % 2 == 0:  # half stream media, half only say hello
            client.keep_frames = False
            await client.start_media(ClipTrack(frames, loop=True))
            await wait_for(lambda: len(client.received) >= 2, 20, "avatar frames")
        await client.close()
        await wait_for(lambda: srv.state.metrics.sessions_active == 0, 10, "the session to end")

    async with running_server(tmp_path, monkeypatch) as srv:
        await cycle(srv, 0)  # warm-up: the default executor's threads, mediapipe's first load
        await asyncio.sleep(0.5)
        tasks_before = len(asyncio.all_tasks())
        ours_before, pooled_before, os_before = _threads()
        pcs_before = _live_peer_connections()
        shm_before = _shared_memory()
        for i in range(20):
            await cycle(srv, i)
        # Teardown is asynchronous in places (aioice, thread exit): give it a moment.
        await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, 10, "tasks to finish")
        await wait_for(lambda: _threads()[0] <= ours_before, 10,
                       f"threads to exit ({[t.name for t in threading.enumerate()]})")
        # Native threads (mediapipe, codecs) go too: OS count grows only by new pool threads.
        ours, pooled, os_threads = _threads()
        assert os_threads <= os_before + (pooled - pooled_before), (os_before, os_threads, pooled)
        assert _live_peer_connections() <= pcs_before
        assert not srv.state.sessions
        assert srv.state.metrics.sessions_total == 21
        # Each session's compute process has exited and its shared memory is gone.
        assert not multiprocessing.active_children()
        assert _shared_memory() <= shm_before


async def test_odd_and_changing_camera_sizes_keep_streaming(tmp_path, monkeypatch, driver_frames):
    import cv2

    odd = [cv2.resize(f, (301, 233)) for f in driver_frames[:20]]
    tiny = [np.zeros((8, 8, 3), np.uint8)] * 5  # too small to track: skipped, not fatal
    frames = driver_frames[:20] + odd + tiny + driver_frames[20:40]
    async with running_server(tmp_path, monkeypatch) as srv:
        client = await Client(srv.ws_url).connect()
        assert (await client.hello())["type"] == "session"
        client.keep_frames = False
        track = ClipTrack(frames)
        await client.start_media(track)
        await wait_for(lambda: track.readyState == "ended", 20, "the frames to play")
        await asyncio.sleep(0.5)
        got = {pts for pts, *_ in client.received}
        after = [pts for pts, i in track.sent.items() if i >= 45]  # the last 512x512 part
        assert any(abs(p - q) <= 90 for p in after for q in got), "no output after the size changes"
        session = next(iter(srv.state.sessions.values()))
        assert session.stats.rejected >= 1
        await client.close()


@pytest.mark.slow
async def test_udp_port_range_is_respected(tmp_path, monkeypatch):
    frames = read_seconds(clip("drive_wink.mp4"), 1.0)
    async with running_server(tmp_path, monkeypatch, udp_ports="45100-45140") as srv:
        client = await Client(srv.ws_url).connect()
        try:
            await client.hello()
            client.keep_frames = False
            await client.start_media(ClipTrack(frames, loop=True))
            await wait_for(lambda: len(client.received) >= 2, 20, "avatar frames")
            (session,) = srv.state.sessions.values()
            gatherer = session.pc.getTransceivers()[0].sender.transport.transport.iceGatherer
            ports = {c.port for c in gatherer.getLocalCandidates()}
            assert ports and all(45100 <= p <= 45140 for p in ports), ports
        finally:
            await client.close()


@pytest.mark.parametrize("bad", ["80-90", "5000", "a-b", "6000-5000", "40000-70000"])
def test_udp_port_range_is_validated(bad):
    from server.config import ServerConfig
    from server.security import ConfigError

    with pytest.raises(ConfigError, match="UDP port range"):
        ServerConfig(udp_ports=bad).validate()


async def test_sessions_render_at_the_identity_size_up_to_output_size(tmp_path, monkeypatch):
    """A 512² photo identity streams at 512², or at --output-size when that is smaller."""
    import cv2
    from skimage.data import astronaut

    from engines.identity import Consent, IdentityStore, identities_dir

    home = tmp_path / "home"
    consent = Consent("I agree to be used as a live avatar.", "Test Person", "tester", "2026-11-22T00:00:00+00:00")
    IdentityStore(identities_dir(home)).create(cv2.resize(astronaut(), None, fx=3, fy=3), "big", consent, "Big",
                                               source="astronaut x3")
    frames = read_seconds(clip("drive_wink.mp4"), 1.0)
    for output_size, side in ((512, 512), (256, 256)):
        async with running_server(tmp_path, monkeypatch, output_size=output_size) as srv:
            client = await Client(srv.ws_url).connect()
            try:
                await client.start_session(ClipTrack(frames, loop=True), identity="big")
                await wait_for(lambda: len(client.received) >= 5, 20, "avatar frames")
                rgb = client.received[-1][-1]
                assert rgb.shape == (side, side, 3), (output_size, rgb.shape)
            finally:
                await client.close()
