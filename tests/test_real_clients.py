"""Rooms with WebRTC stacks no one here wrote.

- Debian's Chromium (libwebrtc) runs the viewer page: live or waiting as it should be, the
  avatar video decoded (frames counted by requestVideoFrameCallback, 256 px, not black), the
  presenter's voice played (inbound-rtp audio stats), and a mouth that moves as the
  presenter's own avatar does (landmarks, as in test_server_e2e).
- Chromium as a WHIP publisher: getUserMedia (a fake camera playing drive_expressive, the fake
  microphone's beep) -> fetch('/whip/main') -> an aiortc viewer gets the avatar and the beep.
- Debian's simple-whip-client (GStreamer webrtcbin) as a WHIP encoder; on Debian bookworm it
  cannot start (libsoup 2 and 3 in one process) and the test skips, saying so.

Each test skips, with the reason, when its program or a shared clip is missing. Frames the
page showed and a screenshot land in tests/artifacts/ (not committed).
"""
from __future__ import annotations

import asyncio
import base64
import io
import shutil
import subprocess
import time

import numpy as np
import PIL.Image
import pytest

from helpers import AvatarClient, ClipTrack, SineTrack, clip, read_seconds, rms, running_server, wait_for
from server.bench.avsync import estimate_offset
from server.bench.chromium import CHROMIUM, DevTools, browser_page, write_y4m
from test_browser import ARTIFACTS, poll
from test_server_e2e import openness

pytestmark = pytest.mark.slow

DRIVER = "drive_expressive.mp4"
TOKENS = {"tokens": {"pres": "*"}, "viewer_tokens": {"watch": frozenset({"main"})}}

# What the viewer page shows and plays. Frames are counted twice: by the element's playback
# quality and by requestVideoFrameCallback (each frame actually presented). The picture is
# sampled 64x64 for its brightness and contrast. Audio: the receiver's inbound-rtp stats,
# which libwebrtc fills as the audio is played out (--mute-audio silences the speakers, not
# the playout; a muted <video> plays silence, so audioLevel stays 0 until the page unmutes).
PAGE = """(async () => {
  const v = document.getElementById('stream');
  if (!window.__shown && v.requestVideoFrameCallback) {
    window.__shown = 0;
    const tick = () => { window.__shown++; v.requestVideoFrameCallback(tick); };
    v.requestVideoFrameCallback(tick);
  }
  let mean = 0, spread = 0;
  if (v.videoWidth) {
    const c = document.createElement('canvas');
    c.width = c.height = 64;
    const g = c.getContext('2d');
    g.drawImage(v, 0, 0, 64, 64);
    const d = g.getImageData(0, 0, 64, 64).data, y = [];
    for (let i = 0; i < d.length; i += 4) y.push((d[i] + d[i + 1] + d[i + 2]) / 3);
    mean = y.reduce((s, x) => s + x, 0) / y.length;
    spread = Math.sqrt(y.reduce((s, x) => s + (x - mean) ** 2, 0) / y.length);
  }
  const audio = {packets: 0, level: 0, energy: 0, duration: 0};
  if (window.viewer.pc) (await window.viewer.pc.getStats()).forEach((r) => {
    if (r.type === 'inbound-rtp' && r.kind === 'audio') Object.assign(audio, {
      packets: r.packetsReceived || 0, level: r.audioLevel || 0,
      energy: r.totalAudioEnergy || 0, duration: r.totalSamplesDuration || 0});
  });
  return {frames: v.getVideoPlaybackQuality().totalVideoFrames, shown: window.__shown || 0,
          width: v.videoWidth, height: v.videoHeight, mean, spread, muted: v.muted, paused: v.paused,
          unmute: !document.getElementById('unmute').hidden,
          message: document.getElementById('message').textContent,
          presenter: window.viewer.presenter, error: window.viewer.lastError,
          navigations: performance.getEntriesByType('navigation').length, marker: window.__marker || null,
          audio};
})()"""

