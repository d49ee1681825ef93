"""A voice agent drives the avatar (issue #36, docs/PROTOCOL.md "Voice agents"): a program pushes
speech (`say`, or PCM) into a room over the signaling WebSocket and the room's viewers see the
mouth move with the voice; barge-in, overflow and bad hellos."""
from __future__ import annotations

import asyncio
import ctypes.util
import json
import time

import numpy as np
import pytest
import websockets
from helpers import Client, rms, running_server, wait_for

pytestmark = pytest.mark.skipif(ctypes.util.find_library("espeak-ng") is None,
                                reason="eSpeak NG is not installed (apt-get install -y espeak-ng libespeak-ng1)")
SENTENCE = "Maybe Bob met my mom by the pub. Pam, please pass the bottle of apple milk!"


async def agent(srv, **hello):
    ws = await websockets.connect(srv.ws_url, max_size=2 ** 20)
    await ws.send(json.dumps({"v": 1, "type": "hello", "role": "agent", "room": "r", **hello}))
    return ws, json.loads(await asyncio.wait_for(ws.recv(), 15))


async def next_of(ws, kind: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        if msg.get("type") == kind:
            return msg


def openness(viewer, since: float, until: float, times: bool = False):
    from server.bench.avsync import MouthMeter

    meter = MouthMeter()
    pairs = [(t, meter.measure(rgb)) for _, t, rgb in viewer.received if since <= t <= until and rgb is not None]
    pairs = [(t, v) for t, v in pairs if np.isfinite(v)]
    if times:
        return np.array([t for t, _ in pairs]), np.array([v for _, v in pairs])
    return np.array([v for _, v in pairs])


def voice_to_mouth(viewer, since: float, until: float) -> tuple[float, float]:
    """(offset s, confidence) of the viewer's mouth against its audio's loudness: positive, the
    mouth later than the voice (server/bench/avsync.py)."""
    from server.bench.avsync import audio_series, estimate_offset

    vt, vv = openness(viewer, since, until, times=True)
    at, av_ = audio_series([(t, f) for t, f in viewer.audio if since <= t <= until])
    return estimate_offset(vt, vv, at, av_)


async def test_say_moves_the_mouth_and_the_voice_reaches_the_viewer(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        viewer = Client(srv.ws_url)
        await viewer.connect()
        await viewer.watch("r")
        ws, reply = await agent(srv)
        assert reply["type"] == "session", reply
        await wait_for(lambda: len(viewer.received) > 15, 10, "avatar frames at the viewer")
        quiet_from = time.time()
        await asyncio.sleep(1.0)
        said = time.time()
        await ws.send(json.dumps({"type": "say", "text": SENTENCE}))
        finished = await next_of(ws, "playback_finished", 20)
        took = time.time() - said
        assert finished["interrupted"] is False
        assert 2.5 < took < 9, took  # the sentence is ~4.5 s
        await asyncio.sleep(0.3)
        silent, speaking = openness(viewer, quiet_from, said), openness(viewer, said + 0.3, said + took - 0.3)
        assert len(speaking) > 30 and len(silent) > 10
        assert np.ptp(speaking) > 3 * max(np.ptp(silent), 0.01), (np.ptp(speaking), np.ptp(silent))
        loud = [rms(f) for t, f in viewer.audio if t > said]
        assert max(loud) > 0.02, max(loud)
        offset, confidence = voice_to_mouth(viewer, said - 0.5, said + took + 0.5)
        print(f"say: playback_finished after {took:.2f} s; mouth vs voice at the viewer {offset * 1e3:+.0f} ms "
              f"(correlation {confidence:.2f})")
        # interrupt mid-sentence: the voice stops and the mouth closes at once
        await ws.send(json.dumps({"type": "say", "text": SENTENCE}))
        await asyncio.sleep(1.5)
        cut = time.time()
        await ws.send(json.dumps({"type": "interrupt"}))
        stopped = await next_of(ws, "playback_finished", 5)
        assert stopped["interrupted"] is True
        await asyncio.sleep(1.5)
        after = [rms(f) for t, f in viewer.audio if t > cut + 0.6]
        assert not after or max(after) < 0.01, max(after)
        closed = openness(viewer, cut + 0.4, cut + 1.5)
        assert len(closed) > 10 and np.ptp(closed) < 0.5 * np.ptp(speaking)
        await ws.close()
        await viewer.close()
        await wait_for(lambda: not srv.state.sessions, 5, "the agent's session to end")
    from server.audit import AuditLog, audit_path
    uses = AuditLog(audit_path(tmp_path / "home")).query()
    assert any(u["kind"] == "session" and u["identity"] == "demo" and u["room"] == "r" for u in uses), uses


async def test_pushed_pcm_is_recognized_and_moves_the_mouth(tmp_path, monkeypatch):
    pytest.importorskip("pocketsphinx", reason="pocketsphinx is not installed (pip install pocketsphinx==5.1.1)")
    from engines.voice.audio import resample
    from engines.voice.espeak import synthesize

    speech = synthesize(SENTENCE)
    pcm = np.clip(resample(speech.samples, speech.rate, 16000) * 32767, -32768, 32767).astype("<i2").tobytes()
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        viewer = Client(srv.ws_url)
        await viewer.connect()
        await viewer.watch("r")
        ws, reply = await agent(srv, sample_rate=16000)
        assert reply["type"] == "session", reply
        await wait_for(lambda: len(viewer.received) > 15, 10, "avatar frames at the viewer")
        quiet_from = time.time()
        await asyncio.sleep(1.0)
        said = time.time()
        for i in range(0, len(pcm), 3200):  # 100 ms frames, a little ahead of real time
            await ws.send(pcm[i:i + 3200])
            await asyncio.sleep(0.09)
        finished = await next_of(ws, "playback_finished", 15)
        took = time.time() - said
        assert finished["interrupted"] is False and abs(finished["position"] - speech.duration) < 0.3, finished
        await asyncio.sleep(0.3)
        silent, speaking = openness(viewer, quiet_from, said), openness(viewer, said + 0.3, said + took - 0.3)
        assert len(speaking) > 30 and len(silent) > 10
        assert np.ptp(speaking) > 3 * max(np.ptp(silent), 0.01), (np.ptp(speaking), np.ptp(silent))
        offset, confidence = voice_to_mouth(viewer, said - 0.5, said + took + 0.5)
        print(f"pcm: playback_finished after {took:.2f} s ({speech.duration:.2f} s of speech); mouth vs voice "
              f"at the viewer {offset * 1e3:+.0f} ms (correlation {confidence:.2f})")
        await ws.close()
        await viewer.close()


async def test_pcm_overflow_bad_frames_and_the_session_goes_on(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        ws, reply = await agent(srv, sample_rate=16000)
        assert reply["type"] == "session", reply
        await ws.send(b"\x00\x01\x02")
        assert (await next_of(ws, "error"))["code"] == "bad_audio"
        await ws.send(bytes(70000))
        assert (await next_of(ws, "error"))["code"] == "too_large"
        tone = (3000 * np.sin(np.arange(1600) / 16000 * 2 * np.pi * 220)).astype("<i2").tobytes()  # 100 ms
        got = None
        for _ in range(200):  # 20 s of speech in about 6 s: three times real time
            await ws.send(tone)
            await asyncio.sleep(0.03)
            try:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 0.001))
            except asyncio.TimeoutError:
                continue
            if msg.get("type") == "error":
                got = msg
                break
        assert got is not None and got["code"] == "overflow", got
        await ws.send(json.dumps({"type": "interrupt"}))
        assert (await next_of(ws, "playback_finished"))["interrupted"] is True
        await ws.send(json.dumps({"type": "say", "text": ""}))
        assert (await next_of(ws, "error"))["code"] == "bad_value"
        await ws.send(json.dumps({"type": "say", "text": "a" * 2001}))
        assert (await next_of(ws, "error"))["code"] == "bad_value"
        await ws.send(json.dumps({"type": "ping", "id": 1}))
        assert (await next_of(ws, "pong"))["id"] == 1
        await ws.close()


@pytest.mark.parametrize("hello, code", [
    ({"sample_rate": 44100}, "bad_value"),
    ({"room": None}, "bad_value"),
    ({"token": "viewer1"}, "forbidden"),
    ({"token": "nope"}, "unauthorized"),
    ({"identity": "someone"}, "forbidden_identity"),
])
async def test_bad_hellos_are_refused(tmp_path, monkeypatch, hello, code):
    async with running_server(tmp_path, monkeypatch, tokens={"tok": ["demo"]}, viewer_tokens={"viewer1": ["r"]},
                              compute="thread") as srv:
        ws, reply = await agent(srv, **{"token": "tok", **hello})
        assert reply["type"] == "error" and reply["code"] == code, reply
        await ws.close()
        assert not srv.state.sessions


async def test_agents_count_against_max_sessions_and_a_failed_setup_frees_everything(tmp_path, monkeypatch):
    from server import voice_session

    async with running_server(tmp_path, monkeypatch, compute="thread", max_sessions=1) as srv:
        ws, reply = await agent(srv)
        assert reply["type"] == "session", reply
        other = await websockets.connect(srv.ws_url)
        await other.send(json.dumps({"v": 1, "type": "hello", "role": "agent", "room": "r2"}))
        assert json.loads(await asyncio.wait_for(other.recv(), 10))["code"] == "busy"
        taken = await websockets.connect(srv.ws_url)
        await taken.send(json.dumps({"v": 1, "type": "hello", "role": "agent", "room": "r"}))
        assert json.loads(await asyncio.wait_for(taken.recv(), 10))["code"] in ("room_busy", "busy")
        await ws.close()
        await wait_for(lambda: not srv.state.sessions and srv.state.metrics.sessions_active == 0, 5, "the slot")

        def broken(*args, **kwargs):
            raise RuntimeError("renderer exploded")
        monkeypatch.setattr(voice_session, "VoiceProcessor", broken)
        ws, reply = await agent(srv)
        assert reply["type"] == "error" and reply["code"] == "internal_error", reply
        await wait_for(lambda: not srv.state.sessions and srv.state.metrics.sessions_active == 0
                       and not srv.state.rooms.rooms, 5, "everything freed")
    from server.audit import AuditLog, audit_path
    uses = AuditLog(audit_path(tmp_path / "home")).query()
    assert any(u["status"] == "error" for u in uses), uses
