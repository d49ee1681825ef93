"""Marker-bit frame completion (server/media/jitter.py): exactly which frames come out, and when."""
from __future__ import annotations

import asyncio
import fractions
import random
import statistics
import time

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpCodecParameters
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

import server.media.jitter as jitter
from server.media.jitter import (RECEIVER_BUFFER, IncompatibleAiortc, MarkerJitterBuffer, check_aiortc, install,
                           install_all, install_for_track, is_installed)


def packet(seq: int, ts: int, marker: bool = False, payload: bool = True) -> RtpPacket:
    p = RtpPacket(sequence_number=seq % 65536, timestamp=ts, marker=int(marker))
    p._data = f"{seq % 65536}.".encode() if payload else b""  # what the depayloader leaves; frames join these
    return p


def frame_packets(first_seq: int, ts: int, n: int) -> list[RtpPacket]:
    """A frame of n packets, the last with the marker bit."""
    return [packet(first_seq + i, ts, i == n - 1) for i in range(n)]


def feed(buffer, packets, drain: bool = False) -> list[tuple[int, int, bytes]]:
    """(index of the add() call, timestamp, data) for every frame that came out; with `drain`,
    also the frames take_ready() gives after each add() (as installed on a receiver)."""
    out = []
    for i, p in enumerate(packets):
        _, frame = buffer.add(p)
        frames = ([frame] if frame is not None else []) + (buffer.take_ready() if drain else [])
        out += [(i, f.timestamp, f.data) for f in frames]
    return out


def aiortc_buffer() -> JitterBuffer:
    return JitterBuffer(capacity=512, is_video=True)  # as RTCRtpReceiver builds it for video


def data(first_seq: int, n: int) -> bytes:
    return b"".join(f"{s % 65536}.".encode() for s in range(first_seq, first_seq + n))


def stream(first_seq=100, frames=4, per_frame=3, ts0=0):
    """Consecutive frames of `per_frame` packets, 3000 ticks (30 fps) apart."""
    return [p for k in range(frames) for p in frame_packets(first_seq + k * per_frame, ts0 + 3000 * k, per_frame)]


def test_in_order_frames_come_out_on_their_marker_packet():
    packets = stream(frames=4, per_frame=3)
    out = feed(MarkerJitterBuffer(512), packets)
    # Frame 0 is the first seen: it may not start at the first packet received, so it
    # completes as in aiortc, on frame 1's first packet (call 3). From then on each frame
    # leaves on its own marker packet, the last one too.
    assert out == [(3, 0, data(100, 3)), (5, 3000, data(103, 3)), (8, 6000, data(106, 3)),
                   (11, 9000, data(109, 3))]
    # aiortc's own buffer: each frame on the next frame's first packet, the last never.
    assert feed(aiortc_buffer(), packets) == [(3, 0, data(100, 3)), (6, 3000, data(103, 3)),
                                              (9, 6000, data(106, 3))]


def test_reordered_packets_leave_when_the_frame_is_whole():
    packets = stream(frames=3, per_frame=3)  # seq 100..108
    f1 = packets[3:6]
    order = packets[:4] + [f1[2], f1[1]] + packets[6:]  # frame 1's marker before its middle
    assert feed(MarkerJitterBuffer(512), order) == [(3, 0, data(100, 3)), (5, 3000, data(103, 3)),
                                                     (8, 6000, data(106, 3))]


