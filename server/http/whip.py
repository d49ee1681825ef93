"""WHIP ingest (RFC 9725) and WHEP egress over HTTP: any standard encoder can present, any
standard player can watch, with no signaling WebSocket.

    POST   /whip/{room}[?identity=NAME]   SDP offer (camera + mic) -> 201 answer, Location
    DELETE /whip/{room}/{id}              end that presenter session
    POST   /whep/{room}                   SDP offer (receive-only) -> 201 answer, Location
    DELETE /whep/{room}/{id}              end that viewer

With --cluster (docs/CLUSTER.md) a WHIP POST whose slot is on another node gets 307 with a
Location on that node (same path, ?identity and the ?reservation held there), and a WHEP POST
for a room live on another node gets 307 to it: send the same request again there.

Authorization: Bearer token (a presenter token for WHIP; a viewer or presenter token for
WHEP). Trickle-free: aiortc gathers every candidate before it answers, so the answer is
complete and PATCH is not supported (405). A resource may be deleted only with the token
that made it; anyone else gets 404, as for an id that does not exist.

A WHIP session is a presenter Session like one from the web page: the avatar of its camera
and its microphone go to the room's viewers. A WHEP player must join a room whose presenter
is live (it has no channel on which to be told "waiting"); once in, it stays through
presenter changes.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from urllib.parse import urlencode

from aiohttp import ClientConnectionError, web

from engines.identity import DEFAULT_IDENTITY, ConsentError, IdentityError, check_name
from ..rooms.room import RoomBusy, RoomFull
from ..security import (bearer as parse_bearer, check_call_frame, check_offer_sdp, check_room, identity_allowed,
                        room_allowed)
from ..state import Redirect, ServerBusy

log = logging.getLogger("avatar.whip")
SDP = "application/sdp"


def add_routes(app: web.Application, state_key) -> None:
    http = Endpoints(state_key)
    app.router.add_post("/whip/{room}", http.whip)
    app.router.add_delete("/whip/{room}/{id}", http.delete)
    app.router.add_post("/whep/{room}", http.whep)
    app.router.add_delete("/whep/{room}/{id}", http.delete)


def fail(status: int, message: str, **headers) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


class Refused(Exception):
    def __init__(self, response: web.Response):
        self.response = response


class Endpoints:
    def __init__(self, state_key):
        self.key = state_key
        self.owners: dict[str, bytes] = {}  # resource id -> sha256 of the token that made it

    async def whip(self, request: web.Request) -> web.Response:
        state = request.app[self.key]
        try:
            token, room, sdp = await self._offer_request(request, state, "presenter")
            allow = state.auth.allowed(token)
            if allow is None:
                raise Refused(fail(403, "WHIP needs a presenter token; a viewer token can only watch (WHEP)"))
            identity = request.query.get("identity", DEFAULT_IDENTITY)
            try:
                check_name(identity)
            except IdentityError as e:
                raise Refused(fail(400, str(e)[:200]))
            if not identity_allowed(allow, identity):
                raise Refused(fail(403, f"this token may not use identity {identity!r}"))
            if identity not in state.visible_identities(allow):
                raise Refused(fail(404, f"no identity named {identity!r}"))
            frame = None
            if "frame" in request.query:  # a call's camera-shaped picture (the in-call extension)
                try:
                    frame = check_call_frame(request.query["frame"])
                except ValueError as e:
                    raise Refused(fail(400, f"frame: {e}"))
            try:
                peer = await state.open_session(identity, room, who=state.who(token), address=request.remote,
                                                badge_own_video=True, frame=frame,
                                                reservation=request.query.get("reservation"))
            except Redirect as e:
                # The same request (body, Authorization) to the node that holds the slot.
                query = {"identity": identity, "reservation": e.reservation}
                if frame is not None:
                    query["frame"] = request.query["frame"]
                where = f"{e.url}whip/{room}?{urlencode(query)}"
                raise Refused(fail(307, f"placed on {e.url}", Location=where))
            except RoomBusy as e:
                raise Refused(fail(409, f"{e}; end it first or pick another room"))
            except ConsentError as e:
                raise Refused(fail(403, f"{e.code}: {e}"))
            except IdentityError:
                log.warning("identity %r cannot be loaded", identity)
                raise Refused(fail(500, f"identity {identity!r} cannot be loaded on this server"))
            except ServerBusy as e:
                raise Refused(fail(503, str(e), **{"Retry-After": "10"}))
        except Refused as r:
            return r.response
        return await self._answer(request, state, peer, token, sdp, "whip")

    async def whep(self, request: web.Request) -> web.Response:
        state = request.app[self.key]
        try:
            token, room, sdp = await self._offer_request(request, state, "viewer")
            if not room_allowed(state.auth.rooms(token), room):
                raise Refused(fail(403, f"this token may not watch room {room!r}"))
            if state.rooms.live(room) is None:
                elsewhere = await state.cluster.room_url(room) if state.cluster is not None else None
                if elsewhere is not None:  # live on another node of the cluster: watch it there
                    raise Refused(fail(307, f"room {room!r} is on {elsewhere}", Location=f"{elsewhere}whep/{room}"))
                raise Refused(fail(404, f"no presenter is live in room {room!r}; try again when one is"))
            try:
                peer = await state.open_viewer(room, who=state.who(token), address=request.remote)
            except RoomFull as e:
                raise Refused(fail(503, str(e), **{"Retry-After": "10"}))
        except Refused as r:
            return r.response
        return await self._answer(request, state, peer, token, sdp, "whep")

    async def _offer_request(self, request: web.Request, state, role: str) -> tuple[str, str, str]:
        """(token, room, offer) of a valid WHIP/WHEP POST whose offer `role` may make, or
        Refused with the HTTP error: all checked before anything is admitted."""
        token = bearer(request)
        if state.auth.role(token) is None:
            state.metrics.reject("unauthorized")
            raise Refused(fail(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"}))
        room = request.match_info["room"]
        try:
            check_room(room)
        except ValueError as e:
            raise Refused(fail(400, str(e)))
        if request.content_type != SDP:
            raise Refused(fail(415, f"the offer must be sent as {SDP}"))
        if (request.content_length or 0) > state.config.max_sdp:
            raise Refused(fail(413, f"SDP is limited to {state.config.max_sdp} bytes"))
        sdp = await self._read_offer(request, state)
        if not sdp.startswith("v=0"):
            raise Refused(fail(400, "the body must be an SDP offer starting with 'v=0'"))
        try:
            check_offer_sdp(sdp, state.config.max_candidates, role)
        except ValueError as e:
            raise Refused(fail(400, f"cannot use this offer: {e}"))
        return token, room, sdp

    async def _read_offer(self, request: web.Request, state) -> str:
        """The offer's text, read within body_timeout and max_sdp, or Refused. While it is read
        it counts against its address's budget of unfinished requests."""
        address = request.remote or "unknown"
        if not state.open_pending(address):  # the same budget as WebSockets that have not said hello
            raise Refused(fail(429, "too many requests in progress from this address", **{"Retry-After": "5"}))
        try:
            body = await asyncio.wait_for(request.read(), state.config.body_timeout)
            sdp = body.decode()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(fail(413, f"SDP is limited to {state.config.max_sdp} bytes"))
        except UnicodeDecodeError:
            raise Refused(fail(400, "the offer is not UTF-8 text"))
        except asyncio.TimeoutError:
            log.info("%s from %s: no whole offer within %g s", request.path[:40], request.remote,
                     state.config.body_timeout)
            response = fail(408, f"the offer must arrive within {state.config.body_timeout:g} s")
            response.force_close()  # rather than wait out the rest of a body that may never come
            raise Refused(response)
        except (ConnectionError, ClientConnectionError) as e:  # the client hung up mid-body: one line
            log.info("%s from %s: the client left mid-request (%s)", request.path[:40], request.remote,
                     type(e).__name__)
            raise Refused(fail(400, "the request body was cut off"))
        finally:
            state.close_pending(address)
        if len(body) > state.config.max_sdp:
            raise Refused(fail(413, f"SDP is limited to {state.config.max_sdp} bytes"))
        return sdp

    async def _answer(self, request, state, peer, token: str, sdp: str, kind: str) -> web.Response:
        try:
            answer = await peer.offer(sdp)
        except BaseException as e:  # whatever failed, the peer's slot, seat and audit row go with it
            await state.end(peer, error=f"bad offer: {str(e)[:200]}")
            if not isinstance(e, Exception):
                raise
            if not isinstance(e, ValueError):
                log.exception("%s %s: answering failed", kind.upper(), peer.id[:8])
            return fail(400, f"cannot use this offer: {str(e)[:200]}")
        self.owners[peer.id] = digest(token)
        asyncio.get_running_loop().create_task(self._end_when_done(state, peer))
        room = request.match_info["room"]
        log.info("%s %s started in room %s", kind.upper(), peer.id[:8], room)
        return web.Response(status=201, body=answer.encode(),
                            headers={"Content-Type": SDP, "Location": f"/{kind}/{room}/{peer.id}"})

    async def _end_when_done(self, state, peer) -> None:
        """A WHIP/WHEP peer has no socket whose close ends it: its own end does."""
        try:
            await peer.ended.wait()
        finally:
            self.owners.pop(peer.id, None)
            await state.end(peer)

    async def delete(self, request: web.Request) -> web.Response:
        state = request.app[self.key]
        rid = request.match_info["id"]
        owner = self.owners.get(rid)
        token = bearer(request)
        if owner is None or not hmac.compare_digest(owner, digest(token)):
            return fail(404, "no such session (or it is not yours)")
        kind = request.path.split("/")[1]
        peer = (state.sessions if kind == "whip" else state.viewers).get(rid)
        if peer is None or peer.room is None or peer.room.name != request.match_info["room"]:
            return fail(404, "no such session (or it is not yours)")
        self.owners.pop(rid, None)
        await state.end(peer)
        return web.Response(status=200)


def bearer(request: web.Request) -> str | None:
    return parse_bearer(request.headers.get("Authorization", ""))


def digest(token: str | None) -> bytes:
    """What a resource remembers of the token that made it (none in demo mode: "")."""
    return hashlib.sha256((token or "").encode("utf-8", "replace")).digest()
