"""Audio/video sync as a viewer gets it: the instrument behind `avatar bench live --avsync`.

Method. The presenter sends the driving clip as its camera and, as its microphone, a tone
whose loudness follows the clip's own mouth opening (ToneTrack): sound and mouth are one
signal by construction, for any clip, even a silent one. The server turns the presenter's
mouth into the avatar's mouth and forwards the tone to the room. A viewer records each
avatar frame's mouth opening (landmarks, MouthMeter) and each audio frame's loudness, both
timed by arrival. Cross-correlating the two series (estimate_offset) gives how much later
the face moves than the sound.

Sign convention: offset = (when the viewer sees a mouth movement) - (when it hears the
matching sound). Positive = video later than audio (the usual case, and the more
forgivable one: ITU-R BT.1359 finds video late detectable beyond about +125 ms, video early
beyond about -45 ms). The product's target is |offset| <= 40 ms.

Timing. ToneTrack's sample s is due at start + s/48000, where start is the instant the
video's frame 0 was due (ClipTrack: frame i at start + i/fps), so at the presenter both
signals are aligned to the sample. At the viewer a video frame counts from its arrival (it
is shown then), an audio frame from its arrival plus half its length (its samples play from
arrival on, and its loudness is their mean: audio_series does this).

Figures. The offset is measured per window (10 s, every 5 s) so a run gives a distribution
(p50, p95), a drift (least-squares slope over the run) and a confidence (the correlation at
the peak); windows where the mouth hardly moves, or sound and face do not match, are left
out rather than counted as 0 (avsync_summary).

The bench viewer is aiortc with frames released on completion for video (server/media/jitter.py)
and audio (no prefetch), so its own buffers do not add a skew a browser would not have; what
is measured is what the server sends, plus loopback and the codecs (Opus holds ~6.5 ms).
"""
from __future__ import annotations

import asyncio
import fractions
import queue
import threading
import time
from collections.abc import Iterable
from typing import Callable

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from engines.landmarks import FaceLandmarker
from engines.measure import percentiles
from engines.render.mouth import lip_gap

RATE = 48000  # Hz, what aiortc's Opus runs at
FRAME = 960  # samples: 20 ms
GRID_HZ = 200  # the common time grid of the correlation (5 ms steps)
TONE_HZ = (300.0, 600.0, 900.0)  # harmonics Opus keeps; 20 ms hold whole periods, so a
#                                  frame's RMS does not depend on where the frame starts
TARGET_MS = 40.0
MAX_GAP = 0.25  # s: a series is not interpolated across a hole longer than this


# ---- the mouth ------------------------------------------------------------------------

def mouth_opening(points: np.ndarray) -> float:
    """Mean gap between the inner lips over the inter-ocular distance (mediapipe's 478 points
    in pixels, engines.landmarks): ~0 closed, ~0.3 wide open; scale-free. It is
    engines.mouth.lip_gap, the measure the warp engine paints the mouth by."""
    return lip_gap(points)