def test_a_frame_made_whole_late_goes_first_and_the_next_right_behind_it():
    packets = stream(frames=4, per_frame=2)  # seq 100..107
    late = packets[3]  # frame 1's marker packet comes after all of frame 2
    order = packets[:3] + packets[4:6] + [late] + packets[6:]
    # add() returns one frame (the receiver's contract): frame 1 on the late packet (call 5);
    # frame 2, whole too, waits in take_ready() (install() has the receiver decode it right
    # behind frame 1); left there, the next add() returns it (call 6).
    buffer = MarkerJitterBuffer(512)
    assert feed(buffer, order[:6]) == [(2, 0, data(100, 2)), (5, 3000, data(102, 2))]
    assert [(f.timestamp, f.data) for f in buffer.take_ready()] == [(6000, data(104, 2))]
    assert buffer.take_ready() == []
    assert feed(buffer, order[6:]) == [(1, 9000, data(106, 2))]
    assert feed(MarkerJitterBuffer(512), order) == [(2, 0, data(100, 2)), (5, 3000, data(102, 2)),
                                                     (6, 6000, data(104, 2)), (7, 9000, data(106, 2))]
    assert [i for i, _, _ in feed(aiortc_buffer(), order)] == [2, 5, 6]


def test_a_lost_middle_packet_never_lets_a_frame_out_until_it_arrives():
    packets = stream(frames=4, per_frame=3)  # seq 100..111
    lost = packets[:4] + packets[5:]  # frame 1's middle packet (101 + 3 = 104) is lost
    assert [ts for _, ts, _ in feed(MarkerJitterBuffer(512), lost)] == [0]
    assert [ts for _, ts, _ in feed(aiortc_buffer(), lost)] == [0]  # aiortc: stuck at the gap too
    # Its retransmission (NACK/RTX) arrives after the rest: frame 1 leaves on it, then the
    # others, one per add().
    retransmitted = lost + [packets[4], packet(112, 12000, True), packet(113, 15000, True)]
    out = feed(MarkerJitterBuffer(512), retransmitted)
    assert out == [(3, 0, data(100, 3)), (11, 3000, data(103, 3)), (12, 6000, data(106, 3)),
                   (13, 9000, data(109, 3))]


def test_a_lost_marker_packet_costs_what_it_costs_today():
    packets = stream(frames=3, per_frame=3)  # seq 100..108
    marker_lost = packets[:5] + packets[6:]  # frame 1's last packet (105, the marker) is lost
    ours = feed(MarkerJitterBuffer(512), marker_lost)
    assert ours == feed(aiortc_buffer(), marker_lost) == [(3, 0, data(100, 3))]
    # When it is retransmitted, frame 1 leaves on it and frame 2 on the next add().
    again = marker_lost + [packets[5], packet(109, 9000, True)]
    assert feed(MarkerJitterBuffer(512), again) == [(3, 0, data(100, 3)), (8, 3000, data(103, 3)),
                                                     (9, 6000, data(106, 3)), ]


def test_frames_across_the_sequence_number_wrap_around():
    packets = stream(first_seq=65530, frames=5, per_frame=3)  # 65530 .. 65535, 0 .. 8
    out = feed(MarkerJitterBuffer(512), packets)
    assert out == [(3, 0, data(65530, 3)), (5, 3000, data(65533, 3)), (8, 6000, data(65536, 3)),
                   (11, 9000, data(65539, 3)), (14, 12000, data(65542, 3))]
    assert data(65533, 3) == b"65533.65534.65535." and data(65536, 3) == b"0.1.2."
    # A frame whose packets straddle the wrap, its marker packet arriving first.
    straddle = stream(first_seq=65529, frames=1, per_frame=2) + [packet(0, 3000, True), packet(65531, 3000),
                                                                   packet(65535, 3000), packet(65532, 3000),
                                                                   packet(65533, 3000), packet(65534, 3000),
                                                                   packet(1, 6000, True)]
    out = feed(MarkerJitterBuffer(512), straddle)
    # frame 0 by the next timestamp on the 3rd add(); frame 1 (65531 .. 0) on its last missing packet.
    assert out == [(3, 0, data(65529, 2)), (7, 3000, data(65531, 6)), (8, 6000, b"1.")]


