"""The A/V sync instrument (server/bench/avsync.py): offsets recovered from signals with a
known skew, drift, no figure from a still mouth; the tone follows the mouth, in step and in
real time; on a real clip the mouth series moves and a round trip (raw, and through Opus)
reads ~0."""
from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from helpers import read_frames, shared_clip
from server.bench.avsync import (FRAME, RATE, MouthMeter, ToneTrack, audio_series, avsync_summary,
                                 estimate_offset, loudness, mouth_series, windowed_offsets)


def smooth_mouth(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A talking-like mouth opening as a function of time (1 kHz): smoothed noise, >= 0,
    in mouth_opening's units (0..~0.3)."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, seconds, 0.001)
    x = np.convolve(rng.standard_normal(len(t)), np.hanning(150), "same")
    return t, 0.02 * np.clip(x, 0, None)


def viewer_signals(seconds: float, skew, seed: int = 0):
    """What a viewer records when the face is `skew(t)` s later than the sound: video at
    ~30 fps and audio loudness at 50 Hz, both with arrival jitter."""
    t, m = smooth_mouth(seconds, seed)
    rng = np.random.default_rng(seed + 100)
    video_t = np.arange(0.5, seconds - 0.5, 1 / 30)
    video_t = video_t + rng.uniform(0, 0.006, len(video_t))
    audio_t = np.arange(0.5, seconds - 0.5, 0.02)
    audio_t = audio_t + rng.uniform(0, 0.004, len(audio_t))
    # The face shown at T is the mouth of T - skew; the sound heard at T is the mouth of T.
    video = np.interp(video_t - skew(video_t), t, m)
    audio = 0.2 * np.interp(audio_t, t, m) / m.max()  # a loudness: another scale
    return video_t, video, audio_t, audio


# ---- the offset -----------------------------------------------------------------------

@pytest.mark.parametrize("skew", [0.060, -0.030, 0.0])
def test_known_offsets_are_recovered(skew):
    vt, vv, at, av_ = viewer_signals(30, lambda t: skew)
    offset, confidence = estimate_offset(vt, vv, at, av_)
    assert abs(offset - skew) < 0.005 and confidence > 0.9, (offset, confidence)
    windows = windowed_offsets(vt, vv, at, av_)
    assert len(windows) == 4, windows  # 10 s windows every 5 s over 29 s
    assert all(abs(o - skew) < 0.005 and c > 0.9 for _, o, c in windows), windows
    s = avsync_summary(windows)
    assert abs(s["offset_ms"]["p50"] - 1e3 * skew) < 5 and s["within_40ms"] == (abs(skew) <= 0.040), s


def test_gaps_and_nans_are_not_bridged_into_a_figure():
    vt, vv, at, av_ = viewer_signals(30, lambda t: 0.045, seed=3)
    vv = vv.copy()
    vv[(vt > 8) & (vt < 9.5)] = np.nan  # no face for 1.5 s
    keep = (vt < 20) | (vt > 21)  # a video stall of 1 s
    offset, confidence = estimate_offset(vt[keep], vv[keep], at, av_)
    assert abs(offset - 0.045) < 0.005 and confidence > 0.9, (offset, confidence)


def test_drift_is_recovered():
    vt, vv, at, av_ = viewer_signals(90, lambda t: 0.010 + 0.001 * t, seed=2)  # +60 ms a minute
    windows = windowed_offsets(vt, vv, at, av_)
    s = avsync_summary(windows)
    assert s["windows"] >= 15 and abs(s["drift_ms_per_min"] - 60) < 3, s
    assert s["within_40ms"] is False and s["offset_ms"]["max"] > 80 and s["confidence_p50"] > 0.9, s


def test_a_still_mouth_gives_no_figure_not_a_fake_zero():
    vt, _, at, av_ = viewer_signals(40, lambda t: 0.0)
    rng = np.random.default_rng(5)
    for still in (np.full(len(vt), 0.12), 0.12 + 0.002 * rng.standard_normal(len(vt))):  # + landmark noise
        windows = windowed_offsets(vt, still, at, av_)
        assert windows == []
        s = avsync_summary(windows)
        assert s["windows"] == 0 and s["offset_ms"] is None and s["within_40ms"] is None, s
    # Sound that does not go with the face (another talk) is no figure either.
    wt, wv, _, _ = viewer_signals(40, lambda t: 0.0, seed=9)
    assert windowed_offsets(wt, wv, at, av_) == []


# ---- the sound ------------------------------------------------------------------------

async def pull(track, limit: int = 100_000) -> list[av.AudioFrame]:
    """Every frame of a track that ends."""
    frames = []
    try:
        while len(frames) < limit:
            frames.append(await track.recv())
    except MediaStreamError:
        return frames
    raise AssertionError(f"the track did not end after {limit} frames")


async def test_tone_follows_the_series_in_step_and_ends():
    series = np.array([0.0] * 15 + [1.0] * 15 + [np.nan] * 15 + [0.5] * 15)  # 2 s at 30 fps
    start = time.monotonic() - 10  # long past: frames come at once
    track = ToneTrack(series, 30, lambda: start, loop=False)
    frames = await pull(track)
    assert [f.pts for f in frames] == list(range(0, 2 * RATE, FRAME))  # contiguous, 20 ms each
    assert all(f.samples == FRAME and f.sample_rate == RATE and f.time_base == fractions.Fraction(1, RATE)
               and f.format.name == "s16" and f.layout.name == "mono" for f in frames)
    level = np.array([loudness(f) for f in frames])
    # Frame k covers [k, k + 1) * 20 ms; the series steps at 0.5, 1.0 and 1.5 s (frames 25, 50, 75).
    assert level[:23].max() == 0  # silence is silence
    assert level[26:48].min() > 0.15  # loud where the series is at its top
    assert level[52:73].max() == 0  # no face: silent
    assert np.allclose(level[77:], level[26:48].mean() / 2, rtol=0.05)  # half way, half as loud
    assert track.readyState == "ended" and len(track.sent_at) == len(frames)


async def test_tone_waits_for_the_video_paces_in_real_time_and_loops():
    series = np.linspace(0, 1, 6)  # 0.2 s at 30 fps
    clock = {"start": None}
    track = ToneTrack(series, 30, lambda: clock["start"], loop=True)
    first = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.05)
    assert not first.done()  # no video yet: no sound either
    clock["start"] = t0 = time.monotonic() + 0.02
    frames = [await first] + [await track.recv() for _ in range(24)]  # 0.5 s: the clip 2.5 times
    elapsed = time.monotonic() - t0
    assert 0.46 < elapsed < 0.8, elapsed  # frame 24 was due at +0.48 s
    assert [f.pts for f in frames] == list(range(0, 25 * FRAME, FRAME))
    level = np.array([loudness(f) for f in frames])
    assert np.allclose(level[10:20], level[:10], atol=0.01)  # the same every 0.2 s (10 frames)
    assert level[0] < 0.05 and level[7] > 0.15
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


