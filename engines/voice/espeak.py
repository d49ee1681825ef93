"""Text to speech with eSpeak NG (Debian's libespeak-ng1), through ctypes.

The phoneme timings come from the synthesizer itself, not from recognizing its output:
initialized with espeakINITIALIZE_PHONEME_EVENTS (and _IPA, so phonemes are IPA whatever the
voice), libespeak-ng reports an event per phoneme with its position in the audio, beside
the samples it hands the synthesis callback. The library is one global synthesizer per
process: calls are serialized by a lock.
"""
from __future__ import annotations

import ctypes
import re
import threading

import numpy as np

from .speech import Speech, SpeechError, phones_from_starts

LIBRARY = "libespeak-ng.so.1"
MAX_TEXT_CHARS = 2000
DEFAULT_VOICE = "en-us"
VOICE_NAME = re.compile(r"[A-Za-z0-9_+-]{1,40}")  # e.g. en-us, fr, en-gb+f3: never a path

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS, INITIALIZE_PHONEME_IPA, INITIALIZE_DONT_EXIT = 0x0001, 0x0002, 0x8000
EVENT_LIST_TERMINATED, EVENT_PHONEME = 0, 7
POS_CHARACTER, CHARS_UTF8 = 1, 1
EE_OK = 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Synthesizer:
    """The process's one eSpeak NG, collecting samples and phoneme events of one call at a time."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL(LIBRARY)
        except OSError as e:
            raise SpeechError(f"eSpeak NG is not installed ({e}): apt-get install espeak-ng libespeak-ng1")
        self.rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None,
                                               INITIALIZE_PHONEME_EVENTS | INITIALIZE_PHONEME_IPA
                                               | INITIALIZE_DONT_EXIT)
        if self.rate <= 0:
            raise SpeechError("eSpeak NG failed to start (is espeak-ng-data installed?)")
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it later
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[float, str]] = []

    def _collect(self, wav, count, events) -> int:
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_PHONEME:
                symbol = events[i].id.string.decode("utf-8", errors="replace")
                self._events.append((events[i].audio_position / 1000.0, symbol))
            i += 1
        return 0  # go on

    def speak(self, text: str, voice: str) -> tuple[np.ndarray, list[tuple[float, str]]]:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise SpeechError(f"eSpeak NG has no voice {voice!r} (`espeak-ng --voices` lists them)")
        self._chunks, self._events = [], []
        data = text.encode("utf-8", errors="replace") + b"\0"
        status = self.lib.espeak_Synth(data, ctypes.c_size_t(len(data)), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if status != EE_OK:
            raise SpeechError(f"eSpeak NG could not synthesize the text (error {status})")
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples, self._events


_synth: _Synthesizer | None = None
_lock = threading.Lock()


def check_text(text: object) -> str:
    """The text to speak, or SpeechError: not empty, at most MAX_TEXT_CHARS characters. Control
    characters become spaces (a NUL would end the text early)."""
    if not isinstance(text, str) or not text.strip():
        raise SpeechError("the text to say is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise SpeechError(f"the text is {len(text)} characters long; at most {MAX_TEXT_CHARS} can be said at once")
    return re.sub(r"[\x00-\x1f\x7f]", " ", text).strip()


def synthesize(text: str, voice: str = DEFAULT_VOICE) -> Speech:
    """`text` spoken by eSpeak NG's `voice`: samples (its rate, 22050 Hz; mono) and the phonemes
    it reported, IPA with their start times ("" for a pause), each lasting until the next."""
    global _synth
    text = check_text(text)
    if not isinstance(voice, str) or not VOICE_NAME.fullmatch(voice):
        raise SpeechError(f"not an eSpeak NG voice name: {voice!r} (e.g. en-us, en-gb, fr, de)")
    with _lock:
        if _synth is None:
            _synth = _Synthesizer()
        pcm, starts = _synth.speak(text, voice)
        rate = _synth.rate
    if not any(symbol for _, symbol in starts):
        raise SpeechError("the text has nothing eSpeak NG can say (no words in it)")
    samples = pcm.astype(np.float32) / 32768.0
    duration = len(samples) / rate
    starts = [(min(max(t, 0.0), duration), s) for t, s in starts]
    return Speech(samples, rate, phones_from_starts(starts, duration))
