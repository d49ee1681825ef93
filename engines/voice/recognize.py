"""Speech audio to timed phones by recognition: pocketsphinx's phone decoder (allphone search
with the en-us acoustic model and phone language model its wheel ships): about 43 ms of one
core per second of audio here, 23 times faster than real time. English phones (ARPAbet);
another language's speech still gets the nearest English mouth shapes."""
from __future__ import annotations

import os

import numpy as np

from .audio import resample
from .envelope import sound_openness
from .speech import Phone, Speech, SpeechError

RATE = 16000  # the acoustic model's
FRAME = 0.01  # seconds per decoder frame
CHUNK_SECONDS = 30.0  # decoded one utterance at a time, cut where it is quietest
CUT_SEARCH = 5.0  # seconds before a chunk's end searched for the quietest place


def _decoder():
    try:
        from pocketsphinx import Decoder, get_model_path
    except ImportError:
        raise SpeechError("speech recognition needs pocketsphinx: pip install pocketsphinx==5.1.1")
    model = get_model_path()
    return Decoder(hmm=os.path.join(model, "en-us", "en-us"),
                   allphone=os.path.join(model, "en-us", "en-us-phone.lm.bin"),
                   lw=2.0, pip=0.1, beam=1e-20, pbeam=1e-10, loglevel="FATAL")


def recognize_speech(speech: Speech) -> Speech:
    """`speech` with the phones heard in it and its sound's openness (envelope.py), which on a
    real voice says how far the mouth opens better than the phones do. Both listen at RATE:
    the samples are resampled once for the two."""
    heard = Speech(resample(speech.samples, speech.rate, RATE), RATE)
    speech.phones = recognize_phones(heard)
    speech.openness = sound_openness(heard.samples, RATE)
    return speech


def recognize_phones(speech: Speech) -> list[Phone]:
    """The phones heard in `speech` (any rate, mono float), with their start and end times."""
    pcm = np.clip(resample(speech.samples, speech.rate, RATE) * 32767, -32768, 32767).astype(np.int16)
    decoder = _decoder()
    phones: list[Phone] = []
    for start, end in _chunks(pcm):
        decoder.start_utt()
        decoder.process_raw(pcm[start:end].tobytes(), no_search=False, full_utt=True)
        decoder.end_utt()
        offset = start / RATE
        phones += [Phone(offset + s.start_frame * FRAME, offset + (s.end_frame + 1) * FRAME, s.word)
                   for s in decoder.seg()]
    return phones


def _chunks(pcm: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) sample ranges of at most CHUNK_SECONDS, each ending at the quietest 10 ms
    of its last CUT_SEARCH seconds, so no phone is cut in two."""
    size, search, step = int(CHUNK_SECONDS * RATE), int(CUT_SEARCH * RATE), int(FRAME * RATE)
    out, start = [], 0
    while len(pcm) - start > size:
        window = pcm[start + size - search:start + size].astype(np.float64)
        energy = (window[:len(window) // step * step].reshape(-1, step) ** 2).sum(1)
        cut = start + size - search + int(np.argmin(energy)) * step
        out.append((start, cut))
        start = cut
    out.append((start, len(pcm)))
    return out
