"""Rooms: a presenter's avatar video and voice, fanned out to the people watching.

A room has at most one presenter (a Session that named the room in its hello, or a WHIP
publisher) and up to max_viewers_per_room viewers (viewer pages, WHEP players). The
presenter publishes every avatar frame and every microphone frame into its room; each
viewer has its own outgoing tracks fed from it. aiortc encodes once per peer connection,
so a direct viewer costs this server an encode: past a few viewers, rooms are published
into an SFU instead (sfu.py, docs/SFU.md), which costs one encode whatever the
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
import statistics
import time

import av
import numpy as np

from .audience import AudioChunk, Audience, opus_samples, packed_s16
from .sfu import publish_room

LATENCY_WINDOW = 30  # avatar frames in the latency median (one second at 30 fps)
MAX_AUDIO_HOLD = 0.5  # seconds: never hold audio longer than this, whatever the latency says


class RoomBusy(Exception):
    """The room already has a presenter."""


class RoomFull(Exception):
    """No viewer slot left (in the room or on the server)."""


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
        self._held: collections.deque = collections.deque()  # (due, TimerHandle) of audio held back

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
            now = self._loop.time()
            while self._held and self._held[0][0] < now:
                self._held.popleft()
            self._held.append((now + hold, self._loop.call_later(hold, self._deliver_audio, chunk)))

    def clear_audio(self) -> None:
        """Drop the audio held back and queued for viewers (a voice agent's barge-in)."""
        while self._held:
            self._held.popleft()[1].cancel()
        for a in self._feeds():
            a.audio.clear()

    def _deliver_audio(self, item) -> None:
        for a in self._feeds():
            a.audio.push(item)


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