def test_a_frame_of_many_packets_is_joined_in_order():
    keyframe = frame_packets(102, 6000, 40)
    shuffled = keyframe[:]
    random.Random(7).shuffle(shuffled)
    packets = stream(frames=2, per_frame=1) + shuffled  # 100, 101, then 40 packets in any order
    out = feed(MarkerJitterBuffer(512), packets)
    # 100 by the next timestamp, 101 on its marker, the 40-packet frame whole, in sequence
    # order, on the add() of whichever of its packets arrives last.
    assert out == [(1, 0, b"100."), (2, 3000, b"101."), (len(packets) - 1, 6000, data(102, 40))]
    in_order = stream(frames=2, per_frame=1) + keyframe
    assert feed(MarkerJitterBuffer(512), in_order)[-1] == (len(in_order) - 1, 6000, data(102, 40))


def test_a_frame_is_never_handed_out_twice():
    packets = stream(frames=3, per_frame=2)  # seq 100..105
    duplicate = packets[:4] + [packets[2], packets[3]] + packets[4:]  # frame 1 again (a retransmission)
    out = feed(MarkerJitterBuffer(512), duplicate)
    assert out == [(2, 0, data(100, 2)), (3, 3000, data(102, 2)), (7, 6000, data(104, 2))]


def test_padding_after_a_marker_is_dropped_not_handed_out_as_an_empty_frame():
    # libwebrtc without RTX sends probe padding on the media SSRC right after a marker packet,
    # with that frame's timestamp and no payload. An empty frame would put the decoder into
    # drain mode for good (every later decode: EOFError).
    packets = (stream(frames=2, per_frame=2)  # 100..103
               + [packet(104, 3000, payload=False), packet(105, 3000, payload=False)]
               + [packet(106, 6000, True), packet(107, 9000, True)])
    ours = feed(MarkerJitterBuffer(512), packets)
    assert ours == [(2, 0, data(100, 2)), (3, 3000, data(102, 2)), (6, 6000, b"106."), (7, 9000, b"107.")]
    # aiortc folds the padding into frame 1 (same bytes, joined with b"").
    assert feed(aiortc_buffer(), packets) == [(2, 0, data(100, 2)), (6, 3000, data(102, 2)), (7, 6000, b"106.")]
    # Padding with the marker bit set, or a payload-less first packet of a frame: same.
    assert feed(MarkerJitterBuffer(512), stream(frames=2, per_frame=2) + [packet(104, 3000, True, False),
                                                                           packet(105, 6000, payload=False),
                                                                           packet(106, 6000, True)]) \
        == [(2, 0, data(100, 2)), (3, 3000, data(102, 2)), (6, 6000, b"106.")]


def test_a_reset_on_heavy_reordering_waits_for_the_next_timestamp_once():
    buffer = MarkerJitterBuffer(512)
    feed(buffer, stream(first_seq=100, frames=2, per_frame=2))
    jumped = stream(first_seq=104 - 150, frames=3, per_frame=2, ts0=90000)  # 150 behind: aiortc resets
    # The first frame after the reset may not start at the first slot: next timestamp; then markers.
    assert [(i, ts) for i, ts, _ in feed(buffer, jumped)] == [(2, 90000), (3, 93000), (5, 96000)]


def test_an_overflow_cut_behind_a_gap_never_lets_a_partial_frame_out():
    # capacity 16: frame X (0, 1 lost, 2) and frame Y (3 lost, 4, 5) are stuck; packet 19 makes
    # aiortc's smart_remove drop X and stop at 4, the middle of Y: not a known frame start.
    packets = [packet(0, 0), packet(2, 0, True), packet(4, 3000), packet(5, 3000, True), packet(19, 9000, True),
               packet(20, 12000, True)]
    ours = feed(MarkerJitterBuffer(16), packets)
    assert ours == feed(JitterBuffer(16, is_video=True), packets) == [(5, 9000, b"19.")]  # never b"4.5."


