"""What every connection of one server shares: settings, identities, auth, metrics, rooms,
the live sessions and viewers, and admission (how many compute-heavy sessions may run at once,
how many viewers may watch).

Presenter sessions and viewers are opened and ended here whichever way they came (signaling
WebSocket, WHIP, WHEP), so admission, room membership and the audit log (server/audit.py:
who used which identity, from where, when) are kept in one place.
"""
from __future__ import annotations

import asyncio
import logging

from engines.identity import DEFAULT_IDENTITY, IdentityStore, identities_dir
from .audit import AuditLog, AuditThread, audit_path, token_id
# Redirect (placed on another node, --cluster) is raised by open_session; http/ imports it from here.
from .cluster.node import ClusterNode, LocalView, NoSlot, Redirect, RoomTaken, client_key  # noqa: F401 (Redirect)
from .cluster.audit import AuditMirror
from .config import ServerConfig
from .rooms.room import RoomBusy, Rooms
from .security import AddressLimits, TokenAuth, identity_allowed
from .session import Session
from .voice_session import VoiceSession
from .telemetry import Metrics
from .rooms.viewer import Viewer

log = logging.getLogger("avatar.state")


class ServerBusy(Exception):
    """No session slot left."""


class ServerState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = IdentityStore(config.identities_root or identities_dir())
        self.auth = TokenAuth(config.tokens, config.viewer_tokens)
        self.metrics = Metrics()
        self.rooms = Rooms(config)
        self.sessions: dict[str, Session] = {}
        self.viewers: dict[str, Viewer] = {}
        self.sockets: set = set()  # open signaling WebSockets, closed on shutdown
        self.addresses = AddressLimits(config.max_pending_per_address, config.address_rate, config.address_burst,
                                       config.auth_rate, config.auth_burst)
        self.pending = 0  # connections that have not said hello yet
        self.draining = False  # drain(): no new presenters
        self.metrics.watch(self)
        # Next to the identities: <home>/audit.db. open() (at start) ends what a killed server left open.
        home = config.identities_root.parent if config.identities_root else None
        self.audit = AuditThread(AuditLog(audit_path(home), "avatar serve"), config.audit_retention_days)
        # With --cluster: this node in Redis (server/cluster/), and its audit events copied there
        # for `avatar audit --cluster`; started by start_cluster().
        self.cluster = (ClusterNode(config.cluster, config.advertise_url, config.cluster_allow, config.max_sessions,
                                    LocalView(lambda: self.metrics.sessions_active, self._live_rooms))
                        if config.cluster else None)
        self.audit_mirror = AuditMirror(self.cluster, self.audit) if config.cluster else None

    def _live_rooms(self) -> list[tuple[str, str, int]]:
        return [(r.name, r.presenter.identity_name, len(r.audience))
                for r in list(self.rooms.rooms.values()) if r.presenter is not None]

    async def start_cluster(self) -> None:
        """Register in the cluster (a Redis that cannot be reached yet is logged, and retried)."""
        if self.cluster is not None:
            await self.cluster.start()
            await self.audit_mirror.start()

    def who(self, token) -> str:
        """The audit log's name for a client: its token's id (never the token), or 'demo'."""
        return "demo" if self.auth.demo_mode else token_id(token)

    def visible_identities(self, allow) -> list[str]:
        names = set(self.store.names()) | {DEFAULT_IDENTITY}
        return sorted(n for n in names if identity_allowed(allow, n))

    # ---- admission: check and reserve with no await in between ---------------------------
    def admit(self) -> bool:
        """Reserve a session slot; False when the server is at max_sessions or draining."""
        if self.draining or self.metrics.sessions_active >= self.config.max_sessions:
            return False
        self.metrics.sessions_active += 1
        self.metrics.sessions_total += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by admit()."""
        self.metrics.sessions_active -= 1

    async def _place(self, room_name: str | None, reservation: str | None, address: str | None) -> None:
        """With --cluster: where this presenter goes. Returns with cluster.in_flight raised by
        one (the caller admits, then lowers it) to admit here; raises Redirect, ServerBusy or
        RoomBusy otherwise."""
        cluster = self.cluster
        cluster.in_flight += 1
        try:
            await cluster.place(reservation, room_name, address)
        except NoSlot as e:
            cluster.in_flight -= 1
            raise ServerBusy(str(e)) from None
        except RoomTaken as e:
            cluster.in_flight -= 1
            raise RoomBusy(str(e)) from None
        except BaseException:
            cluster.in_flight -= 1
            raise

    async def open_session(self, identity: str, room_name: str | None = None, *, who: str,
                           address: str | None = None, badge_own_video: bool = False,
                           reservation: str | None = None, make=Session,
                           frame: tuple[int, int] | None = None) -> Session:
        """A started presenter session, publishing into `room_name` if given, on record in the
        audit log as used by `who` (ServerState.who) from `address`. Raises RoomBusy,
        ServerBusy, IdentityError (the identity cannot be loaded), or the audit log's error
        (a use that cannot be recorded is refused). With --cluster it may raise Redirect (the
        slot is on another node); `reservation` is the slot another node reserved here. `make`
        builds the session (a Session subclass: a voice agent's, server/voice_session.py). `frame`
        (width, height): the avatar is sent composed into a call frame of that size."""
        if room_name and self.rooms.live(room_name) is not None:
            raise RoomBusy(f"room {room_name!r} already has a presenter")
        placed = False
        if self.cluster is not None:
            await self._place(room_name, reservation, client_key(address, who))
            placed = True
        try:
            room = self.rooms.get(room_name) if room_name else None
            if room is not None and room.presenter is not None:
                self.rooms.tidy(room)
                raise RoomBusy(f"room {room_name!r} already has a presenter")
            admitted = self.admit()
        finally:
            if placed:
                self.cluster.in_flight -= 1
        if not admitted:
            if room is not None:
                self.rooms.tidy(room)
                if placed:  # the cluster's room entry made for this presenter goes too
                    self.cluster.vacate_soon(room_name)
            if self.draining:
                raise ServerBusy("this server is draining before it stops; connect again to be placed elsewhere")
            raise ServerBusy(f"the server is at its limit of {self.config.max_sessions} sessions; "
                             "try again later")
        session = make(self, identity, room, badge_own_video)
        session.frame = frame
        if session.role == "session":  # a presenter: its microphone may drive the face (voice only)
            session.make_voice = VoiceSession
        self.sessions[session.id] = session
        if room is not None:
            room.claim(session)
        try:
            await self.audit.start("session", who, identity, address=address, room=room_name, use_id=session.id)
            await session.start()
        except BaseException as e:
            await self.end(session, error=f"start failed: {type(e).__name__}: {e}")
            raise
        return session

    async def open_viewer(self, room_name: str, notify=None, *, who: str,
                          address: str | None = None) -> Viewer:
        """A viewer seated in `room_name` (not yet negotiated), on record in the audit log.
        Raises RoomFull, or the audit log's error."""
        room = self.rooms.get(room_name)
        viewer = Viewer(self, room, notify)
        try:
            self.rooms.admit_viewer(room, viewer.audience)
        except Exception:
            self.rooms.tidy(room)
            raise
        self.viewers[viewer.id] = viewer
        watched = room.presenter.identity_name if room.presenter is not None else None
        try:
            await self.audit.start("viewer", who, watched, address=address, room=room_name, use_id=viewer.id)
        except BaseException as e:
            await self.end(viewer, error=f"start failed: {type(e).__name__}: {e}")
            raise
        return viewer

    async def switched(self, session: Session) -> None:
        """The session now shows another identity: on record."""
        await self.audit.switched(session.id, session.identity_name)

    async def end(self, peer, error: str | None = None) -> None:
        """End a session or viewer (idempotent), and record it in the audit log: frames produced,
        why it ended (status 'error' with `error` if it never got going). The slot is free at
        once, before the teardown (~20 ms): a client that reconnects right after its close must
        not find its own old session still counted."""
        if isinstance(peer, Session):
            if self.sessions.pop(peer.id, None) is None:
                return
            self.release()
            if self.cluster is not None:
                self.cluster.sessions_changed()
        elif self.viewers.pop(peer.id, None) is None:
            return
        room = peer.room
        try:
            await peer.close()
        finally:
            if room is not None:
                if self.cluster is not None and isinstance(peer, Session) and room.presenter is None:
                    self.cluster.vacate_soon(room.name)
                self.rooms.tidy(room)
            log.info("%s %s ended (%s)", peer.role, peer.id[:8], peer.end_reason)
            stats = getattr(peer, "stats", None)
            await self.audit.end(peer.id, stats.frames if stats is not None else None,
                                 "error" if error else "ok", error or peer.end_reason)

    # ---- connections before hello: bounded in all and per address ----------------------
    def open_pending(self, address: str) -> bool:
        """Count a connection that has not said hello; False when over either bound."""
        if self.pending >= self.config.max_pending or not self.addresses.open_pending(address):
            return False
        self.pending += 1
        return True

    def close_pending(self, address: str) -> None:
        self.pending -= 1
        self.addresses.close_pending(address)

    async def drain(self, grace: float) -> None:
        """Stop admitting presenters (with --cluster, placement sends them to other nodes), let
        running sessions end by themselves for `grace` seconds, then end the rest with
        `server_draining`, which tells their pages to connect again (and be placed elsewhere)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: no new presenters; %d session(s) have %g s to end", len(self.sessions), grace)
        if self.cluster is not None:
            await self.cluster.set_state("draining")
        deadline = asyncio.get_running_loop().time() + grace
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        for session in list(self.sessions.values()):
            session.end_code, session.end_reason = "server_draining", "the server is draining: connect again"
            session.ended.set()  # WebSocket and WHIP owners end it, and say why
        while self.sessions and asyncio.get_running_loop().time() < deadline + 5:
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """End everything still open (WHIP/WHEP peers have no socket that ends them)."""
        peers = [*self.sessions.values(), *self.viewers.values()]
        await asyncio.gather(*(self.end(p) for p in peers), return_exceptions=True)
        await self.rooms.close()
        if self.cluster is not None:
            await self.audit_mirror.stop()  # the ends just recorded reach the stream before the node leaves
            await self.cluster.stop()
        await self.audit.close()
