"""A live room, published into a Janus VideoRoom so Janus fans it out (docs/SFU.md).

With --janus-url, every room that gets a presenter is published into the VideoRoom whose
numeric id is janus_room_id(name): the room's avatar video and presenter audio, encoded
once by this server whatever the audience. It is unpublished when the presenter leaves;
Janus tells its subscribers ("unpublished"), and they subscribe again when a new presenter's
feed appears, as any VideoRoom client does. If Janus fails, the room goes on for its direct
viewers and the failure is logged and shown in GET /rooms ("sfu": "failed: ...").
"""
from __future__ import annotations

import asyncio
import hashlib
import logging

from .janus import JanusError, JanusPublisher
from .audience import Audience

log = logging.getLogger("avatar.sfu")


def janus_room_id(name: str) -> int:
    """A stable VideoRoom id for a room name: 48 bits of its sha256 (a JavaScript-safe integer;
    two names share an id with negligible odds at any realistic number of rooms)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big")


async def publish_room(room, config) -> None:
    """Publish `room` into Janus until cancelled (the presenter left or the server stops)."""
    audience = Audience()
    audience.video.on_sent = room.note_sent
    room.sfu_audience = audience
    room.sfu_state = "connecting"
    try:
        async with JanusPublisher(config.janus_url, janus_room_id(room.name), f"avatar:{room.name}",
                                  admin_key=config.janus_admin_key) as publisher:
            await publisher.publish([audience.video, audience.audio])
            room.sfu_state = "live"
            log.info("room %s published into Janus room %d", room.name, janus_room_id(room.name))
            await asyncio.Event().wait()  # until cancelled; leaving the block unpublishes
    except JanusError as e:
        room.sfu_state = f"failed: {e}"
        log.error("room %s: cannot publish into Janus at %s: %s", room.name, config.janus_url, e)
    finally:
        room.sfu_audience = None
        if not room.sfu_state.startswith("failed"):
            room.sfu_state = None  # unpublished: GET /rooms must not say "live"
        audience.stop()
