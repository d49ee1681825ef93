"""The signaling WebSocket (/ws): protocol v1, see docs/PROTOCOL.md.

Every message is a JSON object {"v": 1, "type": ...}. Errors are replies
{"v": 1, "type": "error", "code", "message"}; fatal ones are followed by a close.
Nothing a client sends may raise out of here: each message is checked before use.

Two roles, chosen by hello: a presenter (the default) drives an identity and may publish
into a room; a viewer (`"role": "viewer"`) watches a room and may only offer, ping and say bye.
The socket is anything with recv() / send(text) / close(code, reason) that raises Closed
when the connection is gone (app.Socket wraps aiohttp's).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

from engines.identity import DEFAULT_IDENTITY, ConsentError, IdentityError, check_name
from engines.retarget import check_gain
from ..rooms.room import RoomBusy, RoomFull
from ..security import (RateLimiter, check_call_frame, check_offer_sdp, check_room, identity_allowed, is_number,
                        room_allowed)
from ..cluster.node import ws_base
from ..state import Redirect, ServerBusy
from ..telemetry import STAGES
from ..voice_session import MAX_FRAME_BYTES, RATES, VoiceSession

log = logging.getLogger("avatar.signaling")
VERSION = 1
CONTROL_KEYS = {"expression_gain", "head_gain", "freeze_head", "identity", "recalibrate", "pause", "voice_only"}
MAX_RATE_VIOLATIONS = 20  # then the client is closed: it is not listening to errors
AUDIO_FRAME_RATE = 200  # an agent's binary frames a second (bursts of twice as many)
FAILED_HELLO_DELAY = 0.5  # seconds before "unauthorized": guessing tokens is slow


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, fatal: bool = False):
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal


class Goodbye(Exception):
    """The client said bye: close normally, no error."""


class Moved(Exception):
    """The presenter was placed on another node and told so ("redirect"): close normally."""


class Closed(Exception):
    """The socket is closed (by the client, an error, or the server stopping)."""


class Connection:
    """One WebSocket: hello -> session (or viewer), then offer / control / ping until it closes."""

    def __init__(self, ws, state):
        self.ws = ws
        self.state = state
        self.config = state.config
        self.session = None  # a Session (presenter) or a Viewer, once hello succeeded
        self.allow = None  # identity allow list once authenticated
        self.limiter = RateLimiter(self.config.rate, self.config.burst)
        self.audio_limiter = RateLimiter(AUDIO_FRAME_RATE, 2 * AUDIO_FRAME_RATE)  # an agent's binary frames
        self.violations = 0
        self.address = ws.address
        self.pending = False  # counted among the connections that have not said hello
        # With --cluster: the slot another node reserved here (the redirect URL's ?reservation=).
        self.reservation = getattr(ws, "reservation", None)

    async def run(self) -> None:
        if not self.state.open_pending(self.address):
            await self._send_error("busy", "too many connections waiting to say hello; try again later")
            await self.ws.close(1013, "too many pending connections")
            return
        self.pending = True
        try:
            await self._serve()
        except Closed:
            pass
        finally:
            self._end_pending()
            await self._release()

    def _end_pending(self) -> None:
        if self.pending:
            self.pending = False
            self.state.close_pending(self.address)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        hello_deadline = loop.time() + self.config.hello_timeout  # whatever else is sent first
        while True:
            timeout = None if self.session else max(0.0, hello_deadline - loop.time())
            recv = asyncio.ensure_future(self.ws.recv())
            waiters = {recv}
            if self.session is not None:
                waiters.add(asyncio.ensure_future(self.session.ended.wait()))
            done, pending = await asyncio.wait(waiters, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if recv not in done:
                reason = self.session.end_reason if self.session else "no hello in time"
                await self._send_error(self.session.end_code if self.session else "timeout", reason)
                await self.ws.close(1000, reason[:100])
                return
            try:
                await self._handle(recv.result())
            except Goodbye:
                await self._release()  # the slot is free before the client sees the close
                await self.ws.close(1000, "bye")
                return
            except Moved:
                await self.ws.close(1000, "redirect")
                return
            except ProtocolError as e:
                await self._send_error(e.code, e.message)
                if e.fatal:
                    await self.ws.close(1008, e.code)
                    return
            except (Closed, asyncio.CancelledError):
                raise
            except Exception:
                # A bug or an engine failure: end this connection only, never the server.
                log.exception("connection failed while handling a message")
                await self._send_error("internal_error", "the server failed on this request")
                await self.ws.close(1011, "internal_error")
                return

    async def _handle(self, raw) -> None:
        if isinstance(raw, bytes) and self.session is not None and self.session.role == "agent":
            # An agent's audio is bounded by its buffer (overflow), not by the message rate;
            # only the count of its frames is (10 ms frames are 100 a second).
            if not self.audio_limiter.allow():
                self.violations += 1
                raise ProtocolError("rate_limited", f"more than {AUDIO_FRAME_RATE} audio frames a second; "
                                                    "send larger ones", self.violations > MAX_RATE_VIOLATIONS)
            return self._pcm(raw)
        # Both buckets: this connection's, and its address's (reconnecting does not refill it).
        if not (self.limiter.allow() and self.state.addresses.allow_message(self.address)):
            self.violations += 1
            fatal = self.violations > MAX_RATE_VIOLATIONS
            raise ProtocolError("rate_limited", "too many messages; slow down", fatal)
        if isinstance(raw, bytes):
            if self.session is None or self.session.role != "agent":
                raise ProtocolError("bad_message", "binary messages are only for voice agents' audio")
            return self._pcm(raw)
        if len(raw.encode()) > self.config.max_message:
            raise ProtocolError("too_large", f"messages are limited to {self.config.max_message} bytes")
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):
            raise ProtocolError("bad_json", "the message is not valid JSON")
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError("bad_message", "expected a JSON object with a string 'type'")
        version = msg.get("v", VERSION)
        if isinstance(version, bool) or version != VERSION:  # true == 1 in Python, not in the protocol
            raise ProtocolError("bad_version", f"this server speaks protocol v{VERSION}", fatal=True)
        kind = msg["type"]
        if kind == "ping":
            if self.session is not None and self.session.role == "agent":
                self.session.last_activity = time.monotonic()  # an agent may be silent a while
            await self._send({"type": "pong", "id": msg.get("id") if is_number(msg.get("id")) else None})
        elif kind == "hello":
            await self._hello(msg)
        elif self.session is None:
            raise ProtocolError("bad_message", f"send 'hello' before {kind[:40]!r}")
        elif self.session.role == "agent" and kind in ("say", "interrupt"):
            self.session.last_activity = time.monotonic()  # an agent's messages are its media
            await (self._say(msg) if kind == "say" else self._interrupt())
        elif kind in ("offer", "control") and self.session.role == "agent":
            raise ProtocolError("bad_message", f"a voice agent sends no {kind!r}: audio and say/interrupt")
        elif kind == "offer":
            await self._offer(msg)
        elif kind == "control" and self.session.role == "viewer":
            raise ProtocolError("forbidden", "viewers cannot send controls")
        elif kind == "control":
            await self._control(msg)
        elif kind == "bye":
            raise Goodbye
        else:
            raise ProtocolError("bad_message", f"unknown message type {kind[:40]!r}")

    # ---- messages ----------------------------------------------------------------------
    async def _hello(self, msg: dict) -> None:
        if self.session is not None:
            raise ProtocolError("bad_message", "already said hello")
        addresses = self.state.addresses
        if addresses.auth_blocked(self.address):
            raise ProtocolError("rate_limited", "too many failed hellos from this address; wait", fatal=True)
        role = msg.get("role", "presenter")
        if role not in ("presenter", "viewer", "agent"):
            raise ProtocolError("bad_value", "role must be 'presenter', 'viewer' or 'agent'", fatal=True)
        room = msg.get("room")
        if role == "agent":
            rate = msg.get("sample_rate", 48000)
            if isinstance(rate, bool) or rate not in RATES:
                raise ProtocolError("bad_value", f"sample_rate must be one of {', '.join(map(str, RATES))} "
                                                 "(s16le mono PCM)", fatal=True)
        frame = None
        if role == "presenter" and msg.get("frame") is not None:
            try:
                frame = check_call_frame(msg["frame"])
            except ValueError as e:
                raise ProtocolError("bad_value", str(e), fatal=True)
        if room is not None or role in ("viewer", "agent"):
            try:
                check_room(room)
            except ValueError as e:
                raise ProtocolError("bad_value", str(e), fatal=True)
        token = msg.get("token")
        if self.state.auth.role(token) is None:
            addresses.auth_failed(self.address)
            await asyncio.sleep(FAILED_HELLO_DELAY)
            raise ProtocolError("unauthorized", "missing or invalid token", fatal=True)
        if role == "viewer":
            await self._hello_viewer(token, room)
        elif role == "agent":
            await self._hello_presenter(token, msg.get("identity", DEFAULT_IDENTITY), room, agent_rate=rate)
        else:
            await self._hello_presenter(token, msg.get("identity", DEFAULT_IDENTITY), room, frame=frame)

    async def _hello_presenter(self, token, name, room, agent_rate: int | None = None, frame=None) -> None:
        allow = self.state.auth.allowed(token)
        if allow is None:
            raise ProtocolError("forbidden", "a viewer token cannot present; use a presenter token", fatal=True)
        self._check_identity(name, allow, fatal=True)
        # A call frame is for the call's other people: badged by the server before its mark,
        # as WHIP's is, so no badge drawn later flips the mark's bits.
        make = {"frame": frame, "badge_own_video": frame is not None}
        if agent_rate is not None:
            make["make"] = functools.partial(VoiceSession, sample_rate=agent_rate,
                                             notify=lambda m: asyncio.ensure_future(self._notice(m)))
        try:
            self.session = session = await self.state.open_session(name, room, who=self.state.who(token),
                                                                   address=self.address,
                                                                   reservation=self.reservation, **make)
        except Redirect as e:
            # The same hello, token included, is to be sent again there (docs/PROTOCOL.md).
            log.info("presenter placed on %s", e.url)
            await self._send({"type": "redirect", "url": e.ws_url()})
            raise Moved
        except RoomBusy as e:
            raise ProtocolError("room_busy", f"{e}; pick another room", fatal=True)
        except ServerBusy as e:
            raise ProtocolError("busy", str(e), fatal=True)
        except ConsentError as e:
            raise ProtocolError(e.code, str(e), fatal=True)
        except IdentityError as e:
            raise ProtocolError("unknown_identity", unloadable(name, e), fatal=True)
        self.allow = allow
        self._end_pending()
        await self._send({"type": "session", "id": session.id, "identity": name, "room": room,
                          "identities": self.state.visible_identities(allow),
                          "max_message": self.config.max_message, "stats_channel": "stats",
                          "controls": vars(session.controls), "stages": list(STAGES)})
        log.info("session %s started (identity %s, room %s)", session.id[:8], name, room)

    async def _hello_viewer(self, token, room) -> None:
        if not room_allowed(self.state.auth.rooms(token), room):
            raise ProtocolError("forbidden", f"this token may not watch room {room!r}", fatal=True)
        cluster = self.state.cluster
        if cluster is not None and self.state.rooms.live(room) is None:
            elsewhere = await cluster.room_url(room)
            if elsewhere is not None:  # the room's presenter is live on another node: watch it there
                await self._send({"type": "redirect", "url": f"{ws_base(elsewhere)}ws"})
                raise Moved
        try:
            self.session = viewer = await self.state.open_viewer(room, notify=self._room_changed,
                                                                 who=self.state.who(token), address=self.address)
        except RoomFull as e:
            raise ProtocolError("busy", str(e), fatal=True)
        self._end_pending()
        await self._send({"type": "viewer", "id": viewer.id, "max_message": self.config.max_message,
                          **viewer.room.describe()})
        log.info("viewer %s joined room %s", viewer.id[:8], room)

    def _room_changed(self, room) -> None:
        """The room's presenter came or went: tell this viewer (its page shows it)."""
        asyncio.ensure_future(self._notice({"type": "room", **room.describe()}))

    async def _notice(self, msg: dict) -> None:
        try:
            await self._send(msg)
        except Closed:
            pass

    async def _offer(self, msg: dict) -> None:
        sdp = msg.get("sdp")
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            raise ProtocolError("bad_sdp", "'sdp' must be an SDP offer string starting with 'v=0'")
        if len(sdp.encode()) > self.config.max_sdp:
            raise ProtocolError("too_large", f"SDP is limited to {self.config.max_sdp} bytes")
        try:
            check_offer_sdp(sdp, self.config.max_candidates,
                            "viewer" if self.session.role == "viewer" else "presenter")
        except ValueError as e:
            raise ProtocolError("bad_sdp", f"cannot use this offer: {e}")
        try:
            answer = await self.session.offer(sdp)
        except RuntimeError as e:
            raise ProtocolError("bad_message", str(e))
        except ValueError as e:
            raise ProtocolError("bad_sdp", f"cannot use this offer: {str(e)[:200]}")
        await self._send({"type": "answer", "sdp": answer})

    async def _control(self, msg: dict) -> None:
        changes = {k: v for k, v in msg.items() if k not in ("type", "v", "id")}
        unknown = sorted(set(changes) - CONTROL_KEYS)
        if unknown:
            raise ProtocolError("unknown_control", f"unknown control(s): {', '.join(unknown)[:100]}; "
                                                   f"known: {', '.join(sorted(CONTROL_KEYS))}")
        if not changes:
            raise ProtocolError("bad_message", "control message without any control")
        # Validate everything before applying anything, so a bad message changes nothing.
        for key in ("expression_gain", "head_gain"):
            if key in changes:
                try:
                    check_gain(key, changes[key])
                except ValueError as e:
                    raise ProtocolError("bad_value", str(e))
        for key in ("freeze_head", "pause", "recalibrate", "voice_only"):
            if key in changes and not isinstance(changes[key], bool):
                raise ProtocolError("bad_value", f"{key} must be true or false")
        if "identity" in changes:
            self._check_identity(changes["identity"], self.allow)
        session = self.session
        gains = {k: changes[k] for k in ("expression_gain", "head_gain", "freeze_head") if k in changes}
        try:
            if gains:
                await session.set_controls(**gains)
            if "identity" in changes and changes["identity"] != session.identity_name:
                await session.set_identity(changes["identity"])
                await self.state.switched(session)
        except ConsentError as e:
            raise ProtocolError(e.code, str(e))
        except IdentityError as e:
            raise ProtocolError("unknown_identity", unloadable(changes["identity"], e))
        except ValueError as e:
            raise ProtocolError("bad_value", str(e))
        if changes.get("recalibrate"):
            await session.recalibrate()
        if "pause" in changes:
            session.set_paused(changes["pause"])
        if "voice_only" in changes:
            try:
                await session.set_voice_only(changes["voice_only"])
            except ConsentError as e:
                raise ProtocolError(e.code, str(e))
            except ValueError as e:
                raise ProtocolError("bad_value", str(e))
        await self._send({"type": "control_ok", "identity": session.identity_name, "paused": session.paused,
                          "voice_only": session.voice is not None, "controls": vars(session.controls)})

    # ---- a voice agent's messages ---------------------------------------------------------
    def _pcm(self, data: bytes) -> None:
        if len(data) > MAX_FRAME_BYTES:
            raise ProtocolError("too_large", f"audio frames are limited to {MAX_FRAME_BYTES} bytes")
        code = self.session.push_pcm(data)
        if code == "bad_audio":
            raise ProtocolError("bad_audio", "audio frames are s16le mono PCM: an even number of bytes")
        if code == "overflow":
            now = asyncio.get_running_loop().time()
            if now - self.session._last_overflow >= 1.0:  # one error a second, not one per frame
                self.session._last_overflow = now
                raise ProtocolError("overflow", "audio arrives faster than real time: more than "
                                                "10 s waits; the excess was dropped")

    async def _say(self, msg: dict) -> None:
        from engines.voice.espeak import DEFAULT_VOICE, check_text, synthesize
        from engines.voice.speech import SpeechError
        try:
            text = check_text(msg.get("text"))
            voice = msg.get("voice", DEFAULT_VOICE)
            speech = await asyncio.get_running_loop().run_in_executor(None, synthesize, text, voice)
        except SpeechError as e:
            raise ProtocolError("bad_value", str(e)[:200])
        if self.session is not None and self.session.say_speech(speech) == "overflow":
            raise ProtocolError("overflow", "more than 10 s of speech already waits; say it later")

    async def _interrupt(self) -> None:
        self.session.interrupt()

    def _check_identity(self, name, allow, fatal: bool = False) -> None:
        try:
            check_name(name)
        except IdentityError as e:
            raise ProtocolError("bad_value", str(e)[:200], fatal)
        if not identity_allowed(allow, name):
            raise ProtocolError("forbidden_identity", f"this token may not use identity {name!r}", fatal)
        if name not in self.state.visible_identities(allow):
            raise ProtocolError("unknown_identity", f"no identity named {name!r}", fatal)

    # ---- sending and cleanup -----------------------------------------------------------
    async def _send(self, msg: dict) -> None:
        await self.ws.send(json.dumps({"v": VERSION, **msg}))

    async def _send_error(self, code: str, message: str) -> None:
        self.state.metrics.reject(code)
        try:
            await self._send({"type": "error", "code": code, "message": message})
        except Closed:
            pass

    async def _release(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await self.state.end(session)


def unloadable(name: str, error: IdentityError) -> str:
    """What a client is told when an identity's bundle cannot be loaded: its name, never the
    server's paths (those go to the log)."""
    log.warning("identity %r cannot be loaded: %s", name, error)
    return f"identity {name!r} cannot be loaded on this server"
