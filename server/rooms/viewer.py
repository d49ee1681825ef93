"""One viewer's peer connection: the room's avatar video and presenter audio, send-only.

The same for a viewer page (signaling over /ws) and a WHEP player (HTTP, server/http/whip.py).
Lifecycle mirrors Session: offer() answers, `ended` is set when the peer connection fails,
close() (idempotent) leaves the room and tears down.
"""
from __future__ import annotations

import asyncio
import logging
import secrets

from aiortc import RTCPeerConnection

from .audience import Audience
from .room import Room
from ..media.peer import answer, close_peer, connect_deadline, new_peer

log = logging.getLogger("avatar.viewer")


def audio_codec(sdp: str) -> str | None:
    """The codec name of an SDP's first audio payload type (what is sent), or None."""
    payload = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            fields = line[2:].split()
            payload = fields[3] if fields[0] == "audio" and len(fields) > 3 else None
        elif payload and line.startswith(f"a=rtpmap:{payload} "):
            return line.split(" ", 1)[1].split("/", 1)[0].lower()
    return None


class Viewer:
    role = "viewer"

    def __init__(self, state, room: Room, notify=None):
        self.state = state
        self.id = secrets.token_hex(16)
        self.room = room
        self.audience = Audience(notify)
        self.pc: RTCPeerConnection | None = None
        self.ended = asyncio.Event()
        self.end_reason = ""
        self._deadline: asyncio.Task | None = None
        self._closed = False

    async def offer(self, sdp: str) -> str:
        """Answer a receive-only offer. ValueError if the SDP is unusable (nothing of it is left)."""
        if self.pc is not None:
            raise RuntimeError("already negotiated")
        self.pc = pc = new_peer(self.state.config.ice_servers)
        pc.on("connectionstatechange", self._on_state)

        def add_tracks(pc):
            kinds = {t.kind for t in pc.getTransceivers()}
            if not kinds & {"video", "audio"}:
                raise ValueError("the offer asks for neither video nor audio")
            for track in (self.audience.video, self.audience.audio):
                if track.kind in kinds:
                    pc.addTrack(track)
            for transceiver in pc.getTransceivers():
                # Nothing a viewer might send is read: a sendrecv offer (WHEP players make
                # them) gets a sendonly answer, so none of it arrives to queue up.
                transceiver.direction = "sendonly"

        try:
            answer_sdp = await answer(pc, sdp, add_tracks)
        except ValueError:
            self.pc = None
            raise
        self.audience.audio.opus_out = audio_codec(answer_sdp) in (None, "opus")
        self._deadline = asyncio.get_running_loop().create_task(
            connect_deadline(pc, self.state.config.connect_timeout, self._end))
        return answer_sdp

    async def _on_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            self._end(f"peer connection {self.pc.connectionState}")

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end("closed")
        self.room.leave(self.audience)
        if self._deadline is not None:
            self._deadline.cancel()
        if self.pc is not None:
            await close_peer(self.pc)
        self.pc = None