def test_loudness_of_decoded_frames():
    # aiortc's Opus decoder gives packed s16 stereo at 48 kHz: one row of interleaved L, R.
    t = np.arange(FRAME) / RATE
    left = 0.5 * np.sin(2 * np.pi * 300 * t)
    stereo = np.stack([left, left]).T.reshape(1, -1)
    frame = av.AudioFrame.from_ndarray((stereo * 32767).astype(np.int16), format="s16", layout="stereo")
    frame.sample_rate = RATE
    assert abs(loudness(frame) - 0.5 / np.sqrt(2)) < 1e-3
    planar = av.AudioFrame.from_ndarray(np.stack([left, 0 * left]).astype(np.float32), format="fltp",
                                        layout="stereo")
    assert abs(loudness(planar) - 0.5 / 2) < 1e-3  # one loud channel of two
    silent = av.AudioFrame.from_ndarray(np.zeros((1, 2 * FRAME), np.int16), format="s16", layout="stereo")
    assert loudness(silent) == 0.0
    frame.pts = 0
    times, values = audio_series([(100.0, frame)])
    assert times[0] == pytest.approx(100.01) and values[0] == pytest.approx(loudness(frame))  # the middle


# ---- on a real clip -------------------------------------------------------------------

def tone_of(mouth) -> list[av.AudioFrame]:
    start = time.monotonic() - 1000
    return asyncio.run(pull(ToneTrack(mouth, 30, lambda: start, loop=False)))