def test_an_overflow_cut_right_after_a_packet_that_was_there_is_a_frame_start():
    # Frame X (0, 1 lost, 2) is stuck; 3, 4 (frame Y) and 5 (frame Z) wait behind it. Packet 19
    # makes smart_remove drop X and Y and stop at 5, which follows 4: Z leaves on its marker.
    packets = [packet(0, 0), packet(2, 0, True), packet(3, 3000), packet(4, 3000, True), packet(5, 6000, True),
               packet(19, 9000, True)]
    assert feed(MarkerJitterBuffer(16), packets) == [(5, 6000, b"5.")]
    assert feed(JitterBuffer(16, is_video=True), packets) == []  # aiortc: Z waits for 6


def test_the_first_frame_completes_by_the_next_timestamp_and_the_next_frame_with_it():
    # One-packet frames: frame 1's only packet both ends frame 0 (aiortc's rule) and is
    # whole itself; it waits in take_ready(), not for frame 2.
    buffer = MarkerJitterBuffer(512)
    _, frame = buffer.add(packet(100, 0, True))
    assert frame is None and buffer.take_ready() == []
    _, frame = buffer.add(packet(101, 3000, True))
    assert (frame.timestamp, frame.data) == (0, b"100.")
    assert [(f.timestamp, f.data) for f in buffer.take_ready()] == [(3000, b"101.")]
    _, frame = buffer.add(packet(102, 6000, True))
    assert (frame.timestamp, frame.data) == (6000, b"102.") and buffer.take_ready() == []
    assert (buffer.frames_on_next_timestamp, buffer.frames_on_marker) == (1, 2)


@pytest.mark.parametrize("seed", range(10))
def test_turned_off_it_is_exactly_aiortcs_buffer(seed):
    arrived, _, _ = simulate(random.Random(seed), frames=60)
    theirs = [f for f in feed(aiortc_buffer(), arrived) if f[2]]  # (it never hands out an empty frame)
    assert feed(MarkerJitterBuffer(512, enabled=False), arrived, drain=True) == theirs


def test_turned_off_then_on():
    buffer = MarkerJitterBuffer(512, enabled=False)
    clean = stream(frames=6, per_frame=2)
    assert [i for i, _, _ in feed(buffer, clean[:6])] == [2, 4]  # aiortc's rule
    buffer.enabled = True
    # Frame 2 was waiting for frame 3's first packet; turned on, it leaves on that packet's
    # add() by its marker, and every later frame on its own marker.
    assert [(i, ts) for i, ts, _ in feed(buffer, clean[6:])] == [(0, 6000), (1, 9000), (3, 12000), (5, 15000)]


def simulate(rng: random.Random, frames: int):
    """A random stream: frames of 1..6 packets, padding after some markers, then on the way
    losses, late packets (retransmissions), local reordering, duplicates. The first packet
    arrives first."""
    sent, full, seq = [], {}, rng.randrange(65536)
    for k in range(frames):
        n = rng.randint(1, 6)
        ts = (12345 + 3000 * k) % 2 ** 32
        ps = frame_packets(seq, ts, n)
        full[ts] = b"".join(p._data for p in ps)
        sent += ps
        seq += n
        if rng.random() < 0.1:
            sent.append(packet(seq, ts, payload=False))
            seq += 1
    arrivals = [(-1.0, sent[0])]
    for i, p in enumerate(sent[1:], 1):
        r = rng.random()
        if r < 0.03:
            continue  # lost for good
        delay = rng.randint(5, 40) if r < 0.08 else rng.randint(1, 3) if r < 0.2 else 0
        arrivals.append((i + delay + rng.random() / 2, p))
        if r > 0.97:
            arrivals.append((i + rng.randint(1, 20) + 0.5, p))  # duplicate
    return [p for _, p in sorted(arrivals, key=lambda a: a[0])], full, sent


