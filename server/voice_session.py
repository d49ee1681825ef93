"""A voice agent's session (docs/PROTOCOL.md, "Voice agents"): speech pushed over the signaling
WebSocket (PCM, or `say` text through eSpeak NG) drives the identity's face, and the room's
viewers get the rendered frames and the voice together. No camera, no peer connection.
A presenter who turns the camera off (control `voice_only`) runs one inside its session,
fed the microphone (server/session.py).

One clock: stream time s runs with the wall clock from the session's start. Audio for s is
handed to the room at wall T0 + s (the room holds it by its measured avatar latency, as a
presenter's microphone); the frame for s is made at T0 + s + lookahead (its phones recognized
by then; --voice-lookahead) and published with `received` = T0 + s, so the room measures
lookahead + render as the avatar's latency and the voice leaves with the frames that show it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np

from engines.provenance.watermark import Marker, Payload

from .session import Session
from .telemetry import FrameRecord

log = logging.getLogger("avatar.voice")

RATES = (16000, 48000)  # what an agent may declare
OUT_RATE = 48000  # what the room gets
CHUNK = 960  # 20 ms at 48 kHz
FPS = 30
MAX_BUFFER = 10.0  # seconds of pushed speech that may wait to be played
MAX_FRAME_BYTES = 65536  # one binary frame of PCM


class VoiceProcessor:
    """On the session's render thread: landmarks for a time -> the marked avatar image."""

    def __init__(self, identity, payload: Payload, seed: int = 0):
        from engines.pipeline import make_renderer
        from engines.voice.learn import own_visemes
        from engines.voice.stream import StreamingAnimator

        self.animator = StreamingAnimator(identity.neutral, seed, own_visemes(identity))
        self.renderer = make_renderer(identity)
        self.marker = Marker(payload)

    def frame(self, t: float, phones: list, label: bool, openness=None) -> np.ndarray:
        from .media.tracks import encoder_planes

        out = self.renderer.render(self.animator.frame(t, phones, openness))
        return encoder_planes(self.marker(out, True) if label else self.marker(out))