class MouthMeter:
    """Mouth opening of frames one after another, with mediapipe in tracking (video) mode.

    measure(rgb) is synchronous (~5-10 ms at 256 px): call it from one worker thread at a
    time. For a live run, submit(frame, arrival) hands av.VideoFrames to a thread of the
    meter's own that appends (arrival, opening) to `results`; it is bounded: frames that come
    while 8 wait are skipped (counted in `skipped`), never queued up. close() when done.
    Images are downscaled so their longer side is at most `size` px (None: as they come)."""

    def __init__(self, size: int | None = 256):
        self.size = size
        self.results: list[tuple[float, float]] = []  # (arrival time, mouth opening or NaN)
        self.skipped = 0
        self._landmarker: FaceLandmarker | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None

    def _scaled(self, width: int, height: int) -> tuple[int, int] | None:
        if self.size is None or max(width, height) <= self.size:
            return None
        scale = self.size / max(width, height)
        return max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2)

    def measure(self, rgb: np.ndarray) -> float:
        """Mouth opening (mouth_opening) of one RGB uint8 frame, NaN where there is no face."""
        if (wh := self._scaled(rgb.shape[1], rgb.shape[0])) is not None:
            rgb = cv2.resize(rgb, wh, interpolation=cv2.INTER_AREA)
        with self._lock:
            if self._landmarker is None:
                self._landmarker = FaceLandmarker(static=False)
            points = self._landmarker(rgb)
        return np.nan if points is None else mouth_opening(points)

    def submit(self, frame: av.VideoFrame | np.ndarray, arrival: float) -> None:
        """Measure a frame (received at `arrival`) on the meter's thread; never blocks."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="avsync-mouth", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((frame, arrival))
        except queue.Full:
            self.skipped += 1

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            frame, arrival = item
            if isinstance(frame, av.VideoFrame):  # let swscale downscale while converting
                wh = self._scaled(frame.width, frame.height) or (frame.width, frame.height)
                frame = frame.to_ndarray(width=wh[0], height=wh[1], format="rgb24")
            self.results.append((arrival, self.measure(frame)))

    def close(self) -> None:
        """Finish the queued frames, stop the thread, release mediapipe. Idempotent."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)
            if self._thread.is_alive():  # still busy: leave mediapipe to it
                return
            self._thread = None
        with self._lock:
            if self._landmarker is not None:
                self._landmarker.close()
                self._landmarker = None

    def __enter__(self) -> "MouthMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mouth_series(frames_rgb: Iterable[np.ndarray], size: int | None = None) -> np.ndarray:
    """Mouth opening of each RGB frame of a video (tracking mode), NaN where no face.
    `size`: downscale so the longer side is at most that many px first (None: full size)."""
    with MouthMeter(size) as meter:
        return np.array([meter.measure(f) for f in frames_rgb], dtype=np.float64)


# ---- the sound ------------------------------------------------------------------------

def envelope(series) -> np.ndarray:
    """A mouth series as a tone's amplitude: its range mapped to 0..1, NaN (no face) -> 0."""
    x = np.asarray(series, dtype=np.float64).ravel()
    out = np.zeros_like(x)
    finite = np.isfinite(x)
    if finite.any():
        lo, hi = x[finite].min(), x[finite].max()
        if hi > lo:
            out[finite] = (x[finite] - lo) / (hi - lo)
    return out


class TimedMicrophone(MediaStreamTrack):
    """A microphone kept in step with a clock: sample s is due at start() + s/48000.

    `start()`: time.monotonic() at which the video's frame 0 was due, None until the video
    starts (e.g. `lambda: clip_track.start`); the track waits for it. None instead of a
    callable: it starts with its first frame. 48 kHz mono s16, 20 ms frames of pcm(samples),
    pts in samples (time_base 1/48000), contiguous. With loop=True it goes on for ever;
    otherwise it ends after `period` seconds (MediaStreamError, as aiortc's tracks end).
    sent_at[pts] is the time.time() each frame was handed over."""

    kind = "audio"

    def __init__(self, period: float, start: Callable[[], float | None] | None = None, loop: bool = True):
        super().__init__()
        self.period, self.loop = period, loop
        self._own_start = None
        self.start = start if start is not None else (lambda: self._own_start)
        self.samples = 0
        self.sent_at: dict[int, float] = {}

    def pcm(self, samples: np.ndarray) -> np.ndarray:
        """The int16 samples at these indices."""
        raise NotImplementedError

    async def recv(self) -> av.AudioFrame:
        if self._own_start is None:
            self._own_start = time.monotonic()
        while self.readyState == "live" and self.start() is None:
            await asyncio.sleep(0.005)
        if self.readyState != "live":
            raise MediaStreamError
        if not self.loop and self.samples / RATE >= self.period:
            self.stop()
            raise MediaStreamError
        await asyncio.sleep(max(0.0, self.start() + self.samples / RATE - time.monotonic()))
        if self.readyState != "live":
            raise MediaStreamError
        pcm = self.pcm(self.samples + np.arange(FRAME))
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.samples, fractions.Fraction(1, RATE)
        self.sent_at[self.samples] = time.time()
        self.samples += FRAME
        return frame