def ideal(arrived, full, sent) -> list[tuple[int, int, bytes]]:
    """When each frame can go out at the earliest, in order: on the add() by which every packet
    up to its marker has arrived (frame 0, whose start is not known: up to the next frame's
    first packet), and not before the frame before it."""
    first = {}
    for i, p in enumerate(arrived):
        first.setdefault(p.sequence_number, i)
    by_index, latest = [], -1
    for p in sent:
        latest = max(latest, first.get(p.sequence_number, float("inf")))
        by_index.append(latest)
    ends = [(j, p.timestamp) for j, p in enumerate(sent) if p.marker]  # (index of the last packet needed, frame)
    ends[0] = (next(j for j, p in enumerate(sent) if p.timestamp != sent[0].timestamp), sent[0].timestamp)
    out, previous = [], -1
    for j, ts in ends:
        previous = max(previous, by_index[j])
        if previous == float("inf"):
            break
        out.append((previous, ts, full[ts]))
    return out


@pytest.mark.parametrize("drain", [True, False], ids=["installed", "buffer-alone"])
@pytest.mark.parametrize("seed", range(40))
def test_random_loss_and_reordering_never_an_incomplete_or_repeated_frame(seed, drain):
    arrived, full, sent = simulate(random.Random(seed), frames=60)
    ours = feed(MarkerJitterBuffer(512), arrived, drain=drain)
    theirs = feed(aiortc_buffer(), arrived)
    stamps = [ts for _, ts, _ in ours]
    assert stamps == sorted(set(stamps)), "a frame went out twice, or out of order"
    for i, ts, d in ours:
        assert d == full[ts], f"frame {ts} went out incomplete on add() {i}"
    when = {ts: i for i, ts, _ in ours}
    for i, ts, d in theirs:
        if d == full[ts]:  # every whole frame aiortc hands out, we hand out, no later
            assert ts in when and when[ts] <= i
    if drain:  # installed on a receiver: every frame exactly as early as it can be
        assert ours == ideal(arrived, full, sent)


# --- aiortc's receiver, as the installer expects it --------------------------------------------


async def receivers_of_a_peer_connection():
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    return pc, {t.kind: t.receiver for t in pc.getTransceivers()}


async def test_aiortc_receivers_hold_the_buffer_install_replaces():
    # If this fails, aiortc's internals moved: server/media/jitter.py needs a look (install() raises
    # IncompatibleAiortc there, and the session logs it and runs one frame later).
    check_aiortc()
    pc, found = await receivers_of_a_peer_connection()
    try:
        video = getattr(found["video"], RECEIVER_BUFFER)
        assert type(video) is JitterBuffer and video.capacity == 512 and video._is_video and video._prefetch == 0
        assert install(found["video"], enabled=True)
        assert type(getattr(found["video"], RECEIVER_BUFFER)) is MarkerJitterBuffer
        assert is_installed(found["video"])
        assert getattr(found["video"], RECEIVER_BUFFER).capacity == 512
        assert install(found["video"], enabled=True)  # again: a no-op
        with pytest.raises(ValueError):
            install(found["audio"], enabled=True)
        assert type(getattr(found["audio"], RECEIVER_BUFFER)) is JitterBuffer
    finally:
        await pc.close()


