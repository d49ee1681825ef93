"""What a viewer is to a room: its two outgoing tracks, fed from the room's newest avatar frame
and its presenter's (held) voice. Viewers, the SFU publisher and WHEP players each have one.

Every outgoing track stamps its own timestamps from the wall clock at which it hands a frame
to the encoder; aiortc's RTCP sender reports map those to the send time, so a receiver that
syncs by them (every browser) plays what left together, together.
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import time
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..media.tracks import LatestFrame, video_frame

VIDEO_CLOCK = 90000
AUDIO_QUEUE = 25  # 0.5 s of 20 ms frames per viewer; a viewer that falls further behind loses the oldest


class ViewerVideoTrack(MediaStreamTrack):
    """A viewer's outgoing video: the room's newest avatar frame, stamped on this track's clock."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self._latest = LatestFrame()
        self._start: float | None = None
        self._last_pts = -1
        self._in_flight: float | None = None  # when the frame being encoded was published
        self.on_sent = None  # on_sent(seconds from publish to its packets sent)

    def push(self, image: np.ndarray) -> None:
        """An image shared with every viewer (media.encoder_planes()): read, never written."""
        self._latest.put((image, time.monotonic()))

    async def recv(self) -> av.VideoFrame:
        # aiortc calls recv() again once the previous frame is encoded and sent.
        if self._in_flight is not None and self.on_sent is not None:
            self.on_sent(time.monotonic() - self._in_flight)
        self._in_flight = None
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._latest.get()
        if item is None or self.readyState != "live":
            raise MediaStreamError
        image, self._in_flight = item
        # Its own frame object: each sender encodes in a thread of its own, so no frame may
        # be shared.
        frame = video_frame(image)
        now = time.monotonic()
        self._start = now if self._start is None else self._start
        self._last_pts = max(self._last_pts + 1, round((now - self._start) * VIDEO_CLOCK))
        frame.pts, frame.time_base = self._last_pts, fractions.Fraction(1, VIDEO_CLOCK)
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            self._latest.put(None)  # wake a pending recv()
        super().stop()


@dataclass(frozen=True)
class AudioChunk:
    """20 ms or so of the presenter's voice: its Opus packet as received (forwarded untouched),
    or decoded samples when the presenter's codec is not Opus."""
    samples: int  # per channel, at `rate`
    rate: int = 48000
    opus: bytes | None = None
    pcm: np.ndarray | None = None  # packed s16, shape (1, samples * channels)
    layout: str = "stereo"


def opus_samples(packet: bytes) -> int:
    """Samples per channel at 48 kHz in an Opus packet, from its TOC byte (RFC 6716, 3.1)."""
    if not packet:
        return 0
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        ms = (10, 20, 40, 60)[config % 4]
    elif config < 16:  # hybrid: 10, 20 ms
        ms = (10, 20)[config % 2]
    else:  # CELT: 2.5, 5, 10, 20 ms
        ms = (2.5, 5, 10, 20)[config % 4]
    frames = 1 if code == 0 else 2 if code in (1, 2) else (packet[1] & 0x3F if len(packet) > 1 else 0)
    return int(frames * ms * 48)


class ViewerAudioTrack(MediaStreamTrack):
    """A viewer's outgoing audio: the presenter's voice, a bounded queue stamped continuously
    on this track's clock (jumping ahead over a gap). Opus packets go out as they came when
    this viewer's connection uses Opus (aiortc's sender packetizes an av.Packet without
    encoding); otherwise they are decoded here and aiortc encodes for this viewer's codec."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self._queue: collections.deque = collections.deque(maxlen=AUDIO_QUEUE)
        self._ready = asyncio.Event()
        self._start: float | None = None
        self._next_pts = 0
        self._decoder = None
        self.opus_out = True  # this viewer's negotiated codec is Opus (viewer.py says otherwise)
        self.dropped = 0
        self.forwarded = 0  # Opus packets sent untouched
        self.encoded = 0  # frames handed to aiortc to encode

    def push(self, chunk: AudioChunk) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(chunk)
        self._ready.set()

    def clear(self) -> None:
        """Forget what waits to be sent."""
        self._queue.clear()

    async def recv(self) -> av.AudioFrame | av.Packet:
        while True:
            while not self._queue:
                if self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            if self.readyState != "live":
                raise MediaStreamError
            out, samples = self._convert(self._queue.popleft())
            if out is not None:
                break
        now = time.monotonic()
        self._start = now if self._start is None else self._start
        rate = 48000 if isinstance(out, av.Packet) else out.sample_rate
        wall = round((now - self._start) * rate)
        if wall - self._next_pts > rate // 10:  # more than 100 ms of nothing: a gap, not jitter
            self._next_pts = wall
        out.pts, out.time_base = self._next_pts, fractions.Fraction(1, rate)
        self._next_pts += samples
        return out

    def _convert(self, chunk: AudioChunk) -> tuple[av.Packet | av.AudioFrame | None, int]:
        """What goes to the sender and its samples: the packet itself, or a frame for aiortc to
        encode (None: the decoder has nothing yet)."""
        if chunk.opus is not None and self.opus_out:
            self.forwarded += 1
            return av.Packet(chunk.opus), chunk.samples
        if chunk.opus is not None:
            if self._decoder is None:
                self._decoder = av.CodecContext.create("opus", "r")
            decoded = self._decoder.decode(av.Packet(chunk.opus))
            if not decoded:
                return None, 0
            chunk = AudioChunk(decoded[0].samples, decoded[0].sample_rate, pcm=packed_s16(decoded[0]),
                               layout=decoded[0].layout.name)
        frame = av.AudioFrame.from_ndarray(chunk.pcm.reshape(1, -1), format="s16", layout=chunk.layout)
        frame.sample_rate = chunk.rate
        self.encoded += 1
        return frame, chunk.samples

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class Audience:
    """What a viewer is to a room: its two tracks and a notice callback."""

    def __init__(self, notify=None):
        self.video = ViewerVideoTrack()
        self.audio = ViewerAudioTrack()
        self.notify = notify  # notify(room) when the room's presenter changes

    def stop(self) -> None:
        self.video.stop()
        self.audio.stop()


def packed_s16(frame: av.AudioFrame) -> np.ndarray:
    """The frame's samples as packed (interleaved) s16, shape (1, samples * channels)."""
    if frame.format.name != "s16":
        frame = av.AudioResampler(format="s16", layout=frame.layout.name, rate=frame.sample_rate).resample(frame)[0]
    data = frame.to_ndarray()
    return np.ascontiguousarray(data.reshape(1, -1), dtype=np.int16)
