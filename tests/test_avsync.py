"""The A/V sync instrument: offsets recovered from signals with a known skew; the tone
follows the mouth; on a real clip, the mouth series moves and a round trip reads ~0."""
from __future__ import annotations

import time

import numpy as np
import pytest

from helpers import clip, read_seconds
from server.bench.avsync import (ToneTrack, estimate_offset, loudness, mouth_series, summary,
                                 windowed_offsets)


def smooth_mouth(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A talking-like mouth: smoothed noise at 1 kHz, as a function of time."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, seconds, 0.001)
    x = np.convolve(rng.standard_normal(len(t)), np.hanning(120), "same")
    return t, np.clip(x, 0, None)


def sampled(t, x, times) -> np.ndarray:
    return np.interp(times, t, x)


@pytest.mark.parametrize("skew", [0.060, -0.030, 0.0])
def test_known_offsets_are_recovered(skew):
    t, m = smooth_mouth(30)
    rng = np.random.default_rng(1)
    video_t = np.arange(0.5, 29, 1 / 30) + rng.uniform(0, 0.004, 855)  # arrival jitter
    audio_t = np.arange(0.5, 29, 0.02) + rng.uniform(0, 0.004, 1425)
    # The face shown at arrival time T is the mouth of T - skew; the sound is the mouth of T.
    video = sampled(t, m, video_t - skew)
    audio = sampled(t, m, audio_t)
    offset, confidence = estimate_offset(video_t, video, audio_t, audio)
    assert abs(offset - skew) < 0.005 and confidence > 0.8, (offset, confidence)
    windows = windowed_offsets(video_t, video, audio_t, audio)
    assert len(windows) >= 4 and all(abs(w[1] - skew) < 0.008 for w in windows)


def test_drift_and_flat_mouth():
    t, m = smooth_mouth(60, seed=2)
    video_t = np.arange(0.5, 59, 1 / 30)
    audio_t = np.arange(0.5, 59, 0.02)
    skew = 0.010 + 0.001 * video_t  # 1 ms later every second: 60 ms per minute
    result = summary(windowed_offsets(video_t, sampled(t, m, video_t - skew), audio_t, sampled(t, m, audio_t)))
    assert abs(result["drift_ms_per_min"] - 60) < 6, result
    flat = windowed_offsets(video_t, np.full(len(video_t), 0.3), audio_t, sampled(t, m, audio_t))
    assert flat == [] and summary(flat)["offset_ms"] is None  # no figure, not a fake 0


async def test_tone_follows_the_series_and_ends():
    series = np.array([0.0] * 15 + [1.0] * 15)  # one second at 30 fps: silent, then loud
    start = time.monotonic() - 5  # long past: no waiting
    track = ToneTrack(series, 30, lambda: start, loop=False)
    frames = []
    with pytest.raises(Exception):
        while True:
            frames.append(await track.recv())
    assert len(frames) == 50 and [f.pts for f in frames] == list(range(0, 48000, 960))
    levels = [loudness(f) for f in frames]
    assert max(levels[:20]) < 0.01 and min(levels[27:]) > 0.1, levels


@pytest.mark.slow
def test_real_clip_mouth_moves_and_round_trip_reads_zero():
    frames = read_seconds(clip("drive_expressive.mp4"), 6.0)
    mouth = mouth_series(frames)
    assert np.isfinite(mouth).mean() > 0.9 and np.nanmax(mouth) > 2 * np.nanmin(mouth) + 0.02, mouth
    start = time.monotonic() - 100

    async def tone_frames():
        track = ToneTrack(mouth, 30, lambda: start, loop=False)
        out = []
        try:
            while True:
                out.append(await track.recv())
        except Exception:
            return out

    import asyncio
    audio = asyncio.run(tone_frames())
    audio_t = np.array([f.pts / 48000 + 0.01 for f in audio])  # each frame's centre
    offset, confidence = estimate_offset(np.arange(len(mouth)) / 30, mouth, audio_t,
                                         [loudness(f) for f in audio])
    assert abs(offset) < 0.010 and confidence > 0.8, (offset, confidence)