# Every frame the page presents for `seconds`, drawn from the element inside its
# requestVideoFrameCallback, with the wall-clock time its last packet arrived (receiveTime,
# performance clock + timeOrigin: the clock of Python's time.time()).
CAPTURE = """(async () => {
  const v = document.getElementById('stream'), c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d'), caps = [], end = performance.now() + %d;
  await new Promise((done) => {
    const tick = (now, meta) => {
      g.drawImage(v, 0, 0);
      caps.push([(performance.timeOrigin + (meta.receiveTime || now)) / 1000, c.toDataURL('image/jpeg', 0.92)]);
      if (performance.now() < end) v.requestVideoFrameCallback(tick); else done();
    };
    v.requestVideoFrameCallback(tick);
    setTimeout(done, %d + 5000);
  });
  return caps;
})()"""


@pytest.fixture(autouse=True)
def _no_big_files_left(tmp_path):
    """The .y4m cameras are large (some 11 MB a second): gone after each test."""
    yield
    for f in tmp_path.glob("*.y4m"):
        f.unlink(missing_ok=True)


def camera(tmp_path, seconds: float = 4.0):
    """Chromium's fake camera: the driver clip as .y4m (Chromium loops it)."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    y4m = tmp_path / "camera.y4m"
    write_y4m(clip(DRIVER), y4m, seconds)
    return y4m


async def click(tools: DevTools, element_id: str) -> None:
    """A real click (a user gesture, as the page's autoplay fallback needs) in the middle of an element."""
    box = await tools.eval(f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect();"
                           " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        await tools.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


async def present(srv, seconds: float = 8.0) -> AvatarClient:
    """An aiortc presenter in room main: the driver clip, looping, and a 440 Hz hum. Set
    keep_frames to keep its own avatar frames (what the room's viewers should see)."""
    presenter = AvatarClient(srv.ws_url)
    await presenter.connect()
    track = ClipTrack(read_seconds(clip(DRIVER), seconds), loop=True)
    await presenter.start_session(track, room="main", audio=SineTrack())
    return presenter


def decode(data_url: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def series(times, values):
    """(times, values) where a face was found."""
    pairs = [(t, v) for t, v in zip(times, values) if v is not None]
    return tuple(np.array(x) for x in zip(*pairs)) if pairs else (np.array([]), np.array([]))


async def screenshot(tools: DevTools, name: str) -> None:
    shot = await tools.call("Page.captureScreenshot", format="png")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(base64.b64decode(shot["data"]))


async def test_viewer_page_shows_the_avatar_and_plays_the_voice(tmp_path, monkeypatch):
    y4m = camera(tmp_path)
    async with running_server(tmp_path, monkeypatch) as srv:
        presenter = await present(srv)
        try:
            # The link the presenter shares, as it is: it plays with no click on Watch.
            async with browser_page(f"{srv.url}viewer.html?room=main", y4m, tmp_path / "profile") as tools:
                state = await poll(tools, lambda s: min(s.get("shown", 0), s.get("frames", 0)) > 45 and s.get("mean", 0) > 20, 40, PAGE)
                assert "Live" in state["message"] and "demo" in state["message"], state
                assert state["presenter"] == {"identity": "demo"} and state["error"] is None, state
                assert state["frames"] > 45 and state["shown"] > 45, state  # decoded and presented
                assert (state["width"], state["height"]) == (256, 256), state
                assert state["mean"] > 20 and state["spread"] > 10, f"black or flat video: {state}"
                assert not state["paused"], state

                # Chromium refuses to autoplay sound without a gesture: the page plays muted
                # and offers "Click for sound". A click (a real input event) unmutes.
                if state["muted"]:
                    assert state["unmute"], f"muted with no way to unmute: {state}"
                    await click(tools, "unmute")
                before = await poll(tools, lambda s: not s.get("muted", True) and s.get("audio", {}).get("level", 0) > 0.05, 15, PAGE)
                assert not before["muted"] and not before["unmute"], before
                assert before["audio"]["level"] > 0.05, before  # the hum (RMS 0.21), not silence
                await asyncio.sleep(1.5)
                after = await tools.eval(PAGE)
                a, b = before["audio"], after["audio"]
                assert b["packets"] > a["packets"] + 40, (a, b)  # ~50 Opus packets a second
                loudness = np.sqrt((b["energy"] - a["energy"]) / max(b["duration"] - a["duration"], 1e-6))
                assert loudness > 0.05, (a, b)  # totalAudioEnergy grows as a hum's would, not silence's

                # The frames the page presents, and the presenter's own avatar meanwhile.
                presenter.keep_frames, start = True, time.time()
                caps = await tools.eval(CAPTURE % (5000, 5000))
                await screenshot(tools, "viewer.png")
                own = [(t, rgb) for _, t, rgb in presenter.received if rgb is not None]
        finally:
            await presenter.close()

    shots = [decode(u) for _, u in caps]
    ARTIFACTS.mkdir(exist_ok=True)  # a strip of six frames the page presented, to look at
    strip = np.concatenate([shots[i] for i in np.linspace(0, len(shots) - 1, 6).astype(int)], axis=1)
    PIL.Image.fromarray(strip).save(ARTIFACTS / "viewer_frames.png")
    assert len(caps) > 40, f"only {len(caps)} frames presented in 5 s"
    vt, vv = series([t for t, _ in caps], openness(shots))
    pt, pv = series([t for t, _ in own], openness(rgb for _, rgb in own))
    assert len(vv) > 0.9 * len(caps), f"no face in {len(caps) - len(vv)} of {len(caps)} frames the page showed"
    assert np.std(vv) > 0.02, f"the mouth on the page hardly moves: {np.round(vv, 3)}"
    lag, r = estimate_offset(vt, vv, pt, pv, max_lag=0.5)
    print(f"page: {len(caps)} frames in 5 s (the presenter's own: {len(own)}); mouth vs the presenter's own avatar r={r:.2f}, "
          f"the page {1000 * lag:+.0f} ms later; level {before['audio']['level']:.3f}, loudness {loudness:.3f}")
    assert r > 0.7, f"the page's mouth does not follow the presenter's (r={r:.2f})"
    assert -0.15 < lag < 0.4, f"the page's mouth is {1000 * lag:+.0f} ms off the presenter's"


async def test_viewer_page_waits_then_picks_the_presenter_up(tmp_path, monkeypatch):
    y4m = camera(tmp_path)
    async with running_server(tmp_path, monkeypatch) as srv:
        async with browser_page(f"{srv.url}viewer.html?room=main&autostart=1", y4m, tmp_path / "profile") as tools:
            state = await poll(tools, lambda s: "Waiting" in s.get("message", ""), 20, PAGE)
            assert "Waiting for the presenter" in state["message"], state
            assert state["presenter"] is None and state["error"] is None and state["frames"] == 0, state
            await tools.eval("window.__marker = 'same page'")  # gone if the page reloaded
            presenter = await present(srv, seconds=4.0)
            try:
                state = await poll(tools, lambda s: min(s.get("shown", 0), s.get("frames", 0)) > 30 and s.get("mean", 0) > 20, 40, PAGE)
                assert "Live" in state["message"] and state["presenter"] == {"identity": "demo"}, state
                assert state["shown"] > 30 and state["frames"] > 30 and state["width"] == 256 and state["mean"] > 20, state
                assert state["marker"] == "same page" and state["navigations"] == 1, f"reloaded: {state}"
            finally:
                await presenter.close()
            # The presenter leaves: the page says it waits again (not an error), on the same page.
            state = await poll(tools, lambda s: "Waiting" in s.get("message", ""), 20, PAGE)
            assert "Waiting" in state["message"] and state["presenter"] is None, state
            assert state["error"] is None and state["marker"] == "same page", state


WHIP_PUBLISH = """(async () => { try {
  const media = await navigator.mediaDevices.getUserMedia({video: true, audio: true});
  const pc = new RTCPeerConnection();
  media.getTracks().forEach((t) => pc.addTrack(t, media));
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((r) => {  // WHIP without trickle: one offer with every candidate
    if (pc.iceGatheringState === 'complete') return r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r();
    setTimeout(r, 5000);
  });
  const res = await fetch('/whip/main', {method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer pres'}});
  const body = await res.text();
  if (res.status === 201) await pc.setRemoteDescription({type: 'answer', sdp: body});
  window.whip = {pc, media, location: res.headers.get('Location')};
  return {status: res.status, type: res.headers.get('Content-Type'), location: window.whip.location,
          gathering: pc.iceGatheringState, body: res.status === 201 ? '' : body,
          tracks: media.getTracks().map((t) => t.kind).sort()};
} catch (e) { return {error: String(e)}; } })()"""

WHIP_SENT = """(async () => {
  const out = {state: window.whip.pc.connectionState};
  (await window.whip.pc.getStats()).forEach((r) => {
    if (r.type === 'outbound-rtp') out[r.kind] = {bytes: r.bytesSent, frames: r.framesEncoded || 0};
  });
  return out;
})()"""


async def test_chromium_publishes_over_whip(tmp_path, monkeypatch):
    y4m = camera(tmp_path)
    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv:
        viewer = AvatarClient(srv.ws_url, keep_frames=True)
        await viewer.connect()
        assert (await viewer.watch("main", token="watch"))["presenter"] is None
        try:
            async with browser_page(f"{srv.url}viewer.html", y4m, tmp_path / "profile") as tools:
                loaded = "location.pathname === '/viewer.html' && document.readyState === 'complete'"
                for _ in range(50):  # the server's origin: a secure context (localhost) for getUserMedia
                    if await tools.eval(loaded):
                        break
                    await asyncio.sleep(0.2)
                answer = await tools.eval(WHIP_PUBLISH)
                assert answer.get("status") == 201, answer
                assert answer["type"] == "application/sdp" and answer["tracks"] == ["audio", "video"], answer
                assert answer["location"].startswith("/whip/main/"), answer
                assert (await viewer.recv())["presenter"] == {"identity": "demo"}  # the room says who is live

                await wait_for(lambda: len(viewer.received) > 45, 40, "avatar frames of Chromium's camera")
                await wait_for(lambda: len(viewer.audio) > 150, 15, "Chromium's microphone at the viewer")
                sent = await tools.eval(WHIP_SENT)
                assert sent["state"] == "connected" and sent["video"]["frames"] > 45, sent
                assert sent["audio"]["bytes"] > 1000, sent
                rgb = viewer.received[-1][2]
                assert rgb.shape == (256, 256, 3) and rgb.mean() > 20 and rgb.std() > 10, "black or flat avatar"
                loud = [rms(f) for _, f in viewer.audio[-150:]]  # the last 3 s
                print(f"WHIP from Chromium: {len(viewer.received)} avatar frames, audio rms max {max(loud):.3f} "
                      f"median {np.median(loud):.4f}; Chromium sent {sent}")
                assert max(loud) > 0.02, "the viewer hears silence, not the fake microphone's beep"
                assert srv.state.rooms.describe()[0]["presenter"] == {"identity": "demo"}

                delete = "(l) => fetch(l, {method: 'DELETE', headers: {'Authorization': 'Bearer pres'}}).then((r) => r.status)"
                assert await tools.eval(f"({delete})(window.whip.location)") == 200
                await wait_for(lambda: srv.state.rooms.live("main") is None, 10, "the WHIP session to end")
                assert (await viewer.recv())["presenter"] is None  # the viewer is told, and stays
                assert srv.state.metrics.sessions_active == 0
                assert await tools.eval(f"({delete})(window.whip.location)") == 404  # gone
                await tools.eval("window.whip.pc.close(); window.whip.media.getTracks().forEach((t) => t.stop())")
        finally:
            await viewer.close()


WHIP_CLIENT = "/usr/bin/whip-client"
CONFLICT = "libsoup2 symbols detected"


def versions(*packages: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}, ", *packages],
                         capture_output=True, text=True)
    return out.stdout.rstrip(", ") or "versions unknown"


async def test_simple_whip_client_publishes(tmp_path, monkeypatch):
    if not shutil.which(WHIP_CLIENT):
        pytest.skip(f"{WHIP_CLIENT} not installed (apt-get install simple-whip-client)")
    inspect = shutil.which("gst-inspect-1.0")
    missing = [e for e in ("y4mdec", "vp8enc", "opusenc", "rtpvp8pay", "rtpopuspay", "webrtcbin")
               if inspect is None or subprocess.run([inspect, "--exists", e]).returncode != 0]
    if missing:
        pytest.skip(f"GStreamer elements missing: {', '.join(missing)} (gstreamer1.0-plugins-good/-bad)")
    y4m = tmp_path / "camera.y4m"
    write_y4m(clip(DRIVER), y4m, seconds=6.0)
    log = tmp_path / "whip-client.log"
    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv:
        viewer = AvatarClient(srv.ws_url, keep_frames=True)
        await viewer.connect()
        await viewer.watch("main", token="watch")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [WHIP_CLIENT, "-u", f"{srv.url}whip/main", "-t", "pres", "-n", "-l", "4", "-o",
                 "-V", f"filesrc location={y4m} ! y4mdec ! identity sync=true ! videoconvert ! vp8enc deadline=1 ! "
                       "rtpvp8pay pt=96 ssrc=2 ! queue ! application/x-rtp,media=video,encoding-name=VP8,payload=96",
                 "-A", "audiotestsrc is-live=true wave=sine ! audioconvert ! audioresample ! queue ! opusenc ! "
                       "rtpopuspay pt=100 ssrc=1 ! queue ! application/x-rtp,media=audio,encoding-name=OPUS,payload=100"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 40
            while len(viewer.received) < 45 or len(viewer.audio) < 100:
                if proc.poll() is not None:
                    output = log.read_text(errors="replace")
                    if CONFLICT in output:
                        pytest.skip(
                            "Debian bookworm's simple-whip-client cannot start: whip-client links libsoup 2.4, "
                            "while GStreamer's webrtc plugin loads libnice -> libgupnp-igd-1.0 -> libgupnp-1.6 -> "
                            "libsoup 3, and libsoup 3 aborts a process that already has libsoup 2 "
                            f"('{CONFLICT}', exit {proc.returncode}). Packages: "
                            + versions("simple-whip-client", "libsoup2.4-1", "libsoup-3.0-0", "libnice10",
                                       "libgupnp-igd-1.0-4", "libgupnp-1.6-0", "gstreamer1.0-plugins-bad")
                            + ". test_chromium_publishes_over_whip covers WHIP with another third-party stack "
                              "(libwebrtc).")
                    pytest.fail(f"whip-client exited with {proc.returncode}:\n{output[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no avatar from whip-client in 40 s ({len(viewer.received)} frames, "
                                f"{len(viewer.audio)} audio frames):\n{log.read_text(errors='replace')[-3000:]}")
                await asyncio.sleep(0.2)
            rgb = viewer.received[-1][2]
            assert rgb.shape == (256, 256, 3) and rgb.mean() > 20, "black avatar"
            assert max(rms(f) for _, f in viewer.audio[-50:]) > 0.05  # audiotestsrc's sine
            assert srv.state.rooms.describe()[0]["presenter"] == {"identity": "demo"}
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            await viewer.close()
