"""Audio/video sync as a viewer gets it: `avatar bench live --avsync`.

Method. The presenter sends the driving clip as its camera and, as its microphone, a tone
whose loudness follows the clip's own mouth opening (ToneTrack): sound and mouth are one
signal by construction, for any clip, even a silent one. The server turns the mouth into
the avatar's mouth and forwards the tone to the room. A viewer records each avatar frame's
mouth opening (landmarks, MouthMeter) and each audio frame's loudness, both timed by
arrival. Cross-correlating the two series gives how much later the face moves than the
sound: the offset, positive when the video is late (ITU-R BT.1359: detectable beyond about
+125 ms video late / -45 ms video early; the product's target is within +-40 ms).

It is measured per window (10 s, every 5 s), so a run gives a distribution (p50, p95) and a
drift (least-squares slope over the run). The bench viewer is aiortc with frames released on
completion for video (server/jitter.py) and audio (prefetch 0), so its own buffers do not add
a skew a browser would not have; what is measured is what the server sends, plus loopback.
"""
from __future__ import annotations

import asyncio
import fractions
import queue
import threading
import time
from typing import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from engines.landmarks import FaceLandmarker, mouth_openness
from engines.measure import percentiles

RATE = 48000
FRAME = 960  # 20 ms
GRID_HZ = 200  # the common time grid of the correlation (5 ms)
TONE_HZ = (220.0, 440.0, 660.0)  # a few harmonics: Opus keeps them at any bitrate


def mouth_series(frames: list[np.ndarray]) -> np.ndarray:
    """Mouth opening per RGB frame (tracking mode, as a video), NaN where no face."""
    with FaceLandmarker() as lm:
        return np.array([np.nan if (p := lm(f)) is None else mouth_openness(p) for f in frames])


class ToneTrack(MediaStreamTrack):
    """A microphone whose loudness follows `series` (one value per video frame at `fps`),
    kept in step with the video track: sample s is due at start() + s / 48000, where start()
    is the monotonic time the video's frame 0 was due (None until the video starts)."""

    kind = "audio"

    def __init__(self, series: np.ndarray, fps: float, start: Callable[[], float | None], loop: bool = True):
        super().__init__()
        x = np.nan_to_num(np.asarray(series, dtype=np.float64), nan=np.nanmin(series) if np.isfinite(series).any() else 0)
        lo, hi = float(x.min()), float(x.max())
        self.envelope = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
        self.fps, self.start, self.loop = fps, start, loop
        self.samples = 0

    async def recv(self) -> av.AudioFrame:
        while self.readyState == "live" and self.start() is None:
            await asyncio.sleep(0.005)
        if self.readyState != "live":
            raise MediaStreamError
        period = len(self.envelope) / self.fps
        t = (self.samples + np.arange(FRAME)) / RATE
        if not self.loop and t[0] >= period:
            self.stop()
            raise MediaStreamError
        await asyncio.sleep(max(0.0, self.start() + self.samples / RATE - time.monotonic()))
        position = (t % period) * self.fps
        amplitude = np.interp(position, np.arange(len(self.envelope)), self.envelope)
        wave = sum(np.sin(2 * np.pi * f * t) for f in TONE_HZ) / len(TONE_HZ)
        pcm = (0.5 * 32767 * amplitude * wave).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.samples, fractions.Fraction(1, RATE)
        self.samples += FRAME
        return frame


def loudness(frame: av.AudioFrame) -> float:
    """RMS of a decoded audio frame, 0..1 (aiortc decodes Opus to packed s16 stereo)."""
    data = frame.to_ndarray()
    scale = 32768.0 if data.dtype == np.int16 else 1.0
    return float(np.sqrt(np.mean((data.astype(np.float64) / scale) ** 2)))


class MouthMeter:
    """Measures received avatar frames' mouth opening on a thread of its own, as they come.
    Bounded: when it falls behind, frames are skipped (and counted), never queued up."""

    def __init__(self, width: int = 256):
        self.width = width
        self.results: list[tuple[float, float]] = []  # (arrival time, mouth opening or NaN)
        self.skipped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._work, name="avsync-mouth", daemon=True)
        self._thread.start()

    def submit(self, frame: av.VideoFrame, arrival: float) -> None:
        try:
            self._queue.put_nowait((frame, arrival))
        except queue.Full:
            self.skipped += 1

    def _work(self) -> None:
        with FaceLandmarker() as lm:
            while (item := self._queue.get()) is not None:
                frame, arrival = item
                scale = min(1.0, self.width / frame.width)
                rgb = frame.to_ndarray(width=round(frame.width * scale) // 2 * 2,
                                       height=round(frame.height * scale) // 2 * 2, format="rgb24")
                points = lm(rgb)
                self.results.append((arrival, np.nan if points is None else mouth_openness(points)))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)