class ToneTrack(TimedMicrophone):
    """A microphone whose loudness follows a mouth series, kept in step with the video.

    `series`: one value per video frame at `fps` (e.g. mouth_series of the clip sent as the
    camera); the amplitude is envelope(series), interpolated linearly between frames. Its
    period is the clip's, len(series)/fps."""

    def __init__(self, series, fps: float, start: Callable[[], float | None] | None, loop: bool = True,
                 level: float = 0.5):
        self.envelope = envelope(series)
        if not len(self.envelope):
            raise ValueError("ToneTrack needs a non-empty series")
        self.fps, self.level = float(fps), level
        super().__init__(len(self.envelope) / self.fps, start, loop)

    def amplitude(self, samples: np.ndarray) -> np.ndarray:
        """The envelope at sample indices (0..1)."""
        position = samples / RATE * self.fps
        index = np.arange(len(self.envelope))
        if self.loop:
            return np.interp(position, index, self.envelope, period=len(self.envelope))
        return np.interp(position, index, self.envelope)

    def pcm(self, samples: np.ndarray) -> np.ndarray:
        t = samples / RATE
        wave = sum(np.sin(2 * np.pi * f * t) for f in TONE_HZ) / len(TONE_HZ)
        return np.round(self.level * 32767 * self.amplitude(samples) * wave).astype(np.int16)


