"""Publish a room's avatar into a Janus VideoRoom, and watch it through Janus.

Why this exists: a room's avatar video and presenter audio are encoded once by our
server; an SFU (Janus, its VideoRoom plugin) forwards those packets to any number of
viewers. This module is the Janus side of that: a small asyncio client for Janus's HTTP
API (https://janus.conf.meetecho.com/docs/rest.html) and the VideoRoom requests
(https://janus.conf.meetecho.com/docs/videoroom.html), with aiortc peer connections.

- `JanusSession`: one Janus session: requests, a keepalive task (Janus drops a session
  after 60 s without traffic) and an event long-poll task that hands asynchronous plugin
  replies to the request that is waiting for them (matched by transaction).
- `JanusPublisher`: creates the room if needed (VP8 + Opus, one publisher) and publishes
  the given tracks from its own RTCPeerConnection.
- `JanusSubscriber`: a viewer that watches a room's feed through Janus.

aiortc gathers every ICE candidate before setLocalDescription returns, so offers and
answers are sent whole (jsep "trickle": false) and no trickle messages are needed; Janus
runs half-trickle by default, so its own SDP carries its candidates as well.

Every request has a timeout, every failure (HTTP, Janus error, plugin error, timeout)
is a `JanusError` saying what was asked and what went wrong, and closing is idempotent.
Tracks handed to publish() are not stopped on close: they belong to the caller.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Callable, Iterable

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from server.media.peer import new_peer

log = logging.getLogger(__name__)

VIDEOROOM = "janus.plugin.videoroom"
KEEPALIVE_INTERVAL = 25.0  # s; Janus's default session_timeout is 60 s
LONG_POLL_HOLD = 30.0  # s; Janus's HTTP transport answers a long poll after this at the latest
MAX_EVENTS = 10  # per long poll
ROOM_EXISTS = 427  # VideoRoom error code: "Room already exists"


class JanusError(Exception):
    """Janus refused, failed or did not answer; the message says which request and why."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class Reply:
    """A plugin's answer to a message: its data and, for offers/answers, the jsep."""

    data: dict
    jsep: dict | None = None


class JanusHandle:
    """A plugin handle. Events Janus sends for it that answer no request (webrtcup, media,
    hangup, unsolicited plugin events) land in `events`, newest last (at most 100 kept)."""

    def __init__(self, handle_id: int, plugin: str):
        self.id = handle_id
        self.plugin = plugin
        self.events: asyncio.Queue = asyncio.Queue(maxsize=100)
        self.webrtcup = asyncio.Event()  # Janus says the handle's PeerConnection is up

    def _push(self, event: dict) -> None:
        if event.get("janus") == "webrtcup":
            self.webrtcup.set()
        if self.events.full():
            self.events.get_nowait()  # drop the oldest
        self.events.put_nowait(event)


def _describe(body: dict) -> str:
    return str(body.get("request") or body.get("janus") or "request")


