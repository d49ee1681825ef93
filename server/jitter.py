"""Video frames leave aiortc's receive buffer the moment they are complete.

Why: aiortc's video JitterBuffer (aiortc/jitterbuffer.py, `_remove_frame`) hands a frame to
the decoder only when the first packet of the *next* frame arrives (a new RTP timestamp),
so every aiortc receive hop waits one frame interval for nothing: 33 ms at 30 fps, once on
the server (camera in) and once in a headless client (avatar back). The sender already
says where a frame ends: the RTP marker bit is set on its last packet (RFC 7741 for VP8,
RFC 6184 for H.264), and libwebrtc completes frames on it.

MarkerJitterBuffer keeps aiortc's buffer and its rules, and adds one: when the buffer's
first slot holds a frame's first packet, contiguous packets of one timestamp ending in a
marker packet are a complete frame and go out at once. The first slot is a frame's start
after any frame has gone out (a frame ends where the next begins) and after aiortc's
smart_remove when it keeps a frame (it cuts at frame boundaries); like aiortc, the very
first packet received is taken as a start. After a reset it is not known, and frames complete as in
aiortc until one has gone out. An incomplete frame (a gap, a lost marker packet) is never
handed out early: it completes as it does in aiortc today. A frame handed out has left the
buffer, so the next timestamp cannot hand it out again. Audio receivers are left alone.

This replaces a private attribute of aiortc's RTCRtpReceiver; `install` checks that it is
there and is what it expects, and raises IncompatibleAiortc otherwise (tests/test_jitter.py
fails loudly on an aiortc whose internals moved), so it never silently does nothing.
"""
from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # RTCRtpReceiver.__jitter_buffer
BUFFER_STATE = ("_origin", "_packets", "_capacity", "_is_video")


class IncompatibleAiortc(RuntimeError):
    """aiortc's receiver no longer holds its jitter buffer the way this module expects."""


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = True):
        super().__init__(capacity, prefetch=prefetch, is_video=is_video)
        self._at_frame_start = True  # the first slot holds (or awaits) a frame's first packet

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        # aiortc's add() calls this after storing each packet; at most one frame comes out
        # per packet, so the frame at the first slot is tried first: no frame waits behind
        # another that is already whole.
        frame = self._complete_on_marker() if self._at_frame_start else None
        if frame is None:
            frame = super()._remove_frame(sequence_number)  # completion by the next timestamp
        if frame is not None:
            self._at_frame_start = True
        return frame

    def _complete_on_marker(self) -> JitterFrame | None:
        """The frame at the first slot, if its packets are all here up to a marker packet."""
        if self._origin is None:
            return None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None  # a gap, or a new timestamp (aiortc's own rule handles that)
            packets.append(packet)
            if packet.marker:
                frame = JitterFrame(data=b"".join(p._data for p in packets), timestamp=packet.timestamp)
                self.remove(count + 1)
                return frame
        return None

    def remove(self, count: int) -> None:
        super().remove(count)
        if count >= self._capacity:  # aiortc's reset on heavy reordering: no known start
            self._at_frame_start = False

    def smart_remove(self, count: int) -> bool:
        # aiortc drops whole frames to make room, so the first slot is a frame start again,
        # unless it dropped everything and restarts at whatever packet came in.
        dropped_all = super().smart_remove(count)
        self._at_frame_start = not dropped_all
        return dropped_all


def install(receiver) -> None:
    """Make a video RTCRtpReceiver complete frames on the marker bit; call it before media
    flows (e.g. from the peer connection's "track" event). IncompatibleAiortc if the
    receiver is not built the way this module expects."""
    current = getattr(receiver, RECEIVER_BUFFER, None)
    if not isinstance(current, JitterBuffer) or not all(hasattr(current, a) for a in BUFFER_STATE):
        raise IncompatibleAiortc(f"aiortc's RTCRtpReceiver has no {RECEIVER_BUFFER} JitterBuffer: "
                                 "marker-bit frame completion cannot be installed (server/jitter.py)")
    if not current._is_video:
        raise ValueError("marker-bit completion is for video receivers only")
    if not isinstance(current, MarkerJitterBuffer):
        setattr(receiver, RECEIVER_BUFFER, MarkerJitterBuffer(current.capacity, is_video=True))


def is_installed(receiver) -> bool:
    return isinstance(getattr(receiver, RECEIVER_BUFFER, None), MarkerJitterBuffer)


def install_for_track(pc, track) -> None:
    """install() on the receiver of a remote video `track` of peer connection `pc` (call it
    from the "track" event, which aiortc fires before any media arrives)."""
    receiver = next((t.receiver for t in pc.getTransceivers() if t.receiver.track is track), None)
    if receiver is None:
        raise IncompatibleAiortc("no transceiver of the peer connection receives this track")
    install(receiver)