def estimate_offset(video_t, video_v, audio_t, audio_v, max_lag: float = 0.5) -> tuple[float, float]:
    """(offset s, correlation at the peak) of video against audio: positive = video later.
    Both series are resampled onto a common 200 Hz grid over their overlap."""
    vt, vv = _finite(video_t, video_v)
    at, av_ = _finite(audio_t, audio_v)
    lo, hi = max(vt[0], at[0]), min(vt[-1], at[-1])
    grid = np.arange(lo, hi, 1 / GRID_HZ)
    lags = int(max_lag * GRID_HZ)
    if len(grid) < 4 * lags:
        return float("nan"), 0.0
    v = _z(np.interp(grid, vt, vv))
    a = _z(np.interp(grid, at, av_))
    # corr(v(t + k), a(t)) for k in -lags..lags: the face at t + k goes with the sound at t.
    n = len(grid)
    corr = np.array([np.dot(v[max(0, k):n + min(0, k)], a[max(0, -k):n - max(0, k)]) / (n - abs(k))
                     for k in range(-lags, lags + 1)])
    i = int(np.argmax(corr))
    shift = 0.0
    if 0 < i < len(corr) - 1:  # parabolic refinement between grid steps
        y0, y1, y2 = corr[i - 1], corr[i], corr[i + 1]
        denominator = y0 - 2 * y1 + y2
        shift = 0.5 * (y0 - y2) / denominator if denominator else 0.0
    return (i - lags + shift) / GRID_HZ, float(corr[i])


def windowed_offsets(video_t, video_v, audio_t, audio_v, window: float = 10.0, step: float = 5.0,
                     min_confidence: float = 0.3) -> list[tuple[float, float, float]]:
    """(window centre, offset s, confidence) per window; windows where the mouth hardly moves
    or the correlation is weak are left out (not counted as 0)."""
    vt, vv = _finite(video_t, video_v)
    at, av_ = _finite(audio_t, audio_v)
    if len(vt) < 2 or len(at) < 2:
        return []
    out = []
    start, end = max(vt[0], at[0]), min(vt[-1], at[-1])
    spread = np.nanstd(vv) if len(vv) else 0.0
    t = start
    while t + window <= end + 1e-9:
        vm, am = (vt >= t) & (vt < t + window), (at >= t) & (at < t + window)
        if vm.sum() > 10 and am.sum() > 10 and np.std(vv[vm]) > 0.2 * spread > 0:
            offset, confidence = estimate_offset(vt[vm], vv[vm], at[am], av_[am])
            if np.isfinite(offset) and confidence >= min_confidence:
                out.append((t + window / 2, offset, confidence))
        t += step
    return out


def summary(windows: list[tuple[float, float, float]], target_ms: float = 40.0) -> dict:
    """The figure: offset p50/p95 (ms, positive = video late), |offset| p95, drift, confidence."""
    if not windows:
        return {"windows": 0, "offset_ms": None, "abs_p95_ms": None, "drift_ms_per_min": None,
                "confidence_p50": None, "within_target": None, "target_ms": target_ms}
    t = np.array([w[0] for w in windows])
    ms = np.array([w[1] for w in windows]) * 1e3
    drift = float(np.polyfit(t - t[0], ms, 1)[0] * 60) if len(t) > 2 and t[-1] > t[0] else None
    return {"windows": len(windows),
            "offset_ms": {**percentiles(ms, (50, 95), 1), "min": round(float(ms.min()), 1),
                          "max": round(float(ms.max()), 1)},
            "abs_p95_ms": percentiles(np.abs(ms), (95,), 1)["p95"],
            "drift_ms_per_min": None if drift is None else round(drift, 2),
            "confidence_p50": percentiles([w[2] for w in windows], (50,), 2)["p50"],
            "within_target": bool(np.all(np.abs(ms) <= target_ms)), "target_ms": target_ms,
            "series": [[round(float(a), 1), round(float(b), 1)] for a, b in zip(t - t[0], ms)]}


def _finite(t, v) -> tuple[np.ndarray, np.ndarray]:
    t, v = np.asarray(t, dtype=np.float64), np.asarray(v, dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(v)
    order = np.argsort(t[keep], kind="stable")
    return t[keep][order], v[keep][order]


def _z(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / s if s > 0 else np.zeros_like(x)