class JanusSession:
    """One Janus session over the HTTP API.

    `async with JanusSession(url) as s:` creates it and starts the keepalive and long-poll
    tasks; leaving destroys it. `base_url` is the API root, e.g. http://127.0.0.1:8088/janus.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0, api_secret: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_secret = api_secret
        self.id: int | None = None
        self._http: aiohttp.ClientSession | None = None
        self._handles: dict[int, JanusHandle] = {}
        self._waiting: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._broken: JanusError | None = None
        self._closed = False

    async def __aenter__(self) -> JanusSession:
        await self.create()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.destroy()

    # --- HTTP --------------------------------------------------------------------------

    async def _request(self, method: str, path: str, what: str, payload: dict | None = None,
                       timeout: float | None = None):
        if self._http is None:
            self._http = aiohttp.ClientSession()
        url = self.base_url + path
        timeout = self.timeout if timeout is None else timeout
        try:
            async with self._http.request(method, url, json=payload,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                text = await response.text()
                if response.status != 200:
                    raise JanusError(f"Janus {what}: HTTP {response.status} from {url}: {text[:200]}")
                try:
                    return await response.json(content_type=None)
                except ValueError:
                    raise JanusError(f"Janus {what}: not JSON from {url}: {text[:200]!r}") from None
        except asyncio.TimeoutError:
            raise JanusError(f"Janus did not answer {what} within {timeout:g} s ({url})") from None
        except aiohttp.ClientError as e:
            raise JanusError(f"Janus at {self.base_url} is unreachable ({what}): {e}") from None

    async def _post(self, path: str, payload: dict, what: str, transaction: str | None = None) -> dict:
        """POST a Janus API request; returns Janus's reply, raising JanusError on an error reply."""
        payload = {**payload, "transaction": transaction or secrets.token_hex(8)}
        if self.api_secret:
            payload["apisecret"] = self.api_secret
        reply = await self._request("POST", path, what, payload)
        if not isinstance(reply, dict):
            raise JanusError(f"Janus {what}: unexpected reply {reply!r:.200}")
        if reply.get("janus") == "error":
            error = reply.get("error") or {}
            raise JanusError(f"Janus {what}: {error.get('reason', 'error')} (error {error.get('code')})",
                             error.get("code"))
        return reply

    # --- session -----------------------------------------------------------------------

    async def create(self) -> None:
        """Create the session and start its keepalive and long-poll tasks."""
        if self.id is not None:
            return
        try:
            reply = await self._post("", {"janus": "create"}, "create session")
            self.id = int(reply["data"]["id"])
        except (KeyError, TypeError, ValueError):
            await self._close_http()
            raise JanusError(f"Janus create session: unexpected reply {reply!r:.200}") from None
        except BaseException:
            await self._close_http()
            raise
        self._tasks = [asyncio.create_task(self._poll(), name=f"janus-poll-{self.id}"),
                       asyncio.create_task(self._keepalive(), name=f"janus-keepalive-{self.id}")]

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self.id is None or self._closed:
            raise JanusError("Janus session is not open")

    async def attach(self, plugin: str = VIDEOROOM) -> JanusHandle:
        self._check()
        reply = await self._post(f"/{self.id}", {"janus": "attach", "plugin": plugin}, f"attach {plugin}")
        handle = JanusHandle(int(reply["data"]["id"]), plugin)
        self._handles[handle.id] = handle
        return handle

    async def detach(self, handle: JanusHandle) -> None:
        self._check()
        await self._post(f"/{self.id}/{handle.id}", {"janus": "detach"}, "detach")
        self._handles.pop(handle.id, None)

    async def message(self, handle: JanusHandle, body: dict, jsep: dict | None = None,
                      *, timeout: float | None = None) -> Reply:
        """Send `body` to the handle's plugin; return its reply.

        Synchronous plugin requests (exists, create, listparticipants...) answer in the
        HTTP reply; asynchronous ones (join, publish, start...) are acknowledged and answered
        by an event with the same transaction, which the long poll delivers. A plugin error
        (error_code in its data) raises JanusError.
        """
        self._check()
        what = f"{handle.plugin.rsplit('.', 1)[-1]} {_describe(body)}"
        transaction = secrets.token_hex(8)
        future = asyncio.get_running_loop().create_future()
        self._waiting[transaction] = future  # before the POST: the event may beat its ack
        try:
            payload = {"janus": "message", "body": body}
            if jsep is not None:
                payload["jsep"] = jsep
            reply = await self._post(f"/{self.id}/{handle.id}", payload, what, transaction)
            if reply.get("janus") == "ack":
                timeout = self.timeout if timeout is None else timeout
                try:
                    reply = await asyncio.wait_for(future, timeout)
                except asyncio.TimeoutError:
                    raise JanusError(f"Janus did not answer {what} within {timeout:g} s") from None
        finally:
            self._waiting.pop(transaction, None)
        data = (reply.get("plugindata") or {}).get("data")
        if not isinstance(data, dict):
            raise JanusError(f"Janus {what}: unexpected reply {reply!r:.200}")
        if "error_code" in data or "error" in data:
            raise JanusError(f"Janus {what}: {data.get('error', 'error')} (error {data.get('error_code')})",
                             data.get("error_code"))
        return Reply(data, reply.get("jsep"))

    async def destroy(self) -> None:
        """Destroy the session (and its handles) on Janus; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._fail_waiting(JanusError("Janus session closed"))
        if self.id is not None and self._broken is None:
            try:
                await self._post(f"/{self.id}", {"janus": "destroy"}, "destroy session")
            except JanusError as e:
                log.info("%s", e)
        await self._close_http()

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- background tasks --------------------------------------------------------------

    def _fail_waiting(self, error: JanusError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)

    def _break(self, error: JanusError) -> None:
        log.warning("%s", error)
        self._broken = error
        self._fail_waiting(error)

    def _dispatch(self, event: dict) -> None:
        kind = event.get("janus")
        if kind == "keepalive":
            return
        if kind == "timeout":
            self._break(JanusError(f"Janus timed out session {self.id}"))
            return
        future = self._waiting.get(event.get("transaction"))
        if kind == "event" and future is not None and not future.done():
            future.set_result(event)
            return
        handle = self._handles.get(event.get("sender"))
        if handle is not None:
            handle._push(event)
        if kind == "detached":
            self._handles.pop(event.get("sender"), None)

    async def _poll(self) -> None:
        rid = 0
        while self._broken is None:
            rid += 1
            try:
                events = await self._request("GET", f"/{self.id}?rid={rid}&maxev={MAX_EVENTS}",
                                             "event long poll", timeout=LONG_POLL_HOLD + self.timeout)
            except JanusError as e:
                self._break(e)
                return
            for event in events if isinstance(events, list) else [events]:
                if isinstance(event, dict):
                    if event.get("janus") == "error":
                        error = event.get("error") or {}
                        self._break(JanusError(f"Janus event long poll: {error.get('reason')} "
                                               f"(error {error.get('code')})", error.get("code")))
                        return
                    self._dispatch(event)

    async def _keepalive(self) -> None:
        while self._broken is None:
            await asyncio.sleep(KEEPALIVE_INTERVAL)
            try:
                await self._post(f"/{self.id}", {"janus": "keepalive"}, "keepalive")
            except JanusError as e:
                if e.code == 458:  # no such session: it is gone for good
                    self._break(e)
                    return
                log.warning("%s", e)


# --- VideoRoom ---------------------------------------------------------------------------

def _prefer(transceiver, mime_types: tuple[str, ...]) -> None:
    """Offer only the codecs the room uses (VP8 + its rtx, Opus)."""
    codecs = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() in mime_types])


CODECS = {"video": ("video/vp8", "video/rtx"), "audio": ("audio/opus",)}


async def _connected(pc: RTCPeerConnection, handle: JanusHandle, timeout: float, who: str) -> None:
    """Wait until both ends see the peer connection up: aiortc's connectionState is
    "connected" and Janus sent "webrtcup". JanusError if it fails or times out."""
    changed = asyncio.Event()
    pc.on("connectionstatechange", changed.set)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while pc.connectionState != "connected" or not handle.webrtcup.is_set():
            if pc.connectionState in ("failed", "closed"):
                raise JanusError(f"{who}: peer connection with Janus {pc.connectionState}")
            changed.clear()
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(handle.webrtcup.wait())]
            done, _ = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if not done:
                raise JanusError(f"{who}: peer connection with Janus not up within {timeout:g} s (aiortc: "
                                 f"{pc.connectionState}, Janus webrtcup: {handle.webrtcup.is_set()})")
    finally:
        pc.remove_listener("connectionstatechange", changed.set)


def _jsep(description: RTCSessionDescription) -> dict:
    return {"type": description.type, "sdp": description.sdp, "trickle": False}


class _RoomClient:
    """What publisher and subscriber share: a session, one VideoRoom handle, a peer
    connection, and an idempotent close that never hangs."""

    role = "Janus client"

    def __init__(self, base_url: str, room: int, timeout: float):
        self.base_url = base_url
        self.room = room
        self.timeout = timeout
        self.session: JanusSession | None = None
        self.handle: JanusHandle | None = None
        self.pc: RTCPeerConnection | None = None
        self._joined = False
        self._closing: asyncio.Task | None = None

    async def __aenter__(self):
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _open(self) -> None:
        self.session = JanusSession(self.base_url, timeout=self.timeout)
        await self.session.create()
        self.handle = await self.session.attach(VIDEOROOM)

    async def request(self, body: dict, jsep: dict | None = None) -> Reply:
        """A VideoRoom request on this client's handle."""
        if self.session is None or self.handle is None:
            raise JanusError(f"{self.role}: not open (use it as an async context manager)")
        return await self.session.message(self.handle, body, jsep)

    async def participants(self) -> list[dict]:
        """The room's participants: dicts with id, display, publisher (bool)."""
        reply = await self.request({"request": "listparticipants", "room": self.room})
        return reply.data.get("participants", [])

    async def _leave(self) -> None:
        await self.request({"request": "leave"})

    async def close(self) -> None:
        """Leave the room, destroy the session, close the peer connection. Idempotent;
        concurrent calls wait for the same close; bounded by the request timeouts."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._joined and self.session is not None and self.session._broken is None:
            self._joined = False
            try:
                await asyncio.wait_for(self._leave(), self.timeout)  # unpublish + leave: one budget
            except (JanusError, asyncio.TimeoutError) as e:
                log.info("%s leaving room %s: %s", self.role, self.room, e or "timed out")
        if self.session is not None:
            await self.session.destroy()
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), self.timeout)


class JanusPublisher(_RoomClient):
    """Publishes tracks into VideoRoom `room`, creating the room if it does not exist.

        async with JanusPublisher("http://127.0.0.1:8088/janus", 1234, "avatar",
                                  admin_key=KEY, secret=ROOM_SECRET) as pub:
            await pub.publish([video_track, audio_track])
            ...  # viewers subscribe to pub.feed_id in room 1234

    `admin_key` is the VideoRoom plugin's key for creating rooms (janus.plugin.videoroom.jcfg);
    `secret` becomes the new room's secret (needed to edit or destroy it). A room created
    here takes one publisher, VP8 video and Opus audio, and announces `bitrate` (bits/s)
    to the publisher as its cap. Leaving unpublishes, leaves the room (which stays, empty),
    destroys the session and closes the peer connection.
    """

    role = "Janus publisher"

    def __init__(self, base_url: str, room: int, display: str, admin_key: str | None = None,
                 secret: str | None = None, *, bitrate: int = 1_000_000, timeout: float = 10.0):
        super().__init__(base_url, room, timeout)
        self.display = display
        self.admin_key = admin_key
        self.secret = secret
        self.bitrate = bitrate
        self.feed_id: int | None = None  # our participant id once published
        self._published = False

    async def _open(self) -> None:
        await super()._open()
        await self.ensure_room()

    async def ensure_room(self) -> bool:
        """Create the room unless it exists; True if this call created it."""
        if (await self.request({"request": "exists", "room": self.room})).data.get("exists"):
            return False
        body = {"request": "create", "room": self.room, "description": f"avatar room {self.room}",
                "publishers": 1, "videocodec": "vp8", "audiocodec": "opus", "bitrate": self.bitrate,
                "fir_freq": 10, "permanent": False}
        if self.admin_key is not None:
            body["admin_key"] = self.admin_key
        if self.secret is not None:
            body["secret"] = self.secret
        try:
            await self.request(body)
        except JanusError as e:
            if e.code == ROOM_EXISTS:  # created meanwhile by someone else: fine
                return False
            raise
        log.info("created Janus room %s", self.room)
        return True

    async def publish(self, tracks: Iterable[MediaStreamTrack]) -> None:
        """Join the room as its publisher and send `tracks` (video and/or audio); returns
        once the peer connection is up on both ends. Once per publisher."""
        tracks = list(tracks)
        if not tracks:
            raise ValueError("publish needs at least one track")
        if self.handle is None or self._closing is not None:
            raise JanusError(f"{self.role}: not open (use it as an async context manager)")
        if self.pc is not None:
            raise JanusError(f"{self.role}: already published in room {self.room}")
        self.pc = new_peer()
        for track in tracks:
            _prefer(self.pc.addTransceiver(track, direction="sendonly"), CODECS[track.kind])
        await self.pc.setLocalDescription(await self.pc.createOffer())
        reply = await self.request({"request": "joinandconfigure", "room": self.room, "ptype": "publisher",
                                    "display": self.display, "bitrate": self.bitrate},
                                   _jsep(self.pc.localDescription))
        self._joined = True
        self.feed_id = reply.data.get("id")
        if not reply.jsep or reply.jsep.get("type") != "answer":
            raise JanusError(f"{self.role}: Janus sent no SDP answer to our offer: {reply.data}")
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.jsep["sdp"], "answer"))
        self._published = True
        await _connected(self.pc, self.handle, self.timeout, self.role)

    async def _leave(self) -> None:
        if self._published:
            self._published = False
            try:
                await self.request({"request": "unpublish"})
            except JanusError as e:
                log.info("%s unpublish: %s", self.role, e)
        await super()._leave()


class JanusSubscriber(_RoomClient):
    """A viewer of VideoRoom `room` through Janus: subscribes to feed `feed` (default: the
    room's first publisher) and receives its tracks.

        async with JanusSubscriber(url, 1234, on_track=handle_track) as sub:
            ...  # sub.tracks: the received MediaStreamTracks

    `on_track(track)` is called for each track as it is announced (before entering returns).
    Read (recv) the tracks you keep: aiortc queues every decoded frame until it is read.
    """

    role = "Janus subscriber"

    def __init__(self, base_url: str, room: int, feed: int | None = None, *,
                 on_track: Callable[[MediaStreamTrack], None] | None = None, timeout: float = 10.0):
        super().__init__(base_url, room, timeout)
        self.feed_id = feed
        self.on_track = on_track
        self.tracks: list[MediaStreamTrack] = []

    async def _open(self) -> None:
        await super()._open()
        if self.feed_id is None:
            publishers = [p for p in await self.participants() if p.get("publisher")]
            if not publishers:
                raise JanusError(f"{self.role}: room {self.room} has no publisher to watch")
            self.feed_id = publishers[0]["id"]
        reply = await self.request({"request": "join", "room": self.room, "ptype": "subscriber",
                                    "streams": [{"feed": self.feed_id}]})
        self._joined = True
        if not reply.jsep or reply.jsep.get("type") != "offer":
            raise JanusError(f"{self.role}: Janus sent no SDP offer for feed {self.feed_id}: {reply.data}")
        self.pc = new_peer()
        self.pc.on("track", self._track)
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.jsep["sdp"], "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self.request({"request": "start"}, _jsep(self.pc.localDescription))
        await _connected(self.pc, self.handle, self.timeout, self.role)

    def _track(self, track: MediaStreamTrack) -> None:
        self.tracks.append(track)
        if self.on_track is not None:
            self.on_track(track)
