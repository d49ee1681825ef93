"""One presenter's avatar session: peer connection, compute stages, stats, and (when it
names a room) what it publishes there: every avatar frame and its microphone.

Lifecycle: start() loads the identity and starts its compute (a process of its own by
default, server/media/stages.py); offer() answers the client's SDP and starts the media tasks;
close() (idempotent) tears everything down.
`ended` is set when the session should end on its own (peer connection failed, idle).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

import av
import cv2

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from engines.identity import IdentityError
from engines.retarget import RetargetControls
from engines.provenance.watermark import Payload
from .media.peer import answer, close_peer, connect_deadline, new_peer
from .media.jitter import IncompatibleAiortc, install_for_track, shorten_audio_buffer, tap_encoded
from .media.tracks import (AvatarTrack, LatestFrame, PreparedFrame, VIDEO_TIME_BASE, avatar_frame, camera_planes, drain,
                           video_frame)
from .media.stages import ComputeDied, make_stages
from .telemetry import SessionStats

log = logging.getLogger("avatar.session")

FACE_LOST = 1.0  # seconds without a face before the voice takes over (a presenter with a microphone)
FADE_FRAMES = 8  # frames a hand-over between camera and voice dissolves over (~0.27 s)


class Session:
    role = "session"

    def __init__(self, state, identity_name: str, room=None, badge_own_video: bool = False):
        self.state = state
        self.id = secrets.token_hex(16)
        self.identity_name = identity_name
        self.room = room  # rooms.Room this session presents in, or None
        # The video it sends back is shown to other people (a WHIP client: an encoder, the
        # in-call camera), so it carries the viewers' badge; the presenter page's preview does not.
        self.badge_own_video = badge_own_video
        self.frame: tuple[int, int] | None = None  # a call frame's (width, height) the client asked for
        # Two single-thread stages (see media.FrameProcessor): landmarks, retarget and the
        # render's first half; then its second half and the watermark.
        self.stages = make_stages(state.config.compute, self.id, state.config.opencv_threads)
        self.controls = RetargetControls()  # what the pipeline was last given
        self.pc: RTCPeerConnection | None = None
        self.stats = SessionStats()
        self.out_track = AvatarTrack(on_sent=self.stats.mark_sent)
        self.stats_channel = None
        self.latest = LatestFrame()
        self.paused = False
        self.have_video = False  # the first video track is the camera; others are drained
        self.have_audio = False  # the first audio track is the microphone (published to the room)
        self.opus_in = False  # its packets are Opus and go to the room untouched
        self.tasks: set[asyncio.Task] = set()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.end_code = "session_ended"  # the signaling error code the client gets at the end
        self.consent_stamp, self.consent, self.label_viewers = None, None, True  # set by _load()
        self.last_activity = time.monotonic()  # last camera frame: idle means no media
        # Camera off, voice on: a VoiceSession fed the microphone (set_voice_only), made by
        # make_voice (ServerState wires it: this module cannot import that one).
        self.make_voice = None
        self.voice = None
        self.voice_auto = False  # the voice took over because the camera lost the face
        self._faceless_since: float | None = None
        self._to_voice = None  # the microphone's frames as 48 kHz mono s16, for it
        self._voice_clock = None  # (pts, wall time) of its first frame
        self._last_out = None  # the last frame viewers got: what a hand-over fades from
        self._fade: tuple | None = None  # (from frame, frames left) after a hand-over
        self._closed = False

    # ---- setup -------------------------------------------------------------------------
    async def start(self) -> None:
        identity = await self._off_loop(self._load, self.identity_name)  # file I/O
        await self.stages.start(identity, Payload.here(self.id), self.frame)
        self._spawn(self._watchdog())

    async def offer(self, sdp: str) -> str:
        """Answer an offer. Raises ValueError if the SDP is unusable (nothing of it is left)."""
        if self.pc is not None:
            raise RuntimeError("already negotiated")
        self.pc = pc = new_peer(self.state.config.ice_servers)
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

        def add_tracks(pc):
            if not any(t.kind == "video" for t in pc.getTransceivers()):
                raise ValueError("the offer has no video")
            pc.addTrack(self.out_track)

        try:
            answer_sdp = await answer(pc, sdp, add_tracks)
        except ValueError:
            self.pc = None
            raise
        self._spawn(connect_deadline(pc, self.state.config.connect_timeout, self._end))
        return answer_sdp

    def _on_track(self, track) -> None:
        if track.kind == "video" and self.state.config.marker_completion:
            try:
                install_for_track(self.pc, track)
            except IncompatibleAiortc as e:  # the session still works, one frame later
                log.error("session %s: %s", self.id[:8], e)
        if track.kind == "video" and not self.have_video:
            self.have_video = True
            self._spawn(self._receive(track))
            self._spawn(self._process())
        elif track.kind == "audio" and not self.have_audio and self.room is not None:
            self.have_audio = True
            try:
                shorten_audio_buffer(self.pc, track)
                tap_encoded(self.pc, track, self._on_encoded_audio)
            except IncompatibleAiortc as e:  # the voice still goes out: later, or re-encoded
                log.error("session %s: %s", self.id[:8], e)
            self._spawn(self._forward_audio(track))
        else:
            self._spawn(drain(track))

    def _on_datachannel(self, channel) -> None:
        if channel.label == "stats" and self.stats_channel is None:
            self.stats_channel = channel
            self._spawn(self._send_stats())

    async def _on_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            self._end(f"peer connection {self.pc.connectionState}")

    # ---- controls ----------------------------------------------------------------------
    async def set_controls(self, **changes) -> None:
        """Apply expression_gain / head_gain / freeze_head. Raises ValueError if out of range."""
        current = self.controls
        controls = RetargetControls(
            expression_gain=changes.get("expression_gain", current.expression_gain),
            head_gain=changes.get("head_gain", current.head_gain),
            freeze_head=changes.get("freeze_head", current.freeze_head),
        ).validated()
        await self.stages.call("prepare", "set_controls", controls)
        self.controls = controls

    async def set_identity(self, name: str) -> None:
        identity = await self._off_loop(self._load, name)  # file I/O: off the stages
        await self.stages.call("prepare", "set_identity", identity)
        self.identity_name = name
        if self.voice is not None:  # the voice drives the new face from now on
            auto = self.voice_auto
            await self.set_voice_only(False)
            await self.set_voice_only(True)
            self.voice_auto = auto

    def _load(self, name: str):
        """The identity, if its consent covers live use now (ConsentError otherwise); notes
        its manifest's stamp, so the watchdog sees a revocation."""
        stamp = self.state.store.consent_stamp(name)
        identity = self.state.store.load(name)
        identity.consent.check("live-avatar")
        self.consent_stamp, self.consent, self.label_viewers = stamp, identity.consent, identity.label_viewers
        return identity.at_most(self.state.config.output_size)

    def _consent_problem(self) -> IdentityError | None:
        """Why the identity may no longer be used live (revoked, expired, bundle gone), or
        None. One stat per call unless the manifest changed."""
        try:
            if self.state.store.consent_stamp(self.identity_name) != self.consent_stamp:
                self._load(self.identity_name)
            self.consent.check("live-avatar")  # expiry, while nothing changed on disk
        except IdentityError as e:
            return e
        return None

    async def set_voice_only(self, on: bool) -> None:
        """Camera off, voice on: the microphone drives the face, through a voice agent's
        session fed what it hears; the camera's frames are dropped meanwhile. ValueError
        without a microphone (a presenter sends one in a room) or voice here."""
        self.voice_auto = False  # asked for: it stays until asked otherwise
        if on == (self.voice is not None):
            return
        if not on:
            voice, self.voice, self._voice_clock = self.voice, None, None
            self._fade = (self._last_out, FADE_FRAMES) if self._last_out is not None else None
            await voice.close()
            return
        if not self.have_audio or self.make_voice is None:
            raise ValueError("voice_only needs the microphone, which a presenter sends in a room")
        voice = self.make_voice(self.state, self.identity_name, self.room, on_frame=self._voice_frame)
        try:
            await voice.start()
        except BaseException:
            await voice.close()
            raise
        self._to_voice = av.AudioResampler(format="s16", layout="mono", rate=48000)
        self._fade = (self._last_out, FADE_FRAMES) if self._last_out is not None else None
        self.voice = voice

    async def _follow_face(self, found: bool) -> None:
        """The voice takes over when the camera has lost the face for FACE_LOST seconds (with
        a microphone to follow), and hands back when the face returns."""
        if found:
            self._faceless_since = None
            if self.voice is not None and self.voice_auto:
                await self.set_voice_only(False)
            return
        now = time.monotonic()
        self._faceless_since = self._faceless_since or now
        if self.voice is None and self.have_audio and now - self._faceless_since >= FACE_LOST:
            try:
                await self.set_voice_only(True)
            except Exception:
                log.exception("session %s: the voice could not take over", self.id[:8])
                self._faceless_since = None  # tried: not again at once
                return
            self.voice_auto = True

    def _voice_frame(self, image, rec) -> None:
        """A frame the voice made: to the room, the presenter's own video and stats, as a
        camera's would be. Its pts go on from the camera's at the wall clock's pace (a
        receiver drops frames whose timestamps go back), as the camera's will again."""
        if self._voice_clock is None:
            self._voice_clock = (self.out_track.last_pts + 3000, rec.recv_time)
        first_pts, first_time = self._voice_clock
        image, _ = self._dissolve(image, None)
        if self.room is not None:
            self.room.publish_video(image, rec.recv_time)
        video = video_frame(image)
        video.pts, video.time_base = first_pts + round((rec.recv_time - first_time) * 90000), VIDEO_TIME_BASE
        self.out_track.push(video)
        self.stats.add(rec)

    def _dissolve(self, image, labelled):
        """After a hand-over between camera and voice, the first FADE_FRAMES frames (both
        copies of one, as given) dissolve from the last one viewers saw, so the head does not
        jump from one pose to the other."""
        self._last_out = labelled if labelled is not None else image
        if self._fade is None:
            return image, labelled
        before, left = self._fade
        self._fade = (before, left - 1) if left > 1 else None
        w = left / (FADE_FRAMES + 1)

        def blend(x):
            return x if x is None or x.shape != before.shape else cv2.addWeighted(before, w, x, 1.0 - w, 0.0)

        return blend(image), blend(labelled)

    def set_paused(self, paused: bool) -> None:
        """Paused: camera frames are still received (and dropped), no avatar frames go out."""
        self.paused = paused

    async def recalibrate(self) -> None:
        await self.stages.call("prepare", "recalibrate")

    @staticmethod
    async def _off_loop(fn, *args):
        """fn(*args) on the default executor: file I/O, never frame work (that is the stages')."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ---- media tasks -------------------------------------------------------------------
    async def _receive(self, track) -> None:
        """Pull decoded camera frames as fast as they come; keep only the newest."""
        try:
            while True:
                frame = await track.recv()
                self.last_activity = time.monotonic()
                before = self.latest.dropped
                self.latest.put((frame, time.time()))
                if self.latest.dropped != before:
                    self.stats.dropped += 1
                    self.state.metrics.dropped()
        except MediaStreamError:
            self._end("camera track ended")

    def _on_encoded_audio(self, codec, frame) -> None:
        """Each microphone packet as it arrives (jitter.tap_encoded): Opus goes to the room as is."""
        if codec.mimeType.lower() == "audio/opus":
            self.opus_in = True
            if not self.paused and self.voice is None and frame.data:  # with the voice driving, it publishes
                self.room.publish_opus(bytes(frame.data))

    async def _forward_audio(self, track) -> None:
        """The decoded microphone: keeps the session active, and goes to the room (which holds
        it for the avatar) only when the codec is not Opus (then it is re-encoded)."""
        try:
            while True:
                frame = await track.recv()
                self.last_activity = time.monotonic()
                if self.voice is not None:
                    if not self.paused:
                        for mono in self._to_voice.resample(frame):
                            self.voice.push_pcm(mono.to_ndarray().tobytes())
                elif not self.paused and not self.opus_in:
                    self.room.publish_audio(frame)
        except MediaStreamError:
            pass

    async def _process(self) -> None:
        """Two-stage pipeline: while frame n finishes, frame n+1 is prepared."""
        rendering: asyncio.Future | None = None
        try:
            while True:
                frame, recv_time = await self.latest.get()
                if self.paused or (self.voice is not None and not self.voice_auto):
                    continue
                prepared = await self._prepare(frame, recv_time)
                if prepared is not None:
                    await self._follow_face(prepared.face_found)
                    if self.voice is not None:
                        continue  # the voice drives: the camera was only asked for a face
                if rendering is not None:
                    await rendering  # frame n goes out before frame n+1 starts finishing
                    rendering = None
                if prepared is None:
                    self.stats.rejected += 1
                    continue
                rendering = asyncio.ensure_future(self._render(prepared))
        finally:
            if rendering is not None:
                rendering.cancel()

    async def _prepare(self, frame, recv_time: float) -> PreparedFrame | None:
        planes = camera_planes(frame)
        result = None if planes is None else await self._stage("prepare", "prepare", planes)
        if result is None:
            return None
        handle, face_found, ms = result
        pts = frame.pts if frame.pts is not None else int(recv_time * 90000)
        return PreparedFrame(pts, frame.time_base or VIDEO_TIME_BASE, recv_time, face_found, handle, ms)

    async def _render(self, prepared: PreparedFrame) -> None:
        # Sends its frame as soon as it is ready, not when the next camera frame arrives.
        viewer_label = (self.room is not None or self.badge_own_video) and self.label_viewers
        plain = not (viewer_label and self.badge_own_video)  # else every copy sent is labelled
        result = await self._stage("render", "finish", prepared.handle, viewer_label, plain)
        if result is None:
            self.stats.rejected += 1
            return
        image, labelled, ms = result
        image, labelled = self._dissolve(image, labelled)
        own = labelled if self.badge_own_video and labelled is not None else image
        video, rec = avatar_frame(own, prepared, ms)
        self.out_track.push(video)
        if self.room is not None:
            self.room.publish_video(image if labelled is None else labelled, rec.recv_time)
        self.stats.add(rec)
        self.state.metrics.frame(rec)

    async def _stage(self, stage: str, method: str, *args):
        try:
            return await self.stages.call(stage, method, *args)
        except ComputeDied as e:
            self._end(str(e))
        except Exception:
            # A frame the engines cannot handle must not end the session.
            log.exception("session %s: frame failed", self.id[:8])
        return None

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(self.state.config.stats_interval)
            channel = self.stats_channel
            if channel is None or channel.readyState == "closed":
                return
            if channel.readyState == "open":
                summary = self.stats.summary()
                summary.update(type="stats", v=1, session=self.id, identity=self.identity_name,
                               paused=self.paused, time=time.time())
                channel.send(json.dumps(summary))

    async def _watchdog(self) -> None:
        timeout = self.state.config.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if time.monotonic() - self.last_activity > timeout:
                self._end("idle timeout")
                return
            problem = await self._off_loop(self._consent_problem)
            if problem is not None:
                log.warning("session %s: ending, identity %r may no longer be used: %s",
                            self.id[:8], self.identity_name, problem)
                self._end(str(problem), getattr(problem, "code", "identity_unavailable"))
                return

    # ---- teardown ----------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _end(self, reason: str, code: str = "session_ended") -> None:
        if not self.ended.is_set():
            self.end_reason, self.end_code = reason, code
            self.ended.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end("closed")
        if self.voice is not None:
            await self.voice.close()
        if self.room is not None:
            self.room.vacate(self)
        current = asyncio.current_task()
        tasks = [t for t in self.tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.out_track.stop()
        if self.pc is not None:
            await close_peer(self.pc)  # also stops the remote tracks
        try:
            await self.stages.close()  # after any frame in flight
        except Exception:
            log.exception("session %s: closing its compute failed", self.id[:8])
        self.pc = self.stats_channel = None