class VoiceSession(Session):
    role = "agent"

    def __init__(self, state, identity_name: str, room=None, badge_own_video: bool = False, *,
                 sample_rate: int = 48000, notify=None, on_frame=None):
        super().__init__(state, identity_name, room, badge_own_video)
        self.sample_rate = sample_rate
        self.notify = notify  # notify(message dict) to the agent
        self.on_frame = on_frame  # on_frame(image, FrameRecord) publishes each frame instead (a presenter's)
        self.stages = _NoStages()
        self._render = ThreadPoolExecutor(1, thread_name_prefix=f"voice-{self.id[:8]}-render")
        self._listen = ThreadPoolExecutor(1, thread_name_prefix=f"voice-{self.id[:8]}-listen")
        self.processor: VoiceProcessor | None = None
        self.recognizer = None
        self.heard = None  # the pushed speech's own openness (engines/voice/envelope.py), beside its phones
        self.queue: collections.deque = collections.deque()  # (int16 48 kHz samples, phones or None)
        self.queued = 0  # samples waiting
        self.phones: list = []  # stream-time phones: final ones and the current utterance's
        self._utterance: list = []
        self.t0 = 0.0
        self.playing = False  # something pushed has not finished playing
        self.played = 0.0  # seconds played since the last playback_finished
        self._last_overflow = 0.0
        self._last_frame_t = 0.0

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        identity = await self._off_loop(self._load, self.identity_name)
        loop = asyncio.get_running_loop()
        self.processor = await loop.run_in_executor(self._render, VoiceProcessor, identity, Payload.here(self.id))
        from engines.voice.envelope import SoundOpenness
        from engines.voice.speech import SpeechError
        from engines.voice.stream import StreamingRecognizer
        try:
            self.recognizer = await loop.run_in_executor(self._listen, StreamingRecognizer)
            self.heard = SoundOpenness()
        except (SpeechError, OSError, RuntimeError) as e:  # pocketsphinx missing: `say` still works, pushed PCM moves no lips
            log.warning("agent %s: no speech recognition (%s)", self.id[:8], e)
        self.t0 = time.time()
        self._spawn(self._watchdog())
        self._spawn(self._play())
        self._spawn(self._frames())

    async def close(self) -> None:
        await super().close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._render.shutdown, True)
        await loop.run_in_executor(None, self._listen.shutdown, True)

    def now(self) -> float:
        return time.time() - self.t0

    # ---- from the agent ---------------------------------------------------------------
    def push_pcm(self, data: bytes) -> str | None:
        """Binary PCM (s16le mono at sample_rate). Returns an error code or None."""
        self.last_activity = time.monotonic()
        if len(data) % 2:
            return "bad_audio"
        samples = np.frombuffer(data, "<i2")
        if self.sample_rate != OUT_RATE:
            samples = np.repeat(samples, OUT_RATE // self.sample_rate)  # resampled below
            samples = _smooth_up(samples, OUT_RATE // self.sample_rate)
        room = int(MAX_BUFFER * OUT_RATE) - self.queued
        if room <= 0:
            return "overflow"
        code = "overflow" if len(samples) > room else None
        self._enqueue(samples[:room], None)
        return code

    def say_speech(self, speech) -> str | None:
        """Synthesized speech (engines.voice.speech.Speech with its phones), queued as pushed PCM."""
        from engines.voice.audio import resample

        if self.queued >= MAX_BUFFER * OUT_RATE:
            return "overflow"
        pcm = np.clip(resample(speech.samples, speech.rate, OUT_RATE) * 32767, -32768, 32767).astype(np.int16)
        self._enqueue(pcm, speech.phones)
        return None

    def _enqueue(self, samples: np.ndarray, phones) -> None:
        if len(samples):
            self.queue.append([samples, phones, 0])
            self.queued += len(samples)
            self.playing = True

    def interrupt(self) -> None:
        """Drop what waits, and what the room holds; the mouth closes from the last frame shown."""
        self.last_activity = time.monotonic()
        self.queue.clear()
        self.queued = 0
        cut = self._last_frame_t
        self.phones = [p for p in self.phones if p.start < cut]
        self.phones = [p if p.end <= cut else type(p)(p.start, cut, p.symbol) for p in self.phones]
        self._utterance = []
        if self.room is not None:
            self.room.clear_audio()
        if self.recognizer is not None:
            self._listen.submit(self._drop_utterance)
        if self.playing:
            self.playing = False
            self._finished(interrupted=True)

    def _finished(self, interrupted: bool) -> None:
        if self.notify is not None:
            self.notify({"type": "playback_finished", "interrupted": interrupted,
                         "position": round(self.played, 3)})
        self.played = 0.0

    # ---- the clock ----------------------------------------------------------------------
    async def _play(self) -> None:
        """Every 20 ms of stream time: the next 20 ms of queued speech to the room and the recognizer."""
        loop = asyncio.get_running_loop()
        tick = CHUNK / OUT_RATE
        s = self.now()
        while True:
            s += tick
            await asyncio.sleep(max(0.0, s - self.now()))
            if not self.queue:
                continue
            self.last_activity = time.monotonic()
            out, phones_parts, at = self._take(CHUNK, s)
            for phones, offset in phones_parts:
                self.phones += [type(p)(p.start + offset, p.end + offset, p.symbol) for p in phones]
            if self.room is not None:
                frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
                frame.sample_rate = OUT_RATE
                self.room.publish_audio(frame)
            self.played += len(out) / OUT_RATE
            if self.recognizer is not None and at is not None:
                loop.run_in_executor(self._listen, self._recognize, out[at[0]:at[1]], s + at[0] / OUT_RATE)
            if not self.queue and self.playing:
                self.playing = False
                if self.recognizer is not None:
                    loop.run_in_executor(self._listen, self._recognize, None, 0.0)
                hold = self.room.audio_hold() if self.room is not None else 0.0
                loop.call_later(hold + tick, self._finished_unless_more)

    def _finished_unless_more(self) -> None:
        if not self.playing and not self._closed:
            self._finished(interrupted=False)

    def _take(self, n: int, s: float):
        """n samples from the queue (zero-padded): (samples, [(phones, offset)], pushed PCM's range)."""
        out = np.zeros(n, np.int16)
        parts, pcm_range, filled = [], None, 0
        while filled < n and self.queue:
            item = self.queue[0]
            samples, phones, pos = item
            take = min(n - filled, len(samples) - pos)
            out[filled:filled + take] = samples[pos:pos + take]
            if phones is not None and pos == 0:
                parts.append((phones, s + filled / OUT_RATE))
            if phones is None:
                pcm_range = (pcm_range[0] if pcm_range else filled, filled + take)
            item[2] += take
            filled += take
            self.queued -= take
            if item[2] >= len(samples):
                self.queue.popleft()
        return out, parts, pcm_range

    def _recognize(self, pcm48, at: float) -> None:
        """On the listen thread: feed the recognizer (None: the speech paused). Never raises."""
        try:
            self._recognize_now(pcm48, at)
        except Exception:
            log.exception("agent %s: recognition failed", self.id[:8])

    def _drop_utterance(self) -> None:
        """On the listen thread, at a barge-in: the utterance's phones are not shown."""
        try:
            if self.recognizer.active:
                self.recognizer.end()
        except Exception:
            log.exception("agent %s: recognition failed", self.id[:8])
        self._utterance = []

    def _recognize_now(self, pcm48, at: float) -> None:
        r = self.recognizer
        if pcm48 is None:
            final = r.end() if r.active else None
        else:
            final = None
            usable = len(pcm48) // 3 * 3  # 48 -> 16 kHz: a box of 3 (a cheap low-pass), decimated
            pcm16 = pcm48[:usable].reshape(-1, 3).mean(1).astype(np.int16)
            r.feed(pcm16, at)
            self.heard.feed(pcm16, at)
            if r.should_end():
                final = r.end()
            else:
                self._utterance = r.phones()
        if final is not None:
            self.phones = self.phones + final
            self._utterance = []

    async def _frames(self) -> None:
        """Frame k (stream time k/30) made at T0 + k/30 + lookahead; newest-frame: late frames are skipped."""
        loop = asyncio.get_running_loop()
        lookahead = self.state.config.voice_lookahead
        k = 0
        while True:
            t = k / FPS
            await asyncio.sleep(max(0.0, t + lookahead - self.now()))
            now = self.now()
            if now - lookahead - t > 2 / FPS:  # behind: skip to the newest frame
                self.stats.dropped += int((now - lookahead - t) * FPS)
                k = int((now - lookahead) * FPS)
                t = k / FPS
            self.phones = [p for p in self.phones if p.end > t - 2]
            phones = self.phones + list(self._utterance)
            label = self.label_viewers
            started = time.time()
            try:
                image = await loop.run_in_executor(self._render, self.processor.frame, t, phones, label, self.heard)
            except Exception:
                log.exception("agent %s: frame failed", self.id[:8])
                k += 1
                continue
            self._last_frame_t = t
            received = self.t0 + t
            if self.room is not None and self.on_frame is None:
                self.room.publish_video(image, received)
            done = time.time()
            rec = FrameRecord(k * 3000, received, done, True,
                              {"render": (done - started) * 1e3, "total": (done - received) * 1e3})
            self.stats.add(rec)
            self.state.metrics.frame(rec)
            if self.on_frame is not None:
                self.on_frame(image, rec)
            k += 1


def _smooth_up(samples: np.ndarray, factor: int) -> np.ndarray:
    """Repeated samples smoothed by a box of `factor` (a cheap interpolation for 16 -> 48 kHz)."""
    if factor == 1:
        return samples
    smoothed = np.convolve(samples.astype(np.float32), np.ones(factor) / factor, mode="same")
    return np.clip(smoothed, -32768, 32767).astype(np.int16)


class _NoStages:
    """An agent computes on its own threads: nothing for Session.close() to stop."""

    async def close(self) -> None:
        pass
