"""A presenter turns the camera off and keeps talking as the avatar (issue #36): control
`voice_only` makes the microphone drive the face, for the room's viewers and the presenter's
own video; turning it off hands the face back to the camera."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import threading
import time

import numpy as np
import pytest
from helpers import Client, ClipTrack, clip, rms, running_server, wait_for
from test_voice_agent import SENTENCE, openness, voice_to_mouth

from server.bench.avsync import SpeechTrack, speech_samples
from server.bench.client import ClientError

pytestmark = pytest.mark.skipif(ctypes.util.find_library("espeak-ng") is None,
                                reason="eSpeak NG is not installed (apt-get install -y espeak-ng libespeak-ng1)")


@contextlib.asynccontextmanager
async def speaking_in_a_room(srv, frames):
    """A viewer of room "r", and a presenter there whose camera plays `frames` (looped) and
    whose microphone says SENTENCE over and over: (presenter, viewer), closed at the end."""
    viewer, presenter = Client(srv.ws_url), Client(srv.ws_url)
    try:
        await viewer.connect()
        await viewer.watch("r")
        await presenter.connect()
        speech = SpeechTrack(speech_samples([SENTENCE]))
        await presenter.start_session(ClipTrack(frames, loop=True), room="r", audio=speech)
        yield presenter, viewer
    finally:
        await presenter.close()
        await viewer.close()


async def test_camera_off_the_voice_moves_the_face_and_back(tmp_path, monkeypatch, demo):
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        # A still camera: the demo's own face, mouth shut. Only the voice can open it.
        async with speaking_in_a_room(srv, [demo.reference]) as (presenter, viewer):
            await wait_for(lambda: len(viewer.received) > 30, 15, "the camera's avatar at the viewer")
            camera_from = time.time()
            await asyncio.sleep(1.5)
            reply = await presenter.control(voice_only=True)
            assert reply["voice_only"] is True, reply
            voice_from = time.time()
            await asyncio.sleep(4.0)
            voice_until = time.time()
            still, talking = openness(viewer, camera_from, voice_from), openness(viewer, voice_from + 0.5, voice_until)
            assert len(talking) > 60 and len(still) > 20, (len(talking), len(still))
            assert np.ptp(talking) > 3 * max(np.ptp(still), 0.01), (np.ptp(talking), np.ptp(still))
            assert max(rms(f) for t, f in viewer.audio if t > voice_from) > 0.02  # and the voice is heard
            offset, confidence = voice_to_mouth(viewer, voice_from + 0.5, voice_until)
            print(f"voice only: mouth vs voice at the viewer {offset * 1e3:+.0f} ms (correlation {confidence:.2f})")
            own = openness(presenter, voice_from + 0.5, voice_until)  # the presenter sees it too
            assert len(own) > 60 and np.ptp(own) > 3 * max(np.ptp(still), 0.01)
            assert any(t.name.startswith("voice-") for t in threading.enumerate())

            reply = await presenter.control(voice_only=False)
            assert reply["voice_only"] is False, reply
            await asyncio.sleep(1.0)
            back_from = time.time()
            await asyncio.sleep(1.5)
            back = openness(viewer, back_from, time.time())
            assert len(back) > 20 and np.ptp(back) < np.ptp(talking) / 3  # the still camera again
            assert not any(t.name.startswith("voice-") for t in threading.enumerate())

            await presenter.control(voice_only=True)  # left on: closing the session ends it too
        await wait_for(lambda: not srv.state.sessions, 5, "the session's end")
        await wait_for(lambda: not any(t.name.startswith("voice-") for t in threading.enumerate()), 5,
                       "the voice's threads to end")


async def test_voice_only_needs_a_microphone_and_a_boolean(tmp_path, monkeypatch, demo):
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        presenter = Client(srv.ws_url)
        await presenter.connect()
        await presenter.start_session(ClipTrack([demo.reference], loop=True))  # no room: no microphone
        try:
            with pytest.raises(ClientError) as refused:
                await presenter.control(voice_only=True)
            assert refused.value.code == "bad_value" and "microphone" in str(refused.value)
            with pytest.raises(ClientError) as refused:
                await presenter.control(voice_only="yes")
            assert refused.value.code == "bad_value" and "true or false" in str(refused.value)
            reply = await presenter.control(voice_only=False)  # off while off: nothing to do
            assert reply["type"] == "control_ok" and reply["voice_only"] is False
            await wait_for(lambda: len(presenter.received) > 10, 10, "frames still coming")
        finally:
            await presenter.close()


@pytest.mark.slow
async def test_presenter_page_switches_the_camera_off(tmp_path, monkeypatch, demo):
    """The presenter page in Chromium (a fake camera, a fake microphone saying a sentence):
    ticking "Camera off" disables its camera track and the server drives the face by voice."""
    import wave

    from server.bench.chromium import CHROMIUM, browser_page, write_y4m
    from test_browser import poll

    if not __import__("os").path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    y4m, wav = tmp_path / "camera.y4m", tmp_path / "speech.wav"
    write_y4m(clip("drive_wink.mp4"), y4m)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(speech_samples([SENTENCE]).tobytes())
    page_state = """(() => ({connected: !!(window.avatar.pc && window.avatar.pc.connectionState === 'connected'),
        box: !document.getElementById('voice-only').disabled, ticked: document.getElementById('voice-only').checked,
        camera: window.avatar.camera ? window.avatar.camera.getVideoTracks().map((t) => t.enabled) : null}))()"""
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        async with browser_page(f"{srv.url}?autostart=1&room=r", y4m, tmp_path / "profile",
                                f"--use-file-for-fake-audio-capture={wav}") as tools:
            state = await poll(tools, lambda s: s.get("connected") and s.get("box"), 45, page_state)
            assert state.get("box"), state
            session = next(iter(srv.state.sessions.values()))
            await tools.eval("document.getElementById('voice-only').click()")
            state = await poll(tools, lambda s: s.get("ticked") and s.get("camera") == [False], 10, page_state)
            assert state.get("camera") == [False], state  # no picture leaves the page
            await wait_for(lambda: session.voice is not None, 10, "the voice to drive the face")
            viewer = Client(srv.ws_url)
            await viewer.connect()
            await viewer.watch("r")
            try:
                await wait_for(lambda: len(viewer.received) > 90, 20, "frames at the viewer")
                talking = openness(viewer, 0, time.time())
                assert np.ptp(talking) > 0.05, np.ptp(talking)  # the fake microphone's sentence moves the mouth
            finally:
                await viewer.close()
            await viewer_page_sees_and_hears(srv.url + "viewer.html?room=r", y4m, tmp_path / "viewer-profile")
            await tools.eval("document.getElementById('voice-only').click()")
            state = await poll(tools, lambda s: not s.get("ticked") and s.get("camera") == [True], 10, page_state)
            assert state.get("camera") == [True], state
            await wait_for(lambda: session.voice is None, 10, "the camera to drive the face again")


async def test_the_voice_takes_over_while_the_camera_has_lost_the_face(tmp_path, monkeypatch, demo):
    """No face for a second (the presenter looks away, leaves the frame): the voice drives the
    face until the camera finds it again, by itself."""
    blank = np.full_like(demo.reference, 90)
    frames = [demo.reference] * 60 + [blank] * 120 + [demo.reference] * 240  # 2 s, 4 s without, 8 s
    async with running_server(tmp_path, monkeypatch, compute="thread") as srv:
        async with speaking_in_a_room(srv, frames) as (presenter, viewer):
            session = next(iter(srv.state.sessions.values()))
            await wait_for(lambda: session.voice is not None, 10, "the voice to take over")
            took_over = time.time()
            assert session.voice_auto
            await asyncio.sleep(2.0)
            talking = openness(viewer, took_over + 0.5, time.time())
            assert len(talking) > 30 and np.ptp(talking) > 0.05, (len(talking), np.ptp(talking))
            await wait_for(lambda: session.voice is None, 6, "the camera to take the face back")
            back = time.time()
            await asyncio.sleep(1.5)
            camera = openness(viewer, back + 0.5, time.time())
            assert len(camera) > 20 and np.ptp(camera) < np.ptp(talking) / 3


def test_a_hand_over_dissolves_from_the_last_frame_shown():
    from types import SimpleNamespace

    from server.session import FADE_FRAMES, Session

    before, after = np.zeros((6, 4), np.uint8), np.full((6, 4), 180, np.uint8)
    s = SimpleNamespace(_fade=(before, FADE_FRAMES), _last_out=before)
    shown = [Session._dissolve(s, after, None)[0][0, 0] for _ in range(FADE_FRAMES + 2)]
    assert all(a < b for a, b in zip(shown, shown[1:FADE_FRAMES + 1])), shown  # step by step, no jump
    assert shown[0] > 0 and shown[FADE_FRAMES - 1] < 180 and shown[-2:] == [180, 180] and s._fade is None
    image, labelled = Session._dissolve(s, after, after + 10)  # no hand-over: untouched
    assert image is after and s._last_out is not None and labelled[0, 0] == 190


async def viewer_page_sees_and_hears(url: str, y4m, profile) -> None:
    """The viewer page (Chromium) on a voice-only presenter's room: the presenter's voice is
    heard there, and the mouth it shows moves with it."""
    from server.bench.chromium import browser_page
    from test_real_clients import CAPTURE, PAGE, click, decode
    from test_browser import poll
    from test_server_e2e import openness as mouth_openness

    async with browser_page(url, y4m, profile) as page:
        state = await poll(page, lambda s: min(s.get("shown", 0), s.get("frames", 0)) > 45, 40, PAGE)
        assert state["error"] is None and state["shown"] > 45, state
        if state["muted"]:  # Chromium autoplays muted; a click unmutes, as a person's would
            await click(page, "unmute")
        heard = await poll(page, lambda s: not s.get("muted", True) and s.get("audio", {}).get("level", 0) > 0.02,
                           15, PAGE)
        assert not heard["muted"] and heard["audio"]["level"] > 0.02, heard  # the sentence, not silence
        caps = await page.eval(CAPTURE % (3000, 3000))
    mouth = mouth_openness([decode(u) for _, u in caps])
    print(f"viewer page: {len(caps)} frames in 3 s, mouth range {np.ptp(mouth):.3f}, level {heard['audio']['level']:.3f}")
    assert len(caps) > 30 and np.ptp(mouth) > 0.05, (len(caps), np.round(mouth, 3))
