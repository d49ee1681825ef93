"""Reading speech from a file (any format FFmpeg reads, the audio of a video too), with errors
that say what is wrong; resampling; loudness."""
from __future__ import annotations

import os
from math import gcd
from pathlib import Path

import av
import numpy as np

from .speech import Speech, SpeechError

MAX_AUDIO_SECONDS = 600.0
RATE = 48000  # what load_audio returns: the AAC rate an output video carries


def load_audio(path: str | os.PathLike, rate: int = RATE, max_seconds: float = MAX_AUDIO_SECONDS) -> Speech:
    """The first audio stream of `path`, mixed to mono and resampled to `rate` (no phones yet),
    or SpeechError: no such file, not a media file, no audio in it, corrupt, empty, too long."""
    p = Path(path)
    if not p.is_file():
        raise SpeechError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise SpeechError(f"{p}: not a readable audio file ({e})")
    with container:
        if not container.streams.audio:
            raise SpeechError(f"{p}: has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks, count = [], 0
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    count += len(chunks[-1])
                if count > max_seconds * rate:
                    raise SpeechError(f"{p}: the audio is longer than {max_seconds:g} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            raise SpeechError(f"{p}: the audio is corrupt ({e})")
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if len(samples) < rate // 10:
        raise SpeechError(f"{p}: has no audio to speak (under 0.1 s)")
    return Speech(np.clip(samples, -1.0, 1.0), rate)


def resample(samples: np.ndarray, rate: int, to_rate: int) -> np.ndarray:
    if rate == to_rate:
        return samples.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # half a second to import: not for every `avatar` command

    g = gcd(rate, to_rate)
    return resample_poly(samples, to_rate // g, rate // g).astype(np.float32)


def loudness(samples: np.ndarray, rate: int, times: np.ndarray, window: float) -> np.ndarray:
    """RMS amplitude in `window` seconds centred on each of `times`."""
    power = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    half = window / 2
    a = np.clip(np.round((times - half) * rate).astype(int), 0, len(samples))
    b = np.clip(np.round((times + half) * rate).astype(int), 0, len(samples))
    return np.sqrt((power[b] - power[a]) / np.maximum(b - a, 1))
