"""Video frames leave aiortc's receive buffer the moment they are complete.

Why: aiortc's video JitterBuffer (aiortc/jitterbuffer.py, `_remove_frame`) hands a frame to
the decoder only when the first packet of the *next* frame arrives (a new RTP timestamp),
so every aiortc receive hop waits one frame interval for nothing: 33 ms at 30 fps, once on
the server (camera in) and once in a headless client (avatar back). The sender already
says where a frame ends: the RTP marker bit is set on its last packet (RFC 7741 for VP8,
RFC 6184 for H.264; aiortc's RTCRtpSender and libwebrtc both set it), and libwebrtc's
receiver completes frames on it.

MarkerJitterBuffer keeps aiortc's buffer and its rules, and adds one: when the buffer's
first slot is KNOWN to be a frame's first packet, packets contiguous in sequence number
(mod 2**16) from it, of one timestamp, ending in a marker packet, are a complete frame and
go out on that add() call. The first slot is known to be a frame start only when the packet
just before it was received and ended a frame: after any frame has gone out (by its marker,
or by aiortc's next-timestamp rule, which cuts where a new timestamp begins), and after
aiortc's smart_remove if the packet just before its cut was there. Not known: the first
packet of a stream (it may be mid-frame: a lost or late first packet), after aiortc's reset
on heavy reordering, after a smart_remove that cut behind a gap. There, frames complete by
aiortc's rule until one has gone out (one frame interval, once). We do not look for frame
starts in the payload: aiortc's depayloaders keep only the codec bytes, and H.264 has no
per-frame start flag (VP8's S bit would only save that one interval).

Loss and reordering: a frame with a gap never goes out early (it waits for the packet, as
in aiortc); a lost marker packet leaves a gap, so it costs what it costs in aiortc; a frame
that went out has left the buffer and cannot go out again.

Several frames at once: a packet can make more than one frame whole (a retransmission that
fills a gap; frame 0, which ends on the next frame's first packet when that packet is a
whole one-packet frame itself). add() returns one frame, as aiortc's receiver expects; the
others wait in take_ready(). Left there, they would go out one per later add(), and with
one-packet frames (small P-frames are) that backlog never drains: every packet brings a new
frame and hands out an old one, one frame interval late for good. So install() also has the
receiver queue them for its decoder right behind the frame add() returned, their timestamps
mapped by the receiver's own mapper: every frame is decoded on the packet that completes it.

Empty packets: libwebrtc without RTX sends bandwidth-probe padding on the media SSRC right
after a marker packet, with that frame's timestamp and no payload. aiortc's rule folds it
into the frame; once that frame has gone out on its marker it would be a frame of its own,
and an empty frame puts libavcodec into drain mode: every later decode of that receiver fails
with EOFError (aiortc keeps the decoder). So an empty frame never goes out: it is dropped
and the next frame looked for on the same add().

aiortc internals this relies on (private, so guarded): RTCRtpReceiver's `__jitter_buffer`
(replaced), `__decoder_queue` (its put() is wrapped on that one queue) and `__timestamp_mapper`
(used), and JitterBuffer's `_origin`, `_packets`, `_remove_frame`, `remove`, `smart_remove`.
check_aiortc() verifies once per process that the receiver's code still uses them as read in
aiortc 1.16.0 (it depayloads into packet._data, calls __jitter_buffer.add(), maps the frame's
timestamp and puts it on __decoder_queue), that JitterBuffer.add() still goes through those
methods, and runs a fixed packet sequence through MarkerJitterBuffer; install() raises
IncompatibleAiortc when anything differs, so it never silently does nothing.

Switches: `ENABLED` (module-wide; install() installs nothing while it is False),
install(..., enabled=False) per call, and MarkerJitterBuffer.enabled per receiver at run time
(False: aiortc's rule and pace, one frame per add(), with the same bookkeeping, so it can be
turned back on).
"""
from __future__ import annotations

import logging
import queue
from collections import deque

import aiortc
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)

ENABLED = True  # module-wide switch read by install() when it is not told `enabled`
VERIFIED_AIORTC = ("1.16.0",)  # read and tested against these; others pass check_aiortc() or raise

RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # RTCRtpReceiver.__jitter_buffer
RECEIVER_QUEUE = "_RTCRtpReceiver__decoder_queue"  # RTCRtpReceiver.__decoder_queue: (codec, frame) to decode
RECEIVER_MAPPER = "_RTCRtpReceiver__timestamp_mapper"  # maps each frame's RTP timestamp before the queue
BUFFER_STATE = ("_origin", "_packets", "_capacity", "_prefetch", "_is_video")
BUFFER_METHODS = ("add", "_remove_frame", "remove", "smart_remove")