def through_opus(frames: list[av.AudioFrame]) -> list[av.AudioFrame]:
    """Encoded and decoded as aiortc does between the presenter and a viewer."""
    from aiortc.codecs.opus import OpusDecoder, OpusEncoder
    from aiortc.jitterbuffer import JitterFrame

    encoder, decoder, out = OpusEncoder(), OpusDecoder(), []
    for f in frames:
        payloads, timestamp = encoder.encode(f)
        for p in payloads:
            out += decoder.decode(JitterFrame(p, timestamp))
    return out


def arrived_on_time(frames: list[av.AudioFrame]):
    """(arrival, frame) as if each frame arrived when due: frame k at k * 20 ms."""
    return [(k * FRAME / RATE, f) for k, f in enumerate(frames)]


@pytest.fixture(scope="module")
def clip150():
    frames = read_frames(shared_clip("drive_expressive.mp4"), limit=150)
    return frames, mouth_series(frames)


def test_real_clip_mouth_moves_and_round_trip_reads_zero(clip150):
    frames, mouth = clip150
    assert len(mouth) == 150 and np.isfinite(mouth).all()
    assert np.nanmin(mouth) < 0.02 and np.nanmax(mouth) > 0.15, mouth  # closes and opens wide
    assert (np.diff(np.sign(mouth - np.nanmedian(mouth))) != 0).sum() >= 10, mouth  # many times
    video_t = np.arange(len(mouth)) / 30
    tone = tone_of(mouth)
    offset, confidence = estimate_offset(video_t, mouth, *audio_series(arrived_on_time(tone)))
    assert abs(offset) < 0.002 and confidence > 0.95, (offset, confidence)
    # Through Opus, the sound comes out ~6.5 ms later (the encoder's look-ahead): what a viewer gets.
    offset, confidence = estimate_offset(video_t, mouth, *audio_series(arrived_on_time(through_opus(tone))))
    assert -0.010 < offset < -0.003 and confidence > 0.95, (offset, confidence)


def test_mouth_meter_on_small_frames_agrees_and_finds_no_face(clip150):
    frames, mouth = clip150
    with MouthMeter(size=256) as meter:
        small = np.array([meter.measure(f) for f in frames[:60]])
        assert np.isnan(meter.measure(np.full((300, 400, 3), 127, np.uint8)))
    assert np.abs(small - mouth[:60]).max() < 0.03 and np.corrcoef(small, mouth[:60])[0, 1] > 0.98


@pytest.mark.slow
def test_whole_clip_online_meter_and_windows():
    """The live path on the whole clip: received av.VideoFrames measured on the meter's thread,
    the tone through Opus, per-window figures."""
    frames = read_frames(shared_clip("drive_expressive.mp4"), limit=300)  # 10 s
    mouth = mouth_series(frames)
    meter = MouthMeter()
    meter.measure(frames[0])  # mediapipe loads once, before the frames come
    for i, rgb in enumerate(frames):
        meter.submit(av.VideoFrame.from_ndarray(rgb, format="rgb24"), i / 30)
        time.sleep(0.02)  # as they come, faster than 30 fps
    meter.close()
    assert len(meter.results) + meter.skipped == len(frames) and meter.skipped < 0.05 * len(frames)
    vt, vv = zip(*meter.results)
    windows = windowed_offsets(vt, vv, *audio_series(arrived_on_time(through_opus(tone_of(mouth)))),
                               window=4, step=2)
    s = avsync_summary(windows)
    print(s)
    assert s["windows"] >= 3 and s["within_40ms"] and abs(s["offset_ms"]["p50"] + 6.5) < 3, s
