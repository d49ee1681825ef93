"""What a presenter Session and a Viewer share about their aiortc peer connection: answering
an offer, closing a connection whatever state a failed negotiation left it in, and the
deadline by which a negotiated peer must have connected."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError

log = logging.getLogger("avatar.peer")


class PeerConnection(RTCPeerConnection):
    """aiortc's peer connection, minus one race: setting a description starts a connect task
    nobody awaits, and closing the connection while that task waits on ICE or DTLS makes it
    raise InvalidStateError ("RTCIceTransport is closed"), which asyncio then reports as a
    task exception never retrieved. Closing mid-connect is normal here (connect deadlines,
    clients that leave at once), so that error is dropped once the connection is closed."""

    async def _RTCPeerConnection__connect(self) -> None:  # overrides aiortc's private __connect
        try:
            await super()._RTCPeerConnection__connect()
        except InvalidStateError:
            if self.connectionState != "closed":
                raise
            log.debug("peer connection closed while connecting")


def new_peer(ice_servers: list[str] = ()) -> RTCPeerConnection:
    return PeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in ice_servers]))


async def answer(pc: RTCPeerConnection, sdp: str, add_tracks: Callable[[RTCPeerConnection], None]) -> str:
    """The answer to `sdp`, after add_tracks(pc) has added what this peer sends. ValueError
    for any offer aiortc cannot use (it raises many kinds on hostile SDP); `pc` is then closed."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        add_tracks(pc)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:
        await close_peer(pc)
        raise ValueError(str(e)[:200] or type(e).__name__) from None
    return pc.localDescription.sdp


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close, never raise: aiortc's close() fails on a connection a bad offer left half set up
    (AttributeError on a transport it never made), and a failed close must not keep a slot."""
    try:
        await pc.close()
    except Exception as e:
        log.debug("closing a peer connection: %s: %s", type(e).__name__, e)


async def connect_deadline(pc: RTCPeerConnection, seconds: float, end: Callable[[str], None]) -> None:
    """end(reason) unless `pc` is connected within `seconds` of its answer: a peer that never
    does ICE (no candidates, unreachable) must not hold its slot."""
    await asyncio.sleep(seconds)
    if pc.connectionState != "connected":
        end(f"not connected within {seconds:g} s")
