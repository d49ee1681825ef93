"""What the voice wing passes around: timed phones, and speech (samples with its phones)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class SpeechError(ValueError):
    """Speech cannot be made or read from this input; the message says why."""


@dataclass(frozen=True)
class Phone:
    start: float  # seconds from the start of the audio
    end: float
    symbol: str  # IPA (eSpeak NG) or ARPAbet (pocketsphinx); "" for a pause


@dataclass
class Speech:
    samples: np.ndarray  # float32 mono in [-1, 1]
    rate: int  # samples per second
    phones: list[Phone] = field(default_factory=list)
    # For recognized speech: how open its sound is at given times (envelope.sound_openness).
    # Synthesized speech has none: its phones' timings are the synthesizer's own.
    openness: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate


def phones_from_starts(starts: list[tuple[float, str]], duration: float) -> list[Phone]:
    """Phones from (start_s, symbol) events, each lasting until the next starts (the last until `duration`)."""
    ends = [s for s, _ in starts[1:]] + [duration]
    return [Phone(s, max(e, s), sym) for (s, sym), e in zip(starts, ends)]
