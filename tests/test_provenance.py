"""Provenance: the invisible watermark, the visible badge, consent enforcement, `avatar verify`."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from engines.provenance import watermark
from engines.identity import Consent, ConsentError, IdentityError, IdentityStore
from helpers import CLIPS, Client, ClipTrack, clip, read_seconds, running_server, shared_clip, wait_for

PAYLOAD = watermark.Payload.for_use("test-server", "c0ffee12")


@pytest.fixture(scope="module")
def portrait():
    return cv2.resize(astronaut(), (256, 256), interpolation=cv2.INTER_AREA)


def psnr(a, b) -> float:
    return 10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


def decoded(frames) -> watermark.Detection:
    return watermark.detect(np.array([watermark.project(watermark.luma(f)) for f in frames]))


# ---- the watermark ------------------------------------------------------------------------
def test_payload_survives_its_bits_and_rejects_a_wrong_check():
    bits = PAYLOAD.bits()
    assert len(bits) == watermark.NBITS
    assert watermark.Payload.from_bits(bits) == PAYLOAD
    assert PAYLOAD.use == 0xC0FFEE
    for i in (0, 20, 60):  # the sync word, the data, the CRC
        flipped = bits.copy()
        flipped[i] ^= 1
        assert watermark.Payload.from_bits(flipped) is None


@pytest.mark.parametrize("call_frame", [False, True])  # the avatar square; 1280x720 (its mask at half size)
def test_marked_frame_carries_the_payload_invisibly(portrait, call_frame, demo):
    if call_frame:  # the demo pasted back into its photo, as a call gets it
        from engines.render.scene import framer

        portrait = framer(demo, 1280, 720)(demo.reference)
    marked = watermark.Marker(PAYLOAD)(portrait)
    assert psnr(marked, portrait) >= 40
    assert decoded([marked]).payload == PAYLOAD
    assert not decoded([portrait]).found
    # Flat and saturated frames cannot be marked strongly, but must not be spoiled either.
    for flat in (np.full_like(portrait, 128), np.full_like(portrait, 255)):
        assert psnr(watermark.Marker(PAYLOAD)(flat), flat) >= 40


def test_a_frame_that_fights_the_mark_has_no_bit_left_weak(demo):
    # The demo pasted into its photo at 640x360 needs more change than 40 dB allows. Scaling
    # every bit's push alike left the bits its picture fights weak (the weakest at 0.13-0.30 of
    # STRENGTH for these payloads; over driven frames and VP8 at 300 kbps, one went wrong); the
    # budget now lifts those first (0.36-0.51).
    from engines.render.scene import framer

    frame = framer(demo, 640, 360)(demo.reference)
    for use in ("c0ffee12", "123456aa", "abcdef00", "0f0f0f00", "77777700"):
        marker = watermark.Marker(watermark.Payload.for_use("test-server", use))
        assert (watermark.project(watermark.luma(frame)) * marker.signs).min() < -20  # fought hard
        for _ in range(2):  # the second frame knows what the first cost
            marked = marker(frame)
        margins = watermark.project(watermark.luma(marked)) * marker.signs / watermark.STRENGTH
        assert psnr(marked, frame) >= 40 and margins.min() > 0.3, (use, np.round(np.sort(margins)[:4], 3))


def test_marking_i420_luma_is_the_rgb_mark(portrait):
    """Sessions mark the I420 planes they encode (luma rows only, studio range): a viewer
    decoding them to RGB sees the same mark, as strong and as faint, as the RGB path gives."""
    def rgb(planes):
        return cv2.cvtColor(planes, cv2.COLOR_YUV2RGB_I420)

    planes = cv2.cvtColor(portrait, cv2.COLOR_RGB2YUV_I420)
    marker = watermark.Marker(PAYLOAD)
    marked = marker.mark_i420(planes.copy())
    h = portrait.shape[0]
    assert np.array_equal(marked[h:], planes[h:])  # chroma untouched
    via_rgb = watermark.project(watermark.luma(rgb(cv2.cvtColor(marker(portrait), cv2.COLOR_RGB2YUV_I420))))
    via_i420 = watermark.project(watermark.luma(rgb(marked)))
    assert decoded([rgb(marked)]).payload == PAYLOAD and psnr(rgb(marked), rgb(planes)) >= 40
    assert np.corrcoef(via_rgb, via_i420)[0, 1] > 0.97 and 0.9 < np.abs(via_i420).mean() / np.abs(via_rgb).mean() < 1.1


def test_soft_decoding_recovers_a_weak_wrong_bit(portrait):
    projections = watermark.project(watermark.luma(watermark.Marker(PAYLOAD)(portrait)))
    weakest = int(np.argmin(np.abs(projections)))
    projections[weakest] = -0.01 * np.sign(projections[weakest])  # the hard decision is now wrong
    assert watermark.detect(projections).payload == PAYLOAD


def test_badge_then_mark_keeps_both(portrait):
    labelled = watermark.Marker(PAYLOAD)(portrait, badge=True)
    assert decoded([labelled]).payload == PAYLOAD
    corner = np.abs(labelled[:20, :80].astype(int) - portrait[:20, :80]).mean()
    rest = np.abs(labelled[100:].astype(int) - portrait[100:]).mean()
    assert corner > 10 * rest  # the badge shows; the rest only carries the faint mark


def test_viewers_copy_is_labelled_and_marked(store):
    from server.media.tracks import FrameProcessor, camera_planes
    import av
    import cv2

    identity = store.load("demo")
    processor = FrameProcessor(identity, PAYLOAD)
    try:
        frame = av.VideoFrame.from_ndarray(identity.reference, format="rgb24")
        handle, _, _ = processor.prepare(camera_planes(frame))
        planes = processor.finish(handle, viewer_label=True)
    finally:
        processor.close()
    # What the encoder takes: I420 planes, (h * 3/2, w).
    presenter, labelled = (cv2.cvtColor(p, cv2.COLOR_YUV2RGB_I420) for p in planes[:2])
    ms = planes[2]
    assert presenter.shape == identity.reference.shape
    assert decoded([presenter]).payload == PAYLOAD and decoded([labelled]).payload == PAYLOAD
    assert np.abs(labelled[:20, :80].astype(int) - presenter[:20, :80]).mean() > 20
    assert ms["mark"] > 0


# ---- avatar verify ------------------------------------------------------------------------
def verify(path, *extra):
    return subprocess.run([sys.executable, "-m", "server.cli", "verify", str(path), *extra],
                          capture_output=True, text=True, timeout=120)


def test_verify_exit_codes(tmp_path, portrait):
    marked, plain, junk = tmp_path / "marked.png", tmp_path / "plain.png", tmp_path / "junk.mp4"
    cv2.imwrite(str(marked), cv2.cvtColor(watermark.Marker(PAYLOAD)(portrait), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(plain), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    junk.write_bytes(b"not a video")
    found = verify(marked, "--json")
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)
    assert report["found"] and report["payload"] == str(PAYLOAD) and report["confidence"] == 1.0
    assert report["c2pa"] is None
    none = verify(plain)
    assert none.returncode == 1 and "no avatar watermark" in none.stdout
    bad = verify(junk)
    assert bad.returncode == 2 and "error:" in bad.stderr
    assert verify(tmp_path / "missing.png").returncode == 2


@pytest.mark.slow
def test_goals_on_the_shared_clips():
    """Issue #14's table: survival through aiortc's VP8 300 kbps and H.264 500 kbps, 50%
    downscale + re-encode and a screen-recording-style re-encode (>= 95% of 2-s segments),
    no mark found in unmarked clips, PSNR >= 40 dB."""
    from server.bench.watermark import bench

    report = bench([shared_clip(c) for c in CLIPS], seconds=6, vp8_bps=300_000, h264_bps=500_000)
    for channel, s in report["survival"].items():
        assert s["ratio"] >= 0.95, (channel, s)
    assert report["false_positives"]["marked"] == 0
    assert report["false_positives"]["segments"] >= 12
    assert report["psnr_db"]["min"] >= 40


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIPS)
def test_real_footage_is_never_reported_marked(name):
    from engines.provenance.verify import verify_file

    verdict = verify_file(shared_clip(name))
    assert not verdict.found and len(verdict.segments) >= 5


# ---- consent --------------------------------------------------------------------------------
def consent(**changes) -> Consent:
    fields = dict(statement="I agree", subject="Jo Doe", recorded_by="op",
                  granted_at="2026-01-01T00:00:00+00:00")
    return Consent(**{**fields, **changes})


def test_consent_scope_expiry_and_revocation():
    consent().check("live-avatar")
    with pytest.raises(ConsentError) as e:
        consent(scope=["offline-render"]).check("live-avatar")
    assert e.value.code == "consent_scope"
    with pytest.raises(ConsentError) as e:
        consent(expires_at="2026-06-01T00:00:00+00:00").check(
            "live-avatar", now=dt.datetime(2026, 7, 1, tzinfo=dt.timezone.utc))
    assert e.value.code == "consent_expired"
    with pytest.raises(ConsentError) as e:
        consent(revoked_at="2026-02-01T00:00:00+00:00", revoked_by="jo").check("offline-render")
    assert e.value.code == "consent_revoked" and "jo" in str(e.value)
    consent(scope=["demo"]).check("enrollment")  # the embedded public-domain face


def test_enrollment_needs_consent_to_enroll(tmp_path, portrait):
    with pytest.raises(ConsentError, match="enrollment"):
        IdentityStore(tmp_path).create(portrait, "jo", consent(scope=["live-avatar"]), "Jo", source="test")
    assert not (tmp_path / "jo").exists()


def test_revoke_keeps_the_record_and_blocks_renders(tmp_path, store):
    home = tmp_path / "home"
    s = IdentityStore(home / "identities")
    demo = store.load("demo")
    s.create(demo.reference, "jo", consent(), "Jo", source="test")
    before = s.load("jo").manifest["consent"]
    cli = [sys.executable, "-m", "server.cli", "--home", str(home)]
    done = subprocess.run(cli + ["identity", "revoke", "jo", "--reason", "asked to stop"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    after = s.load("jo").consent  # still loads: the bundle's files are untouched
    assert after.revoked_at and after.revoke_reason == "asked to stop"
    kept = ("statement", "subject", "recorded_by", "granted_at", "scope", "expires_at")
    assert {k: after.__dict__[k] for k in kept} == {k: before[k] for k in kept}
    with pytest.raises(IdentityError, match="already revoked"):
        s.revoke("jo", "op")
    drive = tmp_path / "drive.mp4"
    _tiny_video(drive, demo.reference)
    render = subprocess.run(cli + ["render", str(drive), "-o", str(tmp_path / "o.mp4"), "--identity", "jo"],
                            capture_output=True, text=True, timeout=120)
    assert render.returncode == 2 and "revoked" in render.stderr
    assert not (tmp_path / "o.mp4").exists()
    report = tmp_path / "eval"  # eval's report shows rendered frames of the person too
    evaluated = subprocess.run(cli + ["eval", "jo", "--driving", str(drive), "-o", str(report)],
                               capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 2 and "revoked" in evaluated.stderr
    assert not report.with_suffix(".html").exists()


def test_bad_scope_and_past_expiry_are_refused(tmp_path, portrait):
    image = tmp_path / "me.png"
    cv2.imwrite(str(image), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    cli = [sys.executable, "-m", "server.cli", "--home", str(tmp_path), "identity", "create",
           "--image", str(image), "--name", "me", "--consent", "I agree"]
    bad = subprocess.run(cli + ["--scope", "live-avatar,everything"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown use" in bad.stderr
    past = subprocess.run(cli + ["--expires", "2020-01-01"], capture_output=True, text=True, timeout=60)
    assert past.returncode == 2 and "in the past" in past.stderr


def test_label_switch_is_per_identity(tmp_path, store):
    s = IdentityStore(tmp_path)
    s.create(store.load("demo").reference, "jo", consent(), "Jo", source="test")
    assert s.load("jo").label_viewers
    s.set_label("jo", False)
    assert not s.load("jo").label_viewers


def _tiny_video(path, rgb, frames: int = 10):
    import av

    with av.open(str(path), "w") as sink:
        stream = sink.add_stream("libx264", rate=30)
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            sink.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        sink.mux(stream.encode(None))


# ---- live sessions --------------------------------------------------------------------------
async def test_live_frames_are_marked_and_revocation_ends_the_session(tmp_path, monkeypatch):
    frames = read_seconds(clip("drive_wink.mp4"), 2.0)
    async with running_server(tmp_path, monkeypatch) as srv:
        client = await Client(srv.ws_url).connect()
        try:
            reply = await client.hello()
            assert reply["type"] == "session", reply
            await client.start_media(ClipTrack(frames, loop=True))
            await wait_for(lambda: len(client.received) >= 40, 30, "avatar frames")
            detection = decoded([rgb for *_, rgb in client.received[-30:]])  # as a viewer's VP8 left them
            assert detection.found, detection
            assert detection.payload.use == int(reply["id"][:6], 16)

            srv.state.store.revoke("demo", "test", "withdrawn")
            ended = await client.recv(timeout=10)
            while ended.get("type") != "error":
                ended = await client.recv(timeout=10)
            assert ended["code"] == "consent_revoked" and "withdrawn" in ended["message"]
            await wait_for(lambda: not srv.state.sessions, 10, "the session to end")

            again = await Client(srv.ws_url).connect()
            try:
                refused = await again.hello()
                assert refused["type"] == "error" and refused["code"] == "consent_revoked", refused
            finally:
                await again.close()
        finally:
            await client.close()


async def test_viewers_see_the_badge_and_the_mark(tmp_path, monkeypatch):
    frames = read_seconds(clip("drive_wink.mp4"), 2.0)
    async with running_server(tmp_path, monkeypatch) as srv:
        presenter, viewer = Client(srv.ws_url), Client(srv.ws_url)
        try:
            await presenter.connect()
            reply = await presenter.start_session(ClipTrack(frames, loop=True), room="main")
            await viewer.connect()
            await viewer.watch("main")
            await wait_for(lambda: len(viewer.received) >= 40 and len(presenter.received) >= 40, 30,
                           "frames at the viewer and the presenter")
            seen = [rgb for *_, rgb in viewer.received[-30:]]
            own = [rgb for *_, rgb in presenter.received[-30:]]
            detection = decoded(seen)
            assert detection.found and detection.payload.use == int(reply["id"][:6], 16), detection
            corner = lambda fs: np.mean([f[4:18, 4:70].astype(float).std() for f in fs])  # noqa: E731
            assert corner(seen) > 2 * corner(own), "the viewers' badge, and none on the presenter's own view"
        finally:
            await viewer.close()
            await presenter.close()
