"""Marker-bit frame completion (server/jitter.py): exactly which frames come out, and when."""
from __future__ import annotations

import pytest
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from server.jitter import IncompatibleAiortc, MarkerJitterBuffer, install, is_installed


def packet(seq: int, ts: int, marker: bool = False) -> RtpPacket:
    p = RtpPacket(sequence_number=seq % 65536, timestamp=ts, marker=int(marker))
    p._data = f"{seq % 65536}.".encode()  # what the depayloader would leave; frames join these
    return p


def frame_packets(first_seq: int, ts: int, n: int) -> list[RtpPacket]:
    """A frame of n packets, the last with the marker bit."""
    return [packet(first_seq + i, ts, i == n - 1) for i in range(n)]


def feed(buffer, packets) -> list[tuple[int, int, bytes]]:
    """(index of the add() call, timestamp, data) for every frame that came out."""
    out = []
    for i, p in enumerate(packets):
        _, frame = buffer.add(p)
        if frame is not None:
            out.append((i, frame.timestamp, frame.data))
    return out


def data(first_seq: int, n: int) -> bytes:
    return b"".join(f"{s % 65536}.".encode() for s in range(first_seq, first_seq + n))


def stream(first_seq=100, frames=4, per_frame=3, ts0=0):
    """Consecutive frames of `per_frame` packets, 3000 ticks (30 fps) apart."""
    return [p for k in range(frames) for p in frame_packets(first_seq + k * per_frame, ts0 + 3000 * k, per_frame)]


def test_in_order_frames_come_out_on_their_marker_packet():
    packets = stream(frames=4, per_frame=3)
    out = feed(MarkerJitterBuffer(512), packets)
    # Each frame leaves on its marker packet (calls 2, 5, 8, 11).
    assert out == [(2, 0, data(100, 3)), (5, 3000, data(103, 3)), (8, 6000, data(106, 3)),
                   (11, 9000, data(109, 3))]
    # aiortc's own buffer: each frame one packet-of-the-next-frame later, the last never.
    assert [i for i, _, _ in feed(JitterBuffer(512, is_video=True), packets)] == [3, 6, 9]


def test_reordered_packets_wait_for_the_frame_to_be_whole():
    packets = stream(frames=3, per_frame=3)
    frame1 = packets[3:6]
    order = packets[:3] + [packets[6]] + [frame1[0], frame1[2], frame1[1]] + packets[7:]
    out = feed(MarkerJitterBuffer(512), order)
    # Frame 2's first packet comes early, frame 1's marker before its middle packet: frame 1
    # leaves only when it is whole (call 6), in order, and frame 2 right after.
    assert [(i, ts, d) for i, ts, d in out] == [(2, 0, data(100, 3)), (6, 3000, data(103, 3)),
                                                (8, 6000, data(106, 3))]


def test_lost_middle_packet_never_lets_a_frame_out():
    packets = stream(frames=4, per_frame=3)
    lost = packets[:4] + packets[5:]  # frame 1's middle packet never arrives
    out = feed(MarkerJitterBuffer(512), lost)
    assert [ts for _, ts, _ in out] == [0]  # frame 1 is never decoded incomplete, nor any after it
    # (aiortc behaves the same way: the gap stops its scan; NACK/RTX or a PLI recovers.)
    assert [ts for _, ts, _ in feed(JitterBuffer(512, is_video=True), lost)] == [0]


def test_lost_marker_packet_costs_what_it_costs_today():
    packets = stream(frames=3, per_frame=3)
    marker_lost = packets[:5] + packets[6:]  # frame 1's last packet (the marker) is lost
    out = feed(MarkerJitterBuffer(512), marker_lost)
    ours = [ts for _, ts, _ in out]
    aiortcs = [ts for _, ts, _ in feed(JitterBuffer(512, is_video=True), marker_lost)]
    assert 3000 not in ours and ours == aiortcs == [0]


def test_single_packet_frames_across_sequence_wrap_around():
    packets = [packet(65533 + k, 3000 * k, marker=True) for k in range(6)]  # 65533 .. 2
    out = feed(MarkerJitterBuffer(512), packets)
    assert [(i, ts) for i, ts, _ in out] == [(k, 3000 * k) for k in range(6)]  # each on arrival
    assert out[-1][2] == b"2."


def test_a_frame_larger_than_one_packet_is_joined_in_order():
    packets = stream(frames=2, per_frame=1) + frame_packets(102, 6000, 40)  # a 40-packet keyframe
    out = feed(MarkerJitterBuffer(512), packets)
    assert out[-1] == (len(packets) - 1, 6000, data(102, 40))


def test_after_a_reordering_reset_frames_complete_as_in_aiortc_until_one_has_gone_out():
    buffer = MarkerJitterBuffer(512)
    feed(buffer, stream(first_seq=100, frames=2, per_frame=2))
    jumped = stream(first_seq=104 - 150, frames=3, per_frame=2, ts0=90000)  # 150 behind: a reset
    out = feed(buffer, jumped)
    # The first frame after the reset waits for the next timestamp; then markers count again.
    assert [(i, ts) for i, ts, _ in out] == [(2, 90000), (3, 93000), (5, 96000)]


def test_a_frame_is_never_handed_out_twice():
    packets = stream(frames=3, per_frame=2)
    late_duplicate = packets[:4] + [packets[2]] + packets[4:]  # a retransmission of frame 1
    out = feed(MarkerJitterBuffer(512), late_duplicate)
    assert [ts for _, ts, _ in out] == [0, 3000, 6000]


def test_install_replaces_only_a_video_receivers_buffer():
    from aiortc import RTCPeerConnection, VideoStreamTrack

    import asyncio

    async def receivers():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        found = {t.kind: t.receiver for t in pc.getTransceivers()}
        await pc.close()
        return found

    found = asyncio.run(receivers())
    # If aiortc stops keeping its buffer where install() looks, this fails loudly.
    install(found["video"])
    assert is_installed(found["video"])
    with pytest.raises(ValueError):
        install(found["audio"])
    assert not is_installed(found["audio"])
    del VideoStreamTrack


def test_install_refuses_a_receiver_it_does_not_understand():
    class Stranger:
        pass

    with pytest.raises(IncompatibleAiortc):
        install(Stranger())


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
