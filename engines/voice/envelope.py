"""How open the mouth is, heard in the sound itself: the speech envelope in the 1-3 kHz band.

Recognized phones say which sound is made, but on a real voice they are often wrong (music
under the speech, a singer, an accent): on selfscan_a, speech over music, the phones alone
drive a mouth whose gap follows the person's own at r 0.24. The level of the sound between 1
and 3 kHz, where the second and third formants lie, follows the opening of the mouth in
natural speech (Chandrasekaran et al. 2009, "The natural statistics of audiovisual speech",
PLoS Comput Biol 5(7)); music and hum sit mostly below it. On selfscan_a that band's level
alone follows the mouth at r 0.45, against 0.21 for the whole band's (the loudness).

The level, in dB per 10 ms (at least QUIET), is placed between a floor and a peak of the last LEVEL_WINDOW
seconds (their 10th and 95th percentiles: the speaker's own range, whatever the gain), and
counts only as far as it rises above the lowest level of the last VALLEY seconds: speech dips
between its syllables, and a level held without dips (a tone, music, a hum) is not a mouth
opening. It is then smoothed over about 40 ms, as a mouth cannot move faster.
coarticulation.mouth_track blends it into every sound but the closures: the phones say when
the lips meet and what shape they take, the sound says how far they part.

Recognized speech only: synthesized speech (`say`) comes with its phones' true timings.
"""
from __future__ import annotations

import threading

import numpy as np

from .audio import resample

RATE = 16000
HOP = 160  # samples: a level every 10 ms
WINDOW = 512  # samples per spectrum (32 ms)
BAND = (1000.0, 3000.0)  # Hz: the published band (below), not one fitted to a clip here
SMOOTH = 0.04  # seconds: the Gaussian's sigma
REACH = 0.05  # seconds each side the smoothing reads (a live caller needs this much sound ahead)
LEVEL_WINDOW = 10.0  # seconds of past levels that set the floor and the peak
RANGE_UPDATE = 25  # hops between updates of the floor and the peak
MIN_RANGE, MAX_RANGE = 10.0, 40.0  # dB between floor and peak: noise is never a full open
VALLEY = 0.5  # seconds back in which speech dips between syllables
CONTRAST = 20.0  # dB above that dip for a full open
QUIET = -60.0  # dB of full scale in the band: below it nobody speaks (a microphone's hiss)
HISTORY = 2 * LEVEL_WINDOW  # seconds of levels a live caller keeps

_WEIGHTS = np.exp(-0.5 * (np.arange(-round(REACH * 100), round(REACH * 100) + 1) / (SMOOTH * 100)) ** 2)
_HANN = np.hanning(WINDOW)
_IN_BAND = (np.fft.rfftfreq(WINDOW, 1 / RATE) >= BAND[0]) & (np.fft.rfftfreq(WINDOW, 1 / RATE) < BAND[1])


def _band_power(frames: np.ndarray) -> np.ndarray:
    return (np.abs(np.fft.rfft(frames * _HANN, axis=1)) ** 2)[:, _IN_BAND].sum(1)


_FULL_SCALE = float(_band_power(np.sin(2 * np.pi * 2000 * np.arange(WINDOW) / RATE)[None])[0])  # 0 dB