async def test_the_receiver_decodes_every_frame_a_packet_makes_whole():
    """aiortc's own RTCRtpReceiver._handle_rtp_packet, fed VP8 RTP packets: what reaches its
    decoder queue, on which packet, with the timestamps its mapper gives."""
    pc, found = await receivers_of_a_peer_connection()
    receiver = found["video"]
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)

    def rtp(seq, ts):  # one-packet VP8 frames: descriptor S=1, PID=0, then the "frame"
        p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=ts, marker=1, ssrc=1234)
        p.payload = b"\x10" + f"{seq}.".encode()
        return p

    order = [rtp(100, 9000), rtp(101, 12000), rtp(103, 18000), rtp(104, 21000), rtp(102, 15000), rtp(105, 24000)]

    async def decoded(receiver):
        setattr(receiver, "_RTCRtpReceiver__codecs", {96: vp8})  # what receive() would set up
        setattr(receiver, "_RTCRtpReceiver__decoder_thread", True)  # only tested for truth here
        decoder_queue = getattr(receiver, "_RTCRtpReceiver__decoder_queue")
        got = []
        try:
            for i, p in enumerate(order):
                await receiver._handle_rtp_packet(p, arrival_time_ms=0)
                while not decoder_queue.empty():
                    codec, frame = decoder_queue.get_nowait()
                    assert codec is vp8
                    got.append((i, frame.timestamp, frame.data))
        finally:
            setattr(receiver, "_RTCRtpReceiver__decoder_thread", None)
        return got

    try:
        plain = await decoded(receiver)
        # aiortc: each frame on the next one's packet, one per packet: 101 waits for 102 (call 4)
        assert plain == [(1, 0, b"100."), (4, 3000, b"101."), (5, 6000, b"102.")]
        pc2, found2 = await receivers_of_a_peer_connection()
        try:
            assert install(found2["video"], enabled=True)
            ours = await decoded(found2["video"])
        finally:
            await pc2.close()
        # Installed: 101 on its own packet, right behind 100 (the stream start); 102 fills the
        # gap and 102, 103, 104 go to the decoder on that one packet; 105 on its own.
        assert ours == [(1, 0, b"100."), (1, 3000, b"101."), (4, 6000, b"102."), (4, 9000, b"103."),
                        (4, 12000, b"104."), (5, 15000, b"105.")]
    finally:
        await pc.close()


async def test_install_all_and_the_switches():
    pc, found = await receivers_of_a_peer_connection()
    try:
        assert install_all(pc, enabled=False) == 0 and not is_installed(found["video"])
        assert jitter.ENABLED
        jitter.ENABLED = False
        try:
            assert not install(found["video"]) and not is_installed(found["video"])
            assert install(found["video"], enabled=True)  # an explicit argument wins
        finally:
            jitter.ENABLED = True
        getattr(found["video"], RECEIVER_BUFFER).enabled = False  # turned off at run time
        assert not is_installed(found["video"])
        assert install_all(pc) == 1 and is_installed(found["video"])
    finally:
        await pc.close()


def test_install_refuses_a_receiver_it_does_not_understand():
    class Stranger:
        pass

    with pytest.raises(IncompatibleAiortc):
        install(Stranger(), enabled=True)
    odd = Stranger()
    setattr(odd, RECEIVER_BUFFER, object())
    with pytest.raises(IncompatibleAiortc):
        install(odd, enabled=True)


@pytest.mark.parametrize("moved", ["receiver", "buffer"])
def test_check_aiortc_fails_loudly_when_aiortc_internals_move(monkeypatch, moved):
    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    if moved == "receiver":
        async def _handle_rtp_packet(self, packet, arrival_time_ms):  # no longer uses __jitter_buffer
            pass

        monkeypatch.setattr(RTCRtpReceiver, "_handle_rtp_packet", _handle_rtp_packet)
    else:  # the buffer hands frames out differently: the self-test sees it
        monkeypatch.setattr(JitterBuffer, "_remove_frame", lambda self, sequence_number: None)
    monkeypatch.setattr(jitter, "_checked", False)
    with pytest.raises(IncompatibleAiortc):
        check_aiortc()


# --- end to end: two aiortc peer connections on loopback --------------------------------------

FPS = 5
INTERVAL = 1 / FPS
FRAMES = 16


