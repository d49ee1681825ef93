"""Rooms: a presenter's avatar video and voice, fanned out to the people watching.

A room has at most one presenter (a Session that named the room in its hello, or a WHIP
publisher) and up to max_viewers_per_room viewers (viewer pages, WHEP players). The
presenter publishes every avatar frame and every microphone frame into its room; each
viewer has its own outgoing tracks fed from it. aiortc encodes once per peer connection,
so a direct viewer costs this server an encode: past a few viewers, rooms are published
into an SFU instead (server/sfu.py, docs/SFU.md), which costs one encode whatever the
audience.

A/V sync: the microphone reaches the server about as fast as the camera, but the avatar
frame leaves later by the compute time and its VP8 encode. So each audio frame is held, from
its arrival, for the current avatar latency: the median over the last second of camera frame
received -> avatar frame published, plus the median of published -> its packets sent to the
viewers (the Opus packet is forwarded, not encoded), plus --audio-delay as a calibration; and
avatar and voice leave together.
Every outgoing track stamps its own timestamps from the wall clock at which it hands a frame
to the encoder; aiortc's RTCP sender reports map those to the send time, so a receiver that
syncs by them (every browser) plays what left together, together. `avatar bench live
--avsync` measures the offset a viewer ends up with.

Rooms live while someone is in them: created on first use, dropped when the last person
leaves. Viewers waiting in an empty room get a notice when a presenter arrives and pick the
stream up from the next frame (a new presenter's first frame is a keyframe for every viewer).
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import statistics
import time
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .media import LatestFrame, video_frame

VIDEO_CLOCK = 90000
AUDIO_QUEUE = 25  # 0.5 s of 20 ms frames per viewer; a viewer that falls further behind loses the oldest
LATENCY_WINDOW = 30  # avatar frames in the latency median (one second at 30 fps)
MAX_AUDIO_HOLD = 0.5  # seconds: never hold audio longer than this, whatever the latency says


class RoomBusy(Exception):
    """The room already has a presenter."""


class RoomFull(Exception):
    """No viewer slot left (in the room or on the server)."""


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


class Room:
    def __init__(self, name: str, config, on_presenter=None):
        self.name = name
        self.config = config
        self.on_presenter = on_presenter  # on_presenter(room) after the presenter came or went
        self.presenter = None  # the publishing Session, or None
        self.audience: set[Audience] = set()
        self.sfu_audience: Audience | None = None  # the SFU publisher's feed, not a viewer
        self.sfu_state: str | None = None  # None (no SFU), "connecting", "live", "failed: ..."
        self._latency: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._sending: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._loop = asyncio.get_running_loop()

    # ---- who is in the room --------------------------------------------------------------
    def claim(self, presenter) -> None:
        """Make `presenter` the room's presenter; RoomBusy if there is one. No await: the
        check and the claim cannot be split by another client."""
        if self.presenter is not None:
            raise RoomBusy(f"room {self.name!r} already has a presenter")
        self.presenter = presenter
        self._latency.clear()
        self._sending.clear()
        self._notify()

    def vacate(self, presenter) -> None:
        if self.presenter is presenter:
            self.presenter = None
            self._notify()

    def join(self, audience: Audience) -> None:
        audience.video.on_sent = self.note_sent
        self.audience.add(audience)

    def note_sent(self, seconds: float) -> None:
        """One avatar frame took `seconds` from published to its packets sent (to one viewer)."""
        self._sending.append(seconds)

    def leave(self, audience: Audience) -> None:
        self.audience.discard(audience)
        audience.stop()

    @property
    def empty(self) -> bool:
        return self.presenter is None and not self.audience

    def describe(self) -> dict:
        p = self.presenter
        return {"room": self.name, "presenter": None if p is None else {"identity": p.identity_name},
                "viewers": len(self.audience), "sfu": self.sfu_state}

    def _notify(self) -> None:
        if self.on_presenter is not None:
            self.on_presenter(self)
        for a in list(self.audience):
            if a.notify is not None:
                a.notify(self)

    def _feeds(self):
        if self.sfu_audience is not None:
            yield self.sfu_audience
        yield from self.audience

    # ---- media from the presenter ----------------------------------------------------------
    def publish_video(self, image: np.ndarray, received: float) -> None:
        """What viewers see of an avatar frame (media.encoder_planes(): with the visible "AI
        avatar" badge, unless the identity's owner turned it off), made from the camera frame
        that arrived at `received` (time.time()). Read, never written: one array for all."""
        self._latency.append(max(0.0, time.time() - received))
        for a in self._feeds():
            a.video.push(image)

    def audio_hold(self) -> float:
        """Seconds to hold an audio frame so it leaves with its avatar frame."""
        latency = statistics.median(self._latency) if self._latency else 0.0
        sending = statistics.median(self._sending) if self._sending else 0.0
        return min(MAX_AUDIO_HOLD, max(0.0, latency + sending + self.config.audio_delay / 1e3))

    def publish_opus(self, packet: bytes) -> None:
        """An Opus packet of the microphone, just received: forwarded as it is."""
        self._publish_audio(AudioChunk(opus_samples(packet), opus=packet))

    def publish_audio(self, frame: av.AudioFrame) -> None:
        """A decoded microphone frame (the presenter's codec is not Opus)."""
        self._publish_audio(AudioChunk(frame.samples, frame.sample_rate, pcm=packed_s16(frame),
                                       layout=frame.layout.name))

    def _publish_audio(self, chunk: AudioChunk) -> None:
        """Fanned out once the avatar has caught up."""
        if not self.audience and self.sfu_audience is None:
            return
        hold = self.audio_hold()
        if hold <= 0:
            self._deliver_audio(chunk)
        else:
            self._loop.call_later(hold, self._deliver_audio, chunk)

    def _deliver_audio(self, item) -> None:
        for a in self._feeds():
            a.audio.push(item)


def packed_s16(frame: av.AudioFrame) -> np.ndarray:
    """The frame's samples as packed (interleaved) s16, shape (1, samples * channels)."""
    if frame.format.name != "s16":
        frame = av.AudioResampler(format="s16", layout=frame.layout.name, rate=frame.sample_rate).resample(frame)[0]
    data = frame.to_ndarray()
    return np.ascontiguousarray(data.reshape(1, -1), dtype=np.int16)


class Rooms:
    """Every live room by name, the viewer count they share, and (with --janus-url) the task
    that publishes each live room into the SFU."""

    def __init__(self, config):
        self.config = config
        self.rooms: dict[str, Room] = {}
        self.sfu_tasks: dict[str, asyncio.Task] = {}

    def get(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.config, self._presenter_changed)
        return room

    def _presenter_changed(self, room: Room) -> None:
        if not self.config.janus_url:
            return
        from .sfu import publish_room

        task = self.sfu_tasks.pop(room.name, None)
        if task is not None:
            task.cancel()
        if room.presenter is not None:
            self.sfu_tasks[room.name] = asyncio.get_running_loop().create_task(publish_room(room, self.config))

    async def close(self) -> None:
        """Stop SFU publishing (each unpublishes from Janus on its way out)."""
        tasks = list(self.sfu_tasks.values())
        self.sfu_tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def live(self, name: str) -> Room | None:
        """The room if it has a presenter."""
        room = self.rooms.get(name)
        return room if room is not None and room.presenter is not None else None

    def viewers(self) -> int:
        return sum(len(r.audience) for r in self.rooms.values())

    def admit_viewer(self, room: Room, audience: Audience) -> None:
        """Seat a viewer, or RoomFull. No await between the check and the seat."""
        if self.viewers() >= self.config.max_viewers:
            raise RoomFull(f"the server is at its limit of {self.config.max_viewers} viewers")
        if len(room.audience) >= self.config.max_viewers_per_room:
            raise RoomFull(f"room {room.name!r} is at its limit of {self.config.max_viewers_per_room} viewers")
        room.join(audience)

    def tidy(self, room: Room) -> None:
        """Forget a room nobody is in (its SFU task, if any, is already cancelled)."""
        if room.empty and self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def describe(self) -> list[dict]:
        return [r.describe() for r in sorted(self.rooms.values(), key=lambda r: r.name)]