class IncompatibleAiortc(RuntimeError):
    """aiortc's private internals are no longer what the code reading them expects: here its
    receiver's jitter buffer; in server/media/vp8.py, how its VP8 encoder sets libvpx's options."""


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video JitterBuffer that also completes a frame on its marker packet."""

    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = True, enabled: bool = True):
        super().__init__(capacity, prefetch=prefetch, is_video=is_video)
        self._video = is_video and prefetch == 0  # audio (prefetch) keeps aiortc's buffer as is
        self.enabled = enabled and self._video
        self._start_known = False  # the first slot holds (or awaits) a frame's first packet
        self._ready: deque[JitterFrame] = deque()  # whole frames, out of the buffer, not handed out yet
        self.frames_on_marker = 0  # frames that went out on their marker packet
        self.frames_on_next_timestamp = 0  # ... by aiortc's rule (stream start, resets, no marker)
        self.empty_dropped = 0  # payload-less frames dropped (padding after a marker)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli, frame = super().add(packet)
        if frame is None and self._ready:  # e.g. a late packet aiortc dropped: still one out
            frame = self._ready.popleft()
        return pli, frame

    def take_ready(self) -> list[JitterFrame]:
        """Whole frames beyond the one add() returned (a packet that fills a gap can complete
        several), oldest first; install() has the receiver decode them right after it."""
        frames = list(self._ready)
        self._ready.clear()
        return frames

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        # aiortc's add() calls this after storing each packet (not for late packets it drops)
        # and hands the receiver what it returns: the oldest whole frame. The others wait in
        # _ready for take_ready() (or the next add()).
        if not self._video:
            return super()._remove_frame(sequence_number)
        while True:
            frame, on_marker = self._one_frame(sequence_number)
            if frame is None:
                break
            if not frame.data:  # padding: it would put the decoder into drain mode for good
                self.empty_dropped += 1
                continue
            self._ready.append(frame)
            if on_marker:
                self.frames_on_marker += 1
            else:
                self.frames_on_next_timestamp += 1
            if not self.enabled:
                break  # aiortc's pace: at most one frame per add()
        return self._ready.popleft() if self._ready else None

    def _one_frame(self, sequence_number: int) -> tuple[JitterFrame | None, bool]:
        if self._start_known and self.enabled:
            frame = self._complete_on_marker()
            if frame is not None:
                return frame, True
        frame = super()._remove_frame(sequence_number)  # completion by the next timestamp
        if frame is not None:
            self._start_known = True  # aiortc cut where the next timestamp begins
        return frame, False

    def _complete_on_marker(self) -> JitterFrame | None:
        """The frame at the (known) first slot, if all its packets are here up to its marker."""
        origin = self._origin
        if origin is None:
            return None
        timestamp = None
        for count in range(self._capacity):
            packet = self._packets[(origin + count) % self._capacity]
            if packet is None or packet.sequence_number != uint16_add(origin, count):
                return None  # a gap: wait for the packet (a lost marker packet waits as in aiortc)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return None  # the next frame began without a marker: aiortc's rule takes it
            if packet.marker:
                data = b"".join(self._packets[(origin + i) % self._capacity]._data for i in range(count + 1))
                super().remove(count + 1)  # the next slot is the next frame's start
                return JitterFrame(data=data, timestamp=timestamp)
        return None

    def remove(self, count: int) -> None:
        super().remove(count)
        if count >= self._capacity:  # aiortc's reset on heavy reordering: no known start
            self._start_known = False

    def smart_remove(self, count: int) -> bool:
        # aiortc drops packets to make room and stops at a packet whose timestamp differs from
        # the last packet it dropped. That is a frame start only if the slot just before it
        # held a packet: behind a gap, the new first packet may be the middle of a frame.
        before = list(self._packets)
        dropped_all = super().smart_remove(count)
        previous = before[(self._origin - 1) % self._capacity]
        self._start_known = (not dropped_all and previous is not None
                             and previous.sequence_number == uint16_add(self._origin, -1))
        return dropped_all


_checked = False


def check_aiortc() -> None:
    """IncompatibleAiortc unless aiortc works the way MarkerJitterBuffer and install() expect
    (checked once per process)."""
    global _checked
    if _checked:
        return
    where = f"aiortc {getattr(aiortc, '__version__', '?')}"
    problems = []
    handle = getattr(getattr(RTCRtpReceiver, "_handle_rtp_packet", None), "__code__", None)
    uses = {RECEIVER_BUFFER, "add", "_data", RECEIVER_MAPPER, "map", RECEIVER_QUEUE, "put"}
    if handle is None or not uses <= set(handle.co_names):
        problems.append("RTCRtpReceiver._handle_rtp_packet no longer sets packet._data, calls "
                        "self.__jitter_buffer.add() and puts the frame, its timestamp mapped by "
                        "self.__timestamp_mapper, on self.__decoder_queue")
    init = getattr(RTCRtpReceiver.__init__, "__code__", None)
    builds = {RECEIVER_BUFFER, "JitterBuffer", RECEIVER_QUEUE, RECEIVER_MAPPER}
    if init is None or not builds <= set(init.co_names):
        problems.append("RTCRtpReceiver.__init__ no longer builds self.__jitter_buffer from JitterBuffer "
                        "(and its decoder queue and timestamp mapper)")
    missing = [m for m in BUFFER_METHODS if not callable(getattr(JitterBuffer, m, None))]
    if missing:
        problems.append(f"JitterBuffer lacks {missing}")
    elif not {"_remove_frame", "smart_remove", "remove", "_origin", "_packets"} <= set(
            JitterBuffer.add.__code__.co_names):
        problems.append("JitterBuffer.add() no longer goes through _remove_frame/remove/smart_remove")
    if not problems:
        try:
            got = _self_test()
        except Exception as e:  # noqa: BLE001 - any failure here means the internals moved
            got = f"{type(e).__name__}: {e}"
        if got != _SELF_TEST_EXPECTED:
            problems.append(f"MarkerJitterBuffer self-test gave {got!r}, expected {_SELF_TEST_EXPECTED!r}")
    if problems:
        raise IncompatibleAiortc(f"{where}: marker-bit frame completion (server/media/jitter.py) cannot be "
                                 "installed: " + "; ".join(problems))
    if getattr(aiortc, "__version__", None) not in VERIFIED_AIORTC:
        log.warning("%s: server/media/jitter.py was verified on aiortc %s; its checks pass on this one",
                    where, ", ".join(VERIFIED_AIORTC))
    _checked = True


# (add() call index, ((timestamp, data), ...)) of the frames out of a fixed sequence, add()'s
# then take_ready()'s: frame 0 (stream start) by the next timestamp, frame 1 on its marker,
# padding dropped, frame 2 on its marker, frame 3 (17 late) when 17 arrives, frames 4 and 5
# when 20, late, makes both whole.
_SELF_TEST_EXPECTED = [(2, ((0, b"10,11,"),)), (3, ((1, b"12,13,"),)), (5, ((2, b"15,"),)),
                       (8, ((3, b"16,17,18,"),)), (12, ((4, b"19,20,21,"), (5, b"22,")))]


def _self_test() -> list:
    def packet(seq, ts, marker=0, data=None):
        p = RtpPacket(sequence_number=seq, timestamp=ts, marker=marker)
        p._data = f"{seq},".encode() if data is None else data
        return p

    packets = [packet(10, 0), packet(11, 0, 1), packet(12, 1), packet(13, 1, 1), packet(14, 1, 0, b""),
               packet(15, 2, 1), packet(16, 3), packet(18, 3, 1), packet(17, 3), packet(19, 4), packet(21, 4, 1),
               packet(22, 5, 1), packet(20, 4)]
    buffer = MarkerJitterBuffer(16)
    out = []
    for i, p in enumerate(packets):
        _, frame = buffer.add(p)
        frames = ([frame] if frame is not None else []) + buffer.take_ready()
        if frames:
            out.append((i, tuple((f.timestamp, f.data) for f in frames)))
    return out


def install(receiver, enabled: bool | None = None) -> bool:
    """Make a video RTCRtpReceiver complete frames on the marker bit. Call it before media
    flows (the peer connection's "track" event is early enough); packets already buffered
    are handed over. False (and nothing changed) when turned off: `enabled`, or ENABLED when
    it is None. IncompatibleAiortc if aiortc is not built the way this module expects;
    ValueError for an audio receiver."""
    if not (ENABLED if enabled is None else enabled):
        log.info("marker-bit frame completion is off: %r keeps aiortc's jitter buffer", receiver)
        return False
    check_aiortc()
    current = getattr(receiver, RECEIVER_BUFFER, None)
    if isinstance(current, MarkerJitterBuffer):
        current.enabled = True
        return True
    if type(current) is not JitterBuffer or not all(hasattr(current, a) for a in BUFFER_STATE):
        raise IncompatibleAiortc(f"{receiver!r} has no {RECEIVER_BUFFER} that is an aiortc JitterBuffer "
                                 f"(found {type(current).__name__}): marker-bit frame completion "
                                 "cannot be installed (server/media/jitter.py)")
    if not current._is_video or current._prefetch:
        raise ValueError("marker-bit frame completion is for video receivers only")
    decoder_queue, mapper = getattr(receiver, RECEIVER_QUEUE, None), getattr(receiver, RECEIVER_MAPPER, None)
    if not isinstance(decoder_queue, queue.Queue) or not callable(getattr(mapper, "map", None)):
        raise IncompatibleAiortc(f"{receiver!r} has no {RECEIVER_QUEUE} queue or {RECEIVER_MAPPER}: "
                                 "marker-bit frame completion cannot be installed (server/media/jitter.py)")
    buffer = MarkerJitterBuffer(current.capacity, is_video=True)
    buffer._origin, buffer._packets = current._origin, current._packets  # start unknown: stays False
    setattr(receiver, RECEIVER_BUFFER, buffer)
    if getattr(receiver, RECEIVER_BUFFER, None) is not buffer:
        raise IncompatibleAiortc(f"{receiver!r} did not take the new jitter buffer")
    _decode_all_ready(decoder_queue, mapper, buffer)
    return True


def _decode_all_ready(decoder_queue: queue.Queue, mapper, buffer: MarkerJitterBuffer) -> None:
    """The receiver queues the one frame add() returns (its timestamp mapped) for its decoder
    thread; right behind it, queue the other frames the same packet made whole, mapped the same
    way, so none waits for a later packet (with one-packet frames it would wait for good: every
    packet would bring a new frame and hand out an old one)."""
    put = type(decoder_queue).put.__get__(decoder_queue)  # the queue's own put, once

    def put_then_ready(item, block=True, timeout=None):
        put(item, block, timeout)
        if item is not None:  # None stops the decoder thread
            codec = item[0]
            for frame in buffer.take_ready():
                frame.timestamp = mapper.map(frame.timestamp)
                put((codec, frame), block, timeout)

    decoder_queue.put = put_then_ready


def is_installed(receiver) -> bool:
    buffer = getattr(receiver, RECEIVER_BUFFER, None)
    return isinstance(buffer, MarkerJitterBuffer) and buffer.enabled


def install_for_track(pc, track, enabled: bool | None = None) -> bool:
    """install() on the receiver of remote video `track` of peer connection `pc` (call it from
    the "track" event, which aiortc fires before any media arrives)."""
    return install(receiver_of(pc, track), enabled)


def receiver_of(pc, track):
    """The RTCRtpReceiver of remote `track` of peer connection `pc`."""
    receiver = next((t.receiver for t in pc.getTransceivers() if t.receiver.track is track), None)
    if receiver is None:
        raise IncompatibleAiortc("no transceiver of the peer connection receives this track")
    return receiver


def install_all(pc, enabled: bool | None = None) -> int:
    """install() on every video receiver `pc` has now (e.g. after setRemoteDescription or
    addTransceiver); the number installed."""
    receivers = [t.receiver for t in pc.getTransceivers() if t.kind == "video"]
    return sum(install(r, enabled) for r in receivers)


def shorten_audio_buffer(pc, track) -> None:
    """Audio of remote `track` leaves aiortc's receive buffer after one packet, not four.

    aiortc buffers audio with prefetch=4: a 20 ms Opus frame goes to the decoder only once
    four later frames have arrived, 80 ms after it could. A server that forwards the voice to
    viewers (rooms.py) gains nothing from that: each viewer's own jitter buffer absorbs
    network jitter, and the voice must not arrive later than the avatar it goes with. With
    prefetch 0 a frame leaves when the next packet arrives (reordering is still handled by
    sequence number). IncompatibleAiortc if the receiver's buffer is not what aiortc 1.16 builds."""
    check_aiortc()
    receiver = receiver_of(pc, track)
    buffer = getattr(receiver, RECEIVER_BUFFER, None)
    if type(buffer) is not JitterBuffer or buffer._is_video or not hasattr(buffer, "_prefetch"):
        raise IncompatibleAiortc(f"no aiortc audio JitterBuffer for this track (found {type(buffer).__name__}): "
                                 "its prefetch cannot be shortened (server/media/jitter.py)")
    buffer._prefetch = 0


def tap_encoded(pc, track, callback) -> None:
    """callback(codec, frame) with every encoded frame of remote `track` (an aiortc JitterFrame:
    `data` bytes, `timestamp` mapped), on the event loop, just before aiortc queues it for
    decoding: lets the server forward a codec's packets untouched (rooms.py forwards Opus).
    The callback must not raise. IncompatibleAiortc if the receiver has no decoder queue."""
    check_aiortc()
    receiver = receiver_of(pc, track)
    decoder_queue = getattr(receiver, RECEIVER_QUEUE, None)
    if not isinstance(decoder_queue, queue.Queue):
        raise IncompatibleAiortc(f"no {RECEIVER_QUEUE} queue for this track: encoded frames cannot be tapped")
    put = decoder_queue.put  # maybe already wrapped (video: _decode_all_ready); keep it

    def tapped(item, block=True, timeout=None):
        if item is not None:
            callback(*item)
        put(item, block, timeout)

    decoder_queue.put = tapped