class SpeechTrack(TimedMicrophone):
    """A microphone saying `speech` (int16, 48 kHz mono) over and over, half a second apart:
    what `bench live --voice` presents with (eSpeak NG sentences, speech_samples())."""

    def __init__(self, speech: np.ndarray, start: Callable[[], float | None] | None = None, loop: bool = True):
        self.speech = np.concatenate([np.asarray(speech, np.int16), np.zeros(RATE // 2, np.int16)])
        super().__init__(len(self.speech) / RATE, start, loop)

    def pcm(self, samples: np.ndarray) -> np.ndarray:
        return np.take(self.speech, samples, mode="wrap")

    def loudness_series(self) -> tuple[np.ndarray, np.ndarray]:
        """(time.time() at the middle of each frame sent, its loudness): the voice as it left."""
        times = np.array([t + FRAME / (2 * RATE) for t in self.sent_at.values()], dtype=np.float64)
        values = [float(np.sqrt(np.mean((self.pcm(s + np.arange(FRAME)) / 32768.0) ** 2))) for s in self.sent_at]
        return times, np.array(values, dtype=np.float64)


def speech_samples(sentences: Iterable[str]) -> np.ndarray:
    """eSpeak NG saying each sentence, 48 kHz mono int16, a quarter second between them."""
    from engines.voice.audio import resample
    from engines.voice.espeak import synthesize

    parts = []
    for text in sentences:
        speech = synthesize(text)
        parts += [resample(speech.samples, speech.rate, RATE), np.zeros(RATE // 4)]
    return np.clip(np.concatenate(parts) * 32767, -32768, 32767).astype(np.int16)


def loudness(frame: av.AudioFrame) -> float:
    """RMS of a decoded audio frame, 0..1 full scale, any sample format and layout (aiortc
    decodes Opus to packed s16 stereo at 48 kHz: one row of interleaved samples)."""
    data = frame.to_ndarray()
    if data.dtype == np.uint8:
        x = (data.astype(np.float64) - 128) / 128
    elif np.issubdtype(data.dtype, np.integer):
        x = data.astype(np.float64) / (np.iinfo(data.dtype).max + 1.0)
    else:
        x = data.astype(np.float64)
    return float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0


def audio_series(received: Iterable[tuple[float, av.AudioFrame]]) -> tuple[np.ndarray, np.ndarray]:
    """(times, loudness) of received audio frames given as (arrival time, frame): each timed
    at arrival + half its length, when the middle of what it measures plays."""
    times, values = [], []
    for arrival, frame in received:
        times.append(arrival + frame.samples / (2 * (frame.sample_rate or RATE)))
        values.append(loudness(frame))
    return np.array(times, dtype=np.float64), np.array(values, dtype=np.float64)


# ---- the offset -----------------------------------------------------------------------

def _finite(t, v) -> tuple[np.ndarray, np.ndarray]:
    t, v = np.asarray(t, dtype=np.float64).ravel(), np.asarray(v, dtype=np.float64).ravel()
    if t.shape != v.shape:
        raise ValueError(f"times and values differ in length: {t.size} and {v.size}")
    keep = np.isfinite(t) & np.isfinite(v)
    order = np.argsort(t[keep], kind="stable")
    return t[keep][order], v[keep][order]


def _on_grid(t: np.ndarray, v: np.ndarray, grid: np.ndarray, max_gap: float) -> np.ndarray:
    """Linear interpolation onto the grid; NaN outside the samples and across holes."""
    if len(t) < 2:
        return np.full(len(grid), np.nan)
    y = np.interp(grid, t, v)
    right = np.clip(np.searchsorted(t, grid, side="right"), 1, len(t) - 1)
    hole = (t[right] - t[right - 1]) > max_gap
    y[hole | (grid < t[0]) | (grid > t[-1])] = np.nan
    return y


def _pearson(x: np.ndarray, y: np.ndarray, min_n: int) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < min_n:
        return np.nan
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    d = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / d) if d > 0 else np.nan


def estimate_offset(video_times, video_values, audio_times, audio_values, max_lag: float = 0.5,
                    max_gap: float = MAX_GAP) -> tuple[float, float]:
    """(offset s, confidence) of video against audio; positive = video later than audio.

    Both series (NaNs dropped) are interpolated linearly onto a 200 Hz grid over their
    overlap, not across holes longer than max_gap. For each lag k in +-max_lag, the Pearson
    correlation of video(t + k) with audio(t) over the same central stretch of audio; the
    best lag is refined to a fraction of a grid step by a parabola through its neighbours.
    Confidence is the correlation at the peak (-1..1). (nan, 0.0) when there is too little
    overlap (less than 4 * max_lag) or no variation; a peak at +-max_lag means "that far or
    further"."""
    vt, vv = _finite(video_times, video_values)
    at, av_ = _finite(audio_times, audio_values)
    lags = int(round(max_lag * GRID_HZ))
    if len(vt) < 2 or len(at) < 2:
        return float("nan"), 0.0
    lo, hi = max(vt[0], at[0]), min(vt[-1], at[-1])
    grid = lo + np.arange(int(np.floor((hi - lo) * GRID_HZ)) + 1) / GRID_HZ if hi > lo else np.array([])
    n = len(grid)
    if n < 4 * lags or n < 8:
        return float("nan"), 0.0
    v = _on_grid(vt, vv, grid, max_gap)
    a = _on_grid(at, av_, grid, max_gap)[lags:n - lags]
    min_n = max(8, (n - 2 * lags) // 2)  # half the stretch at least must be there
    # The face at t + k goes with the sound at t: a peak at k > 0 means the video is late.
    corr = np.array([_pearson(v[lags + k:n - lags + k], a, min_n) for k in range(-lags, lags + 1)])
    if not np.isfinite(corr).any():
        return float("nan"), 0.0
    i = int(np.nanargmax(corr))
    shift = 0.0
    if 0 < i < len(corr) - 1 and np.isfinite(corr[i - 1]) and np.isfinite(corr[i + 1]):
        y0, y1, y2 = corr[i - 1], corr[i], corr[i + 1]
        denominator = y0 - 2 * y1 + y2
        if denominator < 0:
            shift = float(np.clip(0.5 * (y0 - y2) / denominator, -0.5, 0.5))
    return (i - lags + shift) / GRID_HZ, float(corr[i])


def windowed_offsets(video_times, video_values, audio_times, audio_values, window: float = 10.0,
                     step: float = 5.0, max_lag: float = 0.5, min_confidence: float = 0.5,
                     min_spread: float = 0.01, rel_spread: float = 0.2) -> list[tuple[float, float, float]]:
    """[(window centre time, offset s, confidence)] over windows of `window` s every `step` s
    of the two series' overlap (estimate_offset on each). Left out, not counted as 0: windows
    with fewer than 2 samples a second on either side, where the mouth hardly moves (standard
    deviation under min_spread, in mouth_opening units, or under rel_spread of the whole
    run's), and where the correlation is under min_confidence."""
    vt, vv = _finite(video_times, video_values)
    at, av_ = _finite(audio_times, audio_values)
    if len(vt) < 2 or len(at) < 2:
        return []
    spread = max(min_spread, rel_spread * float(np.std(vv)))
    start, end = max(vt[0], at[0]), min(vt[-1], at[-1])
    out = []
    k = 0
    while (t := start + k * step) + window <= end + 1e-9:
        k += 1
        vm = (vt >= t) & (vt <= t + window)
        am = (at >= t) & (at <= t + window)
        if vm.sum() < 2 * window or am.sum() < 2 * window or np.std(vv[vm]) < spread:
            continue
        offset, confidence = estimate_offset(vt[vm], vv[vm], at[am], av_[am], max_lag)
        if np.isfinite(offset) and confidence >= min_confidence:
            out.append((t + window / 2, offset, confidence))
    return out


def avsync_summary(windows: list[tuple[float, float, float]], target_ms: float = TARGET_MS) -> dict:
    """The figure of a run from windowed_offsets: `windows` (count), `offset_ms` {p50, p95, n,
    min, max} (+ = video late), `abs_p95_ms`, `drift_ms_per_min` (least-squares slope of the
    offset over time; None under 3 windows), `confidence_p50`, `within_40ms` (every window
    within +-40 ms) and, for the report, `within_target` (+-target_ms), `target_ms` and
    `series` ([s since the first window, ms] per window). Without windows the figures are None:
    no figure, never a fake 0."""
    if not windows:
        return {"windows": 0, "offset_ms": None, "abs_p95_ms": None, "drift_ms_per_min": None,
                "confidence_p50": None, "within_40ms": None, "within_target": None,
                "target_ms": target_ms, "series": []}
    t = np.array([w[0] for w in windows], dtype=np.float64)
    ms = np.array([w[1] for w in windows], dtype=np.float64) * 1e3
    drift = None
    if len(t) >= 3 and np.ptp(t) > 0:
        drift = round(float(np.polyfit(t - t[0], ms, 1)[0] * 60), 2)
    return {"windows": len(windows),
            "offset_ms": {**percentiles(ms, (50, 95), 1), "min": round(float(ms.min()), 1),
                          "max": round(float(ms.max()), 1)},
            "abs_p95_ms": percentiles(np.abs(ms), (95,), 1)["p95"],
            "drift_ms_per_min": drift,
            "confidence_p50": percentiles([w[2] for w in windows], (50,), 2)["p50"],
            "within_40ms": bool(np.all(np.abs(ms) <= 40.0)),
            "within_target": bool(np.all(np.abs(ms) <= target_ms)), "target_ms": target_ms,
            "series": [[round(float(a), 1), round(float(b), 1)] for a, b in zip(t - t[0], ms)]}


summary = avsync_summary  # the name server/bench/runner.py imports