class PacedTrack(MediaStreamTrack):
    """FRAMES synthetic frames at FPS, each a flat grey coding its index; then nothing more."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self.sent: dict[int, float] = {}  # index -> when recv() handed it to the encoder
        self._start = None

    async def recv(self):
        i = len(self.sent)
        if i >= FRAMES:
            await asyncio.Event().wait()  # no next frame: the last one must not need it
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + i * INTERVAL - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 20 + 12 * i, np.uint8), format="rgb24")
        frame.pts, frame.time_base = i * 90000 // FPS, fractions.Fraction(1, 90000)
        self.sent[i] = time.monotonic()
        return frame


async def send_and_receive(marker_completion: bool):
    """Latency (s) of every frame received by a peer connection with or without the buffer."""
    sender, receiver = (RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2))
    track = PacedTrack()
    received: dict[int, float] = {}
    tasks = []

    async def collect(remote):
        while True:
            frame = await remote.recv()
            now = time.monotonic()
            index = round(frame.pts * FPS / 90000)  # pts from 0 at the first frame, which is frame 0
            grey = float(frame.to_ndarray(format="rgb24").mean())
            assert abs(grey - (20 + 12 * index)) < 6, (index, grey)
            received[index] = now

    def on_track(remote):
        assert install_for_track(receiver, remote, enabled=marker_completion) == marker_completion
        tasks.append(asyncio.ensure_future(collect(remote)))

    receiver.on("track", on_track)
    sender.addTrack(track)
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (len(track.sent) < FRAMES or len(received) < FRAMES):
            if len(track.sent) == FRAMES and time.monotonic() > track.sent[FRAMES - 1] + 3 * INTERVAL:
                break  # all sent; whatever has not come out by now waits for a frame that never comes
            await asyncio.sleep(0.02)
        buffers = [getattr(t.receiver, RECEIVER_BUFFER) for t in receiver.getTransceivers() if t.kind == "video"]
        return {i: received[i] - track.sent[i] for i in received}, buffers
    finally:
        for t in tasks:
            t.cancel()
        await sender.close()
        await receiver.close()


async def test_end_to_end_frames_leave_on_their_marker_without_waiting_for_the_next():
    (on, on_buffers), (off, off_buffers) = await asyncio.wait_for(
        asyncio.gather(send_and_receive(True), send_and_receive(False)), timeout=30)
    assert [type(b) for b in on_buffers] == [MarkerJitterBuffer]
    assert [type(b) for b in off_buffers] == [JitterBuffer]
    # With the buffer every frame is decoded, the last one too (no next frame ever comes),
    # well inside the 200 ms interval; all but the first (the stream start) on its marker.
    assert sorted(on) == list(range(FRAMES)), sorted(on)
    assert on_buffers[0].frames_on_marker == FRAMES - 1 and on_buffers[0].frames_on_next_timestamp == 1
    after_first = [on[i] for i in range(1, FRAMES)]
    assert statistics.median(after_first) < 0.25 * INTERVAL, after_first
    assert max(after_first) < 0.75 * INTERVAL, after_first  # none waited for the next frame
    # Without it each frame waits for the next frame's first packet, about one interval,
    # and the last one never comes out.
    assert sorted(off) == list(range(FRAMES - 1)), sorted(off)
    assert statistics.median(off.values()) > 0.75 * INTERVAL, sorted(off.values())
    assert statistics.median(off.values()) - statistics.median(on.values()) > 0.5 * INTERVAL


# --- the server and the bench client install it (server/session.py, server/bench/client.py) ----


@pytest.mark.parametrize("enabled", [True, False])
async def test_server_and_bench_client_install_it_unless_turned_off(tmp_path, monkeypatch, enabled):
    import numpy as np

    from helpers import Client, ClipTrack, running_server, wait_for

    frames = [np.full((96, 96, 3), 40 * (i % 5), np.uint8) for i in range(10)]
    async with running_server(tmp_path, monkeypatch, marker_completion=enabled) as srv:
        client = Client(srv.ws_url)
        client.marker_completion = enabled
        await client.connect()
        assert (await client.hello())["type"] == "session"
        await client.start_media(ClipTrack(frames, loop=True))
        await wait_for(lambda: srv.state.sessions and next(iter(srv.state.sessions.values())).have_video,
                       10, "the camera track")
        session = next(iter(srv.state.sessions.values()))
        video = [t.receiver for t in session.pc.getTransceivers() if t.kind == "video"]
        assert video and all(is_installed(r) == enabled for r in video)
        mine = [t.receiver for t in client.pc.getTransceivers() if t.kind == "video"]
        assert mine and all(is_installed(r) == enabled for r in mine)
        await client.close()
