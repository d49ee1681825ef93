"""A headless avatar client: signaling + WebRTC, as a browser would be.

Used by `avatar bench live` and by the tests. It sends a clip as its camera and records,
for every frame, when it was sent and when its avatar frame came back.

Timestamps: an aiortc sender adds a random origin to a track's pts, and an aiortc receiver
takes the first RTP timestamp it decodes away again (its TimestampMapper). So the server
(aiortc) sees the pts this client sent, as long as its first frame arrives (pts 0), with
no pinning of random numbers; encoders may round a pts down by a tick. Back from the server
the same happens once more; `matched()` finds that offset from the server's stats.
tests/test_bench_live.py checks the first leg against aiortc on every run.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCSessionDescription, VideoStreamTrack
from aiortc.codecs.vpx import MAX_BITRATE, VpxPayloadDescriptor
from aiortc.mediastreams import MediaStreamError

from server.media import vp8
from server.media.jitter import install_for_track, shorten_audio_buffer
from server.media.peer import new_peer

TIME_BASE = fractions.Fraction(1, 90000)
RTP_WRAP = 2 ** 32
PTS_TOLERANCE = 90  # 1 ms at 90 kHz: pts conversions along the way round by a tick or two
VP8_CODEC = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)


class ClientError(RuntimeError):
    """The server could not be reached or refused the session (`code`: the server's error code)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def camera_frame(rgb: np.ndarray) -> tuple[np.ndarray, str]:
    """(pixels, format) for av.VideoFrame.from_ndarray: yuv420p, as a camera gives it, unless
    a side is odd (yuv420p cannot hold that; the encoder then converts the RGB itself)."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        return rgb, "rgb24"
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray(), "yuv420p"


class ClipTrack(VideoStreamTrack):
    """Plays RGB frames at `fps` in real time, pts = index * 90000 / fps; loops if asked.

    sent_at[pts] is the wall-clock time the frame was handed to the encoder: the
    'glass' end of glass-to-glass latency. left_at[pts] is when its packets had all gone
    out: aiortc's sender calls recv() again only after encoding and sending the frame before."""

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0, loop: bool = False):
        super().__init__()
        # What a camera hands its encoder is YUV: converted once here instead of by the encoder
        # on every send, which took 5% of this machine with three bench sessions.
        self.frames = [camera_frame(f) for f in frames]
        self.fps, self.loop = fps, loop
        self.index = 0
        self.start = None
        self.sent: dict[int, int] = {}  # pts -> frame index
        self.sent_at: dict[int, float] = {}  # pts -> time.time()
        self.left_at: dict[int, float] = {}  # pts -> time.time() once encoded and sent
        self._in_flight: int | None = None

    async def recv(self) -> av.VideoFrame:
        i, pts = await self._next()
        frame = av.VideoFrame.from_ndarray(*self.frames[i])
        frame.pts, frame.time_base = pts, TIME_BASE
        return frame

    async def _next(self) -> tuple[int, int]:
        """Waits until the next frame is due: (its index in the clip, its pts)."""
        if self._in_flight is not None:
            self.left_at[self._in_flight] = time.time()
            self._in_flight = None
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        if self.index >= len(self.frames) and not self.loop:
            self.stop()
            raise MediaStreamError
        due = self.start + self.index / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        i = self.index % len(self.frames)
        pts = int(round(self.index * 90000 / self.fps))
        self.sent[pts] = i
        self.sent_at[pts] = time.time()
        self._in_flight = pts
        self.index += 1
        return i, pts


@dataclass(frozen=True)
class EncodedClip:
    """A clip as a browser's camera encoder sends it, encoded once: one VP8 frame per clip
    frame, the first a keyframe (so a loop starts over cleanly), and the seconds each took."""
    frames: list[bytes]
    seconds: list[float]


# A live camera stream on loopback reaches aiortc's highest VP8 bitrate within the warm-up
# (the server's receiver estimates the bandwidth and tells the sender): encoded at it.
REPLAY_BITRATE = MAX_BITRATE


def encode_clip(frames: list[np.ndarray], fps: float = 30.0) -> EncodedClip:
    """`frames` encoded by the VP8 encoder a live ClipTrack's sender would get (this
    process's installed speed, server/media/vp8.py), at REPLAY_BITRATE."""
    encoder = vp8.encoder_for(VP8_CODEC)
    encoder.target_bitrate = REPLAY_BITRATE
    encoded, seconds = [], []
    for i, (pixels, fmt) in enumerate(map(camera_frame, frames)):
        frame = av.VideoFrame.from_ndarray(pixels, format=fmt)
        frame.pts, frame.time_base = int(round(i * 90000 / fps)), TIME_BASE
        t = time.perf_counter()
        payloads, _ = encoder.encode(frame, force_keyframe=i == 0)
        seconds.append(time.perf_counter() - t)
        # Back from RTP payloads to the VP8 frame: the sender packetizes it again.
        encoded.append(b"".join(VpxPayloadDescriptor.parse(p)[1] for p in payloads))
    return EncodedClip(encoded, seconds)