class SoundOpenness:
    """feed(pcm, at) with 16 kHz speech as it arrives; called with times (seconds) -> openness
    in [0, 1] there (NaN where no sound was fed: not heard, which is not silence). Fed on one
    thread and read on another: a lock guards the levels."""

    def __init__(self, history: float | None = HISTORY):
        self._keep = None if history is None else max(round(history * 100), round(LEVEL_WINDOW * 100))
        self._lock = threading.Lock()
        self._tail = np.zeros(0, np.float32)  # samples not yet in a full window
        self._next = None  # time of the next window's centre
        self._times = np.zeros(0)  # one per hop: its centre, seconds
        self._levels = np.zeros(0)  # dB
        self._open = np.zeros(0)  # the level between its floor and peak, 0..1
        self._floor = self._peak = None
        self._since_range = RANGE_UPDATE

    def feed(self, pcm: np.ndarray, at: float) -> None:
        """Samples (int16 or float in [-1, 1], mono, 16 kHz) that play from `at` on. A gap in
        time since the last feed starts afresh: nothing is heard in it (NaN); a step back in
        time forgets what was heard after it."""
        samples = pcm.astype(np.float32) / 32768 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        with self._lock:
            expected = None if self._next is None else self._next - (WINDOW / 2 - len(self._tail)) / RATE
            if expected is None or abs(at - expected) > 0.02:
                self._tail, self._next = np.zeros(0, np.float32), at + WINDOW / 2 / RATE
                later = self._times >= at
                self._times, self._open = self._times[~later], self._open[~later]
            self._tail = np.concatenate([self._tail, samples])
            count = 0 if len(self._tail) < WINDOW else 1 + (len(self._tail) - WINDOW) // HOP
            if count:
                frames = np.lib.stride_tricks.sliding_window_view(self._tail, WINDOW)[::HOP][:count]
                levels = np.maximum(10 * np.log10(_band_power(frames) / _FULL_SCALE + 1e-12), QUIET)
                self._append(self._next + np.arange(count) * HOP / RATE, levels)
                self._next += count * HOP / RATE
                self._tail = self._tail[count * HOP:]

    def _append(self, times: np.ndarray, levels: np.ndarray) -> None:
        """Each level placed in the range of the levels up to it, as a live caller has it."""
        everything, first = np.concatenate([self._levels, levels]), len(self._levels)
        opened, i = np.empty(len(levels)), 0
        while i < len(levels):
            if self._since_range >= RANGE_UPDATE or self._floor is None:
                upto = first + i + 1
                low, self._peak = np.percentile(everything[max(0, upto - round(LEVEL_WINDOW * 100)):upto], [10, 95])
                self._floor, self._since_range = max(low, self._peak - MAX_RANGE), 0
            n = min(RANGE_UPDATE - self._since_range, len(levels) - i)
            span = max(self._peak - self._floor, MIN_RANGE)
            opened[i:i + n] = np.clip((levels[i:i + n] - self._floor) / span, 0.0, 1.0)
            self._since_range, i = self._since_range + n, i + n
        opened = np.minimum(opened, np.clip((levels - _valleys(everything, first)) / CONTRAST, 0.0, 1.0))
        keep = -self._keep if self._keep else 0
        self._times = np.concatenate([self._times, times])[keep:]
        self._levels, self._open = everything[keep:], np.concatenate([self._open, opened])[keep:]

    def __call__(self, times: np.ndarray) -> np.ndarray:
        """Openness at `times`: the hops within REACH, Gaussian-weighted; NaN with none near."""
        times = np.atleast_1d(np.asarray(times, np.float64))
        with self._lock:
            hop_times, opened = self._times, self._open
        if not len(hop_times):
            return np.full(len(times), np.nan)
        k = np.searchsorted(hop_times, times)
        half = len(_WEIGHTS) // 2
        index = k[:, None] + np.arange(-half, half + 1)[None, :]
        valid = (index >= 0) & (index < len(hop_times))
        index = np.clip(index, 0, len(hop_times) - 1)
        near = valid & (np.abs(hop_times[index] - times[:, None]) <= REACH + 0.005)
        weights = np.where(near, _WEIGHTS[None, :], 0.0)
        total = weights.sum(1)
        values = (weights * opened[index]).sum(1) / np.maximum(total, 1e-9)
        return np.where(total > 0.5, values, np.nan)


def _valleys(levels: np.ndarray, first: int) -> np.ndarray:
    """The lowest level in the VALLEY seconds up to each of levels[first:]."""
    width = round(VALLEY * 100) + 1
    start = max(0, first - width + 1)
    padded = np.concatenate([np.full(width - 1 - (first - start), levels[start]), levels[start:]])
    return np.lib.stride_tricks.sliding_window_view(padded, width).min(1)


def sound_openness(samples: np.ndarray, rate: int) -> SoundOpenness:
    """The openness of a whole recording (float mono at `rate`), as it would be heard live."""
    openness = SoundOpenness(history=None)
    openness.feed(resample(samples, rate, RATE), 0.0)
    return openness
