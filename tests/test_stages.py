"""Where a session computes: its own process (the default) or threads of the server's."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading

import av
import numpy as np
import pytest

from engines.provenance.watermark import Payload
from helpers import Client, ClipTrack, clip, read_seconds, running_server, wait_for
from server.media import stages
from server.media.tracks import camera_planes

PAYLOAD = Payload(server=0x1234, use=0xABCDEF)


@pytest.fixture(scope="module")
def camera():
    """Three camera frames as the decoder hands them over (I420)."""
    frames = read_seconds(clip("drive_wink.mp4"), 0.1)
    return [camera_planes(av.VideoFrame.from_ndarray(f, format="rgb24")) for f in frames]


def shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def test_arrays_travel_through_the_region_and_the_rest_pickled():
    region = memoryview(bytearray(1000))
    small, large = np.arange(10, dtype=np.int16), np.zeros(2000, np.uint8)
    packed = stages._pack((small, "text", large, None), region)
    assert isinstance(packed[0], stages._Shared) and packed[1] == "text"
    assert packed[2] is large  # does not fit: pickled with the message
    copy = stages._unpack(packed, region, copy=True)
    region[:20] = bytes(20)  # the next call's arrays
    assert np.array_equal(copy[0], small) and copy[0].dtype == np.int16 and copy[3] is None


async def run_frames(kind: str, identity, frames) -> list[tuple[np.ndarray, np.ndarray]]:
    compute = stages.make_stages(kind, "0123456789abcdef")
    try:
        await compute.start(identity, PAYLOAD)
        out = []
        for planes in frames:
            handle, face_found, ms = await compute.call("prepare", "prepare", planes)
            assert face_found and ms["landmarks"] > 0
            image, labelled, ms = await compute.call("render", "finish", handle, True)
            out.append((image, labelled))
        return out
    finally:
        await compute.close()


async def test_a_process_computes_what_threads_compute(store, camera):
    identity = store.load("demo")
    names = shm_names()
    threads = await run_frames("thread", identity, camera)
    process = await run_frames("process", identity, camera)
    # The first frame is the same to the bit; later ones differ a little, as from one run to
    # the next, since the retargeter smooths motion by the clock.
    (a, a_badge), (b, b_badge) = threads[0], process[0]
    assert a.shape == (384, 256) and np.array_equal(a, b) and np.array_equal(a_badge, b_badge)  # I420 planes of 256²
    for (a, _), (b, _) in zip(threads[1:], process[1:]):
        assert np.abs(a.astype(int) - b).mean() < 5
    assert shm_names() == names  # its shared memory is gone with it


async def test_a_failed_call_is_reported_and_the_process_keeps_serving(store, camera):
    compute = stages.ProcessStages("0123456789abcdef")
    try:
        await compute.start(store.load("demo"), PAYLOAD)
        with pytest.raises(stages.ComputeError, match="KeyError"):
            await compute.call("render", "finish", 12345)  # nothing was prepared under it
        handle, _, _ = await compute.call("prepare", "prepare", camera[0])
        image, labelled, _ = await compute.call("render", "finish", handle, False)
        assert image.shape == (384, 256) and labelled is None  # I420 planes of 256²
    finally:
        await compute.close()


async def test_a_killed_process_is_reported_and_cleaned_up(store, camera):
    names = shm_names()
    compute = stages.ProcessStages("0123456789abcdef")
    try:
        await compute.start(store.load("demo"), PAYLOAD)
        os.kill(compute._proc.pid, signal.SIGKILL)
        with pytest.raises(stages.ComputeDied):
            for _ in range(50):  # until its pipe reports the end
                await compute.call("prepare", "prepare", camera[0])
                await asyncio.sleep(0.05)
    finally:
        await compute.close()
    assert compute._proc is None and shm_names() == names


async def test_a_start_that_fails_in_the_process_is_reported_and_cleaned_up():
    names = shm_names()
    compute = stages.ProcessStages("0123456789abcdef")
    with pytest.raises(stages.ComputeError, match="AttributeError"):
        await compute.start(None, PAYLOAD)  # no identity to build a pipeline from
    await compute.close()
    assert shm_names() == names and not multiprocessing.active_children()


def test_closing_waits_for_the_frame_in_flight_before_closing_the_pipeline():
    order, rendering = [], threading.Event()

    class Processor:
        def close(self):
            order.append("closed")
            raise RuntimeError("close failed")

    def render():
        rendering.set()
        threading.Event().wait(0.2)
        order.append("rendered")

    threads = stages._StageThreads("test")
    threads.submit("render", render)
    rendering.wait()
    with pytest.raises(RuntimeError, match="close failed"):  # reported, after both stages end
        threads.close(Processor())
    assert order == ["rendered", "closed"]
    with pytest.raises(RuntimeError, match="after shutdown"):
        threads.submit("prepare", print)


def test_unknown_compute_kind_is_refused():
    with pytest.raises(ValueError, match="process, thread"):
        stages.make_stages("gpu", "x")


async def test_a_crashed_session_process_ends_only_that_session(tmp_path, monkeypatch):
    frames = read_seconds(clip("drive_wink.mp4"), 1.0)
    async with running_server(tmp_path, monkeypatch) as srv:
        victim, other = Client(srv.ws_url), Client(srv.ws_url)
        for client in (victim, other):
            await client.connect()
            assert (await client.hello())["type"] == "session"
            client.keep_frames = False
            await client.start_media(ClipTrack(frames, loop=True))
        await wait_for(lambda: len(victim.received) >= 3 and len(other.received) >= 3, 20, "avatar frames")
        session = srv.state.sessions[victim.session["id"]]
        os.kill(session.stages._proc.pid, signal.SIGKILL)
        reply = await victim.recv(10)
        assert reply["code"] == "session_ended" and "compute process" in reply["message"], reply
        await wait_for(lambda: victim.session["id"] not in srv.state.sessions, 10, "the session to end")
        count = len(other.received)
        await wait_for(lambda: len(other.received) > count + 5, 10, "the other session's frames")
        await victim.close()
        await other.close()