class ReplayTrack(ClipTrack):
    """A ClipTrack whose camera was encoded elsewhere: it sends an EncodedClip's frames
    (aiortc's sender packetizes an av.Packet without encoding it), each after the time its
    encode took. So glass-to-glass still holds a browser's encode time, but this process
    spends no CPU on it, as browsers on their own machines would not on the server's."""

    def __init__(self, clip: EncodedClip, fps: float = 30.0, loop: bool = False):
        super().__init__([], fps, loop)
        self.frames, self.seconds = clip.frames, clip.seconds

    async def recv(self) -> av.Packet:
        i, pts = await self._next()
        await asyncio.sleep(self.seconds[i])
        packet = av.Packet(self.frames[i])
        packet.pts, packet.time_base = pts, TIME_BASE
        return packet


class AvatarClient:
    def __init__(self, ws_url: str, keep_frames: bool = False, marker_completion: bool = True):
        self.ws_url = ws_url
        self.marker_completion = marker_completion  # avatar frames leave the buffer on their marker
        self.ws = None
        self.pc: RTCPeerConnection | None = None
        self.keep_frames = keep_frames
        self.received: list[tuple[int, float, np.ndarray | None]] = []  # (rtp pts, time.time(), rgb)
        self.audio: list[tuple[float, av.AudioFrame]] = []  # (time.time(), frame) as audio arrives
        self.on_video = None  # on_video(frame, time.time()) for every video frame, if set
        self.stats: list[dict] = []
        self.session: dict = {}  # the server's "session" message, once hello succeeded
        self.tasks: list[asyncio.Task] = []
        self.redirects: list[str] = []  # the URLs a cluster's "redirect" messages sent this client to
        self._headers: dict = {}

    async def connect(self, **headers) -> "AvatarClient":
        self._headers = headers
        try:
            self.ws = await asyncio.wait_for(websockets.connect(
                self.ws_url, additional_headers=headers or None, max_size=2 ** 20), 10)
        except (OSError, asyncio.TimeoutError, websockets.exceptions.InvalidHandshake,
                websockets.exceptions.InvalidURI) as e:
            raise ClientError(f"cannot reach the avatar server at {self.ws_url}: {e or type(e).__name__}")
        return self

    async def send(self, msg) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def recv(self, timeout: float = 20.0) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, msg, timeout: float = 20.0) -> dict:
        await self.send(msg)
        return await self.recv(timeout)

    async def control(self, timeout: float = 20.0, **controls) -> dict:
        """A presenter's `control` (docs/PROTOCOL.md): the server's control_ok; ClientError
        with the server's code if it refuses."""
        await self.send({"v": 1, "type": "control", **controls})
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.recv(max(0.1, deadline - time.monotonic()))
            if reply.get("type") == "control_ok":
                return reply
            if reply.get("type") == "error":
                raise ClientError(f"server refused the control: {reply.get('code')}: {reply.get('message')}",
                                  reply.get("code"))

    async def _following(self, msg: dict, max_redirects: int = 3) -> dict:
        """The reply to `msg` (a hello), sent again wherever a cluster's "redirect" says."""
        reply = await self.request(msg)
        while reply.get("type") == "redirect" and len(self.redirects) < max_redirects \
                and isinstance(reply.get("url"), str) and reply["url"].startswith(("ws://", "wss://")):
            self.redirects.append(reply["url"])
            await self.ws.close()
            self.ws_url = reply["url"]
            await self.connect(**self._headers)
            reply = await self.request(msg)
        return reply

    async def hello(self, token=None, identity="demo", room=None, max_redirects: int = 3, frame=None) -> dict:
        """The server's reply to a presenter hello (`frame`: a call frame "WxH" to be sent). A
        cluster node may answer "redirect": the same hello goes to the URL it names (at most
        `max_redirects` times)."""
        msg = {"v": 1, "type": "hello", "identity": identity}
        if token is not None:
            msg["token"] = token
        if room is not None:
            msg["room"] = room
        if frame is not None:
            msg["frame"] = frame
        reply = await self._following(msg, max_redirects)
        if reply.get("type") == "session":
            self.session = reply
        return reply

    async def start_session(self, track, token=None, identity="demo", room=None, audio=None, frame=None) -> dict:
        """hello + offer/answer; raises ClientError with the server's error message. With a
        room, the avatar (and `audio`, a microphone track) go to the room's viewers."""
        reply = await self.hello(token, identity, room, frame=frame)
        if reply.get("type") != "session":
            raise ClientError(f"server refused the session: {reply.get('code')}: {reply.get('message')}",
                              reply.get("code"))
        answer = await self.start_media(track, audio)
        if answer.get("type") != "answer":
            raise ClientError(f"server refused the offer: {answer.get('code')}: {answer.get('message')}",
                              answer.get("code"))
        return reply

    async def start_media(self, track, audio=None) -> dict:
        """Offer the camera track (+ a microphone track) + a 'stats' data channel; apply the answer."""
        self.pc = pc = new_peer()
        pc.addTrack(track)
        if audio is not None:
            pc.addTrack(audio)
        channel = pc.createDataChannel("stats")
        channel.on("message", lambda m: self.stats.append(json.loads(m)))
        pc.on("track", self._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        reply = await self.request({"v": 1, "type": "offer", "sdp": pc.localDescription.sdp})
        if reply.get("type") == "answer":
            await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
        return reply

    def _on_track(self, track) -> None:
        if track.kind == "video" and self.marker_completion:
            install_for_track(self.pc, track)
        if track.kind == "audio":  # as the server does: no 80 ms prefetch a browser would not add
            shorten_audio_buffer(self.pc, track)
        self.tasks.append(asyncio.ensure_future(self._collect(track)))

    async def _collect(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "audio":
                    self.audio.append((time.time(), frame))
                    continue
                now = time.time()
                rgb = frame.to_ndarray(format="rgb24") if self.keep_frames else None
                self.received.append((frame.pts, now, rgb))
                if self.on_video is not None:
                    self.on_video(frame, now)
        except MediaStreamError:
            pass

    async def watch(self, room: str, token=None) -> dict:
        """Join `room` as a viewer (receive-only video + audio); the server's "viewer" message.
        Raises ClientError if refused. Received frames land in `received` and `audio`."""
        msg = {"v": 1, "type": "hello", "role": "viewer", "room": room}
        if token is not None:
            msg["token"] = token
        reply = await self._following(msg)  # a cluster sends a viewer to the room's node
        if reply.get("type") != "viewer":
            raise ClientError(f"server refused the viewer: {reply.get('code')}: {reply.get('message')}",
                              reply.get("code"))
        self.session = reply
        self.pc = pc = new_peer()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.on("track", self._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self.request({"v": 1, "type": "offer", "sdp": pc.localDescription.sdp})
        while answer.get("type") == "room":  # a presenter came or went meanwhile
            answer = await self.recv()
        if answer.get("type") != "answer":
            raise ClientError(f"server refused the offer: {answer.get('code')}: {answer.get('message')}",
                              answer.get("code"))
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return reply

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()

    def server_frames(self) -> list[tuple[int, float, float]]:
        """(in_pts, server receive time, server done time) of every output frame the
        server reported in its stats, oldest first."""
        return [(pts, f["recv"], f["done"]) for pts, f in self.server_reports().items()]

    def server_reports(self) -> dict[int, dict]:
        """in_pts -> what the server said of that frame: receive, done and sent times (its
        clock) and ms per stage, from the stats messages (insertion order = oldest first)."""
        frames: dict[int, dict] = {}
        names = self.session.get("stages") or ()
        for s in self.stats:
            for pts, recv_t, done_t, *rest in s.get("recent", []):
                if pts not in frames:
                    stages = dict(zip(names, rest[0])) if rest and names else {}
                    frames[pts] = {"recv": recv_t, "done": done_t, "stages": stages}
        for s in self.stats:
            for pts, sent_t in s.get("sent", []):
                if pts in frames:
                    frames[pts]["sent"] = sent_t
        return frames

    def matched(self) -> list[tuple[int, float]]:
        """(server-reported in_pts, receive time) for avatar frames matched to the camera
        frame they show.

        The server keeps each input frame's pts on its output, but its RTP sender adds a
        random origin, and timestamp conversions on the way may round by a tick or two. The
        k-th frame received is the k-th the server reported, give or take a frame lost at
        the start: try those pairings, keep the offset that matches most.
        """
        reported = [p for p, _, _ in self.server_frames()]
        if not reported or not self.received:
            return []
        best: list[tuple[int, float]] = []
        for k in range(min(5, len(reported), len(self.received))):
            offset = self.received[k][0] - reported[k]
            shifted = [(pts - offset) % RTP_WRAP for pts, _, _ in self.received]
            found = nearest(reported, shifted)
            pairs = [(p, t) for p, (_, t, _) in zip(found, self.received) if p is not None]
            if len(pairs) > len(best):
                best = pairs
        return best


def nearest(known, values, tolerance: int = PTS_TOLERANCE) -> list[int | None]:
    """For each value, the element of `known` within `tolerance` of it, or None."""
    ref = np.sort(np.asarray(known, dtype=np.int64))
    v = np.asarray(values, dtype=np.int64)
    i = np.clip(np.searchsorted(ref, v), 1, max(len(ref) - 1, 1))
    lo, hi = ref[i - 1], ref[np.minimum(i, len(ref) - 1)]
    pick = np.where(np.abs(v - lo) <= np.abs(hi - v), lo, hi)
    return [int(p) if abs(int(p) - int(x)) <= tolerance else None for p, x in zip(pick, v)]
