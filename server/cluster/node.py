"""This node in a cluster of avatar servers that share one Redis (`avatar serve --cluster URL`).

What Redis holds (prefix `avatar:`; one Redis, not Redis Cluster: the scripts build key names):

    avatar:nodes                 set of node ids (stale ids are dropped by whoever meets them)
    avatar:node:ID               hash: url, capacity, sessions, load, state, started; expires TTL_MS
                                 after the node's last refresh (one every REFRESH s)
    avatar:node:ID:reserved      sorted set: reservation id -> expiry (ms, Redis's clock): slots
                                 promised to presenters redirected to that node
    avatar:room:NAME             hash: node, identity, viewers; expires as the node's key does
    avatar:redirects:CLIENT      redirects given to a client (its address and token: client_key);
                                 expires RESERVATION_MS after its first (REDIRECTS_PER_ADDRESS,
                                 cluster-wide)
    avatar:audit                 stream: every node's audit events (server/cluster/audit.py)

Placement is one EVAL (PLACE): the live nodes' free slots (capacity - sessions - live
reservations) are read, the least loaded node whose URL the caller allows is picked, and its
count goes up in the same script, so a burst of hellos spread over many nodes never admits
more than there are slots. A reservation not consumed (a hello with it on the target) within
RESERVATION_MS expires. Everything here is Redis's own (key expiry, Lua's atomicity): there is
no heartbeat or consensus protocol of ours.

Redis lost: every call fails fast (1 s timeouts, no retries), the node admits only locally
(within its own max_sessions), says so once in the log and in `status`, and the refresh that
succeeds again re-registers it (and its rooms).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from .redis_url import redacted, redis_client

log = logging.getLogger("avatar.cluster")

PREFIX = "avatar:"
REFRESH = 1.0  # seconds between refreshes of this node's registration
TTL_MS = 3000  # a node (and its rooms) not refreshed for this long is gone
RESERVATION_MS = 5000  # a redirected presenter has this long to say hello on the target
# Redirects one client (client_key: address and token) may be given per RESERVATION_MS by the
# whole cluster (counted in Redis by PLACE): each holds a slot elsewhere until it is used or
# expires, so a client that never follows could hoard them. Past it, the client is placed
# where it knocked or nowhere.
REDIRECTS_PER_ADDRESS = 8
RESERVATION = re.compile(r"^[0-9a-f]{32}$")


def client_key(address: str | None, who: str) -> str | None:
    """What the redirect bound counts: a client address with its token's id (ServerState.who),
    so presenters behind one NAT who hold tokens of their own do not share one bound, and a
    token holder knocking from one address is still held to it."""
    return None if address is None else f"{address}#{who}"

# ARGV: prefix, self id, reservation id, reservation ms, room ('' for none), client address ('':
# unknown), redirects per address, n, allowed prefixes...
# Returns false (no free slot), {'room_busy', owner}, or {chosen id, chosen url}.
PLACE = """
local prefix, self_id, rid, ttl, room = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local address, per_address = ARGV[6], tonumber(ARGV[7])
local akey = prefix .. 'redirects:' .. address
local allow = {}
if address == '' or tonumber(redis.call('GET', akey) or '0') < per_address then
  for i = 1, tonumber(ARGV[8]) do allow[i] = ARGV[8 + i] end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if room ~= '' then
  local owner = redis.call('HGET', prefix .. 'room:' .. room, 'node')
  if owner and owner ~= self_id and redis.call('EXISTS', prefix .. 'node:' .. owner) == 1 then
    return {'room_busy', owner}
  end
end
local best, best_url, best_score
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
  local key = prefix .. 'node:' .. id
  local f = redis.call('HMGET', key, 'url', 'capacity', 'sessions', 'load', 'state')
  if not f[1] then
    redis.call('SREM', prefix .. 'nodes', id)
  elseif f[5] == 'up' then
    local ok = id == self_id
    for _, p in ipairs(allow) do
      if string.sub(f[1], 1, #p) == p then ok = true end
    end
    if ok then
      local rkey = key .. ':reserved'
      redis.call('ZREMRANGEBYSCORE', rkey, '-inf', now)
      local cap = tonumber(f[2]) or 0
      local used = (tonumber(f[3]) or 0) + redis.call('ZCARD', rkey)
      if cap > used then
        -- least loaded: the share of its slots taken, then its CPU load; a tie stays here
        local score = used / cap + 0.01 * math.min(tonumber(f[4]) or 0, 10)
        if id == self_id then score = score - 0.001 end
        if best == nil or score < best_score then best, best_url, best_score = id, f[1], score end
      end
    end
  end
end
if best == nil then return false end
local key = prefix .. 'node:' .. best
if best == self_id then
  redis.call('HINCRBY', key, 'sessions', 1)
else
  redis.call('ZADD', key .. ':reserved', now + ttl, rid)
  redis.call('PEXPIRE', key .. ':reserved', ttl * 2)
  if address ~= '' and redis.call('INCR', akey) == 1 then redis.call('PEXPIRE', akey, ttl) end
end
if room ~= '' then
  local rkey = prefix .. 'room:' .. room
  redis.call('DEL', rkey)
  redis.call('HSET', rkey, 'node', best, 'identity', '', 'viewers', 0)
  redis.call('PEXPIRE', rkey, ttl)
end
return {best, best_url}
"""

# ARGV: prefix, self id, reservation id, sessions now. 1 if the reservation was ours and live.
CONSUME = """
local key = ARGV[1] .. 'node:' .. ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', key .. ':reserved', ARGV[3])
if not expiry then return 0 end
redis.call('ZREM', key .. ':reserved', ARGV[3])
if tonumber(expiry) < now then return 0 end
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'sessions', ARGV[4]) end
return 1
"""

# ARGV: prefix, self id, ttl ms, n fields, field/value pairs..., then room/identity/viewers triples.
REFRESH_SCRIPT = """
local prefix, id, ttl, nf = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key = prefix .. 'node:' .. id
local fields = {}
for i = 1, nf * 2 do fields[i] = ARGV[4 + i] end
redis.call('HSET', key, unpack(fields))
redis.call('PEXPIRE', key, ttl)
redis.call('SADD', prefix .. 'nodes', id)
local i = 5 + nf * 2
while i + 2 <= #ARGV do
  local rkey = prefix .. 'room:' .. ARGV[i]
  local owner = redis.call('HGET', rkey, 'node')
  if (not owner) or owner == id or redis.call('EXISTS', prefix .. 'node:' .. owner) == 0 then
    redis.call('HSET', rkey, 'node', id, 'identity', ARGV[i + 1], 'viewers', ARGV[i + 2])
    redis.call('PEXPIRE', rkey, ttl)
  end
  i = i + 3
end
return 1
"""

# ARGV: prefix, self id, room. Deletes the room's entry if this node holds it.
VACATE = """
local rkey = ARGV[1] .. 'room:' .. ARGV[3]
if redis.call('HGET', rkey, 'node') == ARGV[2] then redis.call('DEL', rkey) end
return 1
"""

# ARGV: prefix, self id. A clean stop: this node and its rooms go at once.
WITHDRAW = """
local key = ARGV[1] .. 'node:' .. ARGV[2]
redis.call('DEL', key, key .. ':reserved')
redis.call('SREM', ARGV[1] .. 'nodes', ARGV[2])
return 1
"""


class Redirect(Exception):
    """The presenter goes to another node: `url` is that node's base URL (http[s]://host:port/),
    `reservation` the slot held there for it."""

    def __init__(self, url: str, reservation: str):
        super().__init__(f"placed on {url}")
        self.url, self.reservation = url, reservation

    def ws_url(self) -> str:
        return f"{ws_base(self.url)}ws?reservation={self.reservation}"


class NoSlot(Exception):
    """No live node has a free slot."""


class RoomTaken(Exception):
    """The room's presenter is live on another node."""


def ws_base(url: str) -> str:
    """http://h:p/ -> ws://h:p/ (https -> wss)."""
    return "ws" + url[4:] if url.startswith("http") else url


def check_advertise_url(url: str) -> str:
    """The advertised base URL, normalised to end in '/'; ValueError if it is not a plain
    http(s) URL of a host (with no query, fragment or credentials)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise ValueError(f"--advertise-url must be http(s)://HOST[:PORT][/PATH], got {url!r}")
    return url if url.endswith("/") else url + "/"


def allowed(url: str, prefixes) -> bool:
    return any(url.startswith(p) for p in prefixes)


def cpu_load() -> float:
    """The 1-minute load average per core (0 = idle, 1 = every core busy)."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except OSError:
        return 0.0


@dataclass
class LocalView:
    """What the node reports of itself each refresh: sessions now, and its live rooms as
    (name, identity, viewers)."""
    sessions: Callable[[], int]
    rooms: Callable[[], list[tuple[str, str, int]]]


class ClusterNode:
    def __init__(self, redis_url: str, advertise_url: str, allow: list[str], capacity: int, local: LocalView,
                 client=None):
        self.redis_url = redis_url
        self.url = check_advertise_url(advertise_url)
        self.allow = list(allow)
        self.capacity = capacity
        self.local = local
        self.id = secrets.token_hex(6)
        self.in_flight = 0  # placements decided here and not yet admitted: counted as sessions
        self.reachable = False
        self.error: str | None = "not registered yet"
        self.started = time.time()
        self.state = "up"  # or "draining": placement picks only nodes that are up
        self._client = client
        self._task: asyncio.Task | None = None
        self._scripts: dict = {}
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is None:
            # One connection: commands reach Redis in the order they are issued, so a refresh
            # never overtakes a placement with an older session count.
            self._client = redis_client(self.redis_url, single_connection=True)
        for name, text in (("place", PLACE), ("consume", CONSUME), ("refresh", REFRESH_SCRIPT),
                           ("vacate", VACATE), ("withdraw", WITHDRAW)):
            self._scripts[name] = self._client.register_script(text)
        log.info("node %s (%s) joins through Redis at %s", self.id, self.url, redacted(self.redis_url))
        try:
            await self.refresh()
        except ClusterUnavailable:
            pass  # logged; the refresh loop registers this node once Redis answers
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        """A clean stop: withdrawn from Redis at once (a killed node's keys expire instead)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._tasks):
            await asyncio.gather(t, return_exceptions=True)
        if self.reachable:
            try:
                await self._scripts["withdraw"](args=[PREFIX, self.id])
                for name, _, _ in self.local.rooms():
                    await self._scripts["vacate"](args=[PREFIX, self.id, name])
                log.info("node %s withdrawn", self.id)
            except Exception as e:  # noqa: BLE001 - any Redis failure: the keys expire anyway
                log.info("could not withdraw (%s); the registration expires by itself", e)
        if self._client is not None:
            await self._client.aclose()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self.refresh()
            except ClusterUnavailable:
                pass  # logged once by _lost; the next refresh that gets through re-registers

    async def set_state(self, state: str) -> None:
        """Say it at once (placement elsewhere reads it), not at the next refresh."""
        self.state = state
        with contextlib.suppress(ClusterUnavailable):
            await self.refresh()

    def reported_sessions(self) -> int:
        return self.local.sessions() + self.in_flight

    async def refresh(self) -> None:
        fields = {"url": self.url, "capacity": self.capacity, "sessions": self.reported_sessions(),
                  "load": cpu_load(), "state": self.state, "started": int(self.started)}
        args = [PREFIX, self.id, TTL_MS, len(fields)]
        for k, v in fields.items():
            args += [k, v]
        for name, identity, viewers in self.local.rooms():
            args += [name, identity, viewers]
        await self._call("refresh", args)

    # ---- Redis calls: any failure marks Redis unreachable ----------------------------------
    async def _call(self, script: str, args: list):
        try:
            result = await self._scripts[script](args=args)
        except Exception as e:  # noqa: BLE001 - redis' ConnectionError, TimeoutError, ResponseError...
            self._lost(e)
            raise ClusterUnavailable(str(e)) from None
        self._back()
        return result

    def _lost(self, error: Exception) -> None:
        if self.reachable or self.error == "not registered yet":
            log.warning("Redis unreachable (%s: %s); running sessions go on, new ones are "
                        "admitted here only, within --max-sessions", type(error).__name__, error)
        self.reachable = False
        self.error = "redis unreachable"

    def _back(self) -> None:
        if not self.reachable:
            if self.error != "not registered yet":
                log.info("Redis reachable again; node %s re-registered", self.id)
            else:
                log.info("node %s registered", self.id)
        self.reachable, self.error = True, None

    @property
    def client(self):
        """The node's one Redis connection (None before start()): what else this node writes to
        the cluster's Redis (its audit events, server/cluster/audit.py) goes through it too."""
        return self._client

    @property
    def status(self) -> str:
        return "ok" if self.reachable else (self.error or "redis unreachable")

    # ---- placement --------------------------------------------------------------------------
    async def place(self, reservation: str | None = None, room: str | None = None,
                    address: str | None = None) -> None:
        """Where a new presenter (from `address`: client_key) goes. Returns (admit here: the caller
        admits locally, with no await in between, and then lowers `in_flight`, which the caller
        raised before this call), or raises Redirect, NoSlot or RoomTaken. Redis unreachable:
        returns (local). An address past REDIRECTS_PER_ADDRESS (cluster-wide) is placed here or
        nowhere."""
        if not self.reachable:
            return
        try:
            if reservation is not None and RESERVATION.match(reservation):
                if await self._call("consume", [PREFIX, self.id, reservation, self.reported_sessions()]):
                    return
            rid = secrets.token_hex(16)
            result = await self._call("place", [PREFIX, self.id, rid, RESERVATION_MS, room or "", address or "",
                                                REDIRECTS_PER_ADDRESS, len(self.allow), *self.allow])
        except ClusterUnavailable:
            return
        if not result:
            raise NoSlot("every node of the cluster is at its limit of sessions; try again later")
        chosen, url = result
        if chosen == "room_busy":
            raise RoomTaken(f"room {room!r} already has a presenter (on node {url})")
        if chosen == self.id:
            return
        if not allowed(url, self.allow):  # the script checked it too: never send a client elsewhere
            log.warning("node %s advertises %r, outside --cluster-allow; not redirecting there", chosen, url)
            raise NoSlot("no node with a free slot may be used; try again later")
        raise Redirect(url, rid)

    def vacate_soon(self, room: str) -> None:
        """The room's presenter here is gone: its entry goes (if this node still holds it)."""
        if not self.reachable:
            return
        task = asyncio.get_running_loop().create_task(self._vacate(room))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _vacate(self, room: str) -> None:
        try:
            await self._call("vacate", [PREFIX, self.id, room])
        except ClusterUnavailable:
            pass

    def sessions_changed(self) -> None:
        """A session ended: report it now rather than at the next refresh (a freed slot)."""
        if not self.reachable:
            return
        task = asyncio.get_running_loop().create_task(self._refresh_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except ClusterUnavailable:
            pass

    # ---- what the cluster holds -----------------------------------------------------------
    async def nodes(self) -> list[dict]:
        """Every registered node (live ones; a dead one's key has expired)."""
        c = self._client
        try:
            ids = sorted(await c.smembers(PREFIX + "nodes"))
            now_ms = int(time.time() * 1000)
            out = []
            for node_id in ids:
                h = await c.hgetall(f"{PREFIX}node:{node_id}")
                if not h:
                    continue
                reserved = await c.zcount(f"{PREFIX}node:{node_id}:reserved", now_ms, "+inf")
                out.append({"id": node_id, "url": h.get("url"), "capacity": int(h.get("capacity", 0)),
                            "sessions": int(h.get("sessions", 0)), "reserved": reserved,
                            "load": float(h.get("load", 0)), "state": h.get("state"),
                            "allowed": node_id == self.id or allowed(h.get("url", ""), self.allow),
                            "self": node_id == self.id})
        except Exception as e:  # noqa: BLE001
            self._lost(e)
            raise ClusterUnavailable(str(e)) from None
        return out

    async def rooms(self) -> list[dict]:
        """Every room with a presenter anywhere in the cluster, with its node's id and URL."""
        c = self._client
        try:
            urls = {n["id"]: n["url"] for n in await self.nodes()}
            out = []
            async for key in c.scan_iter(match=PREFIX + "room:*", count=1000):
                h = await c.hgetall(key)
                if not h or h.get("node") not in urls:
                    continue
                out.append({"room": key[len(PREFIX) + 5:], "node": h["node"], "url": urls[h["node"]],
                            "identity": h.get("identity") or None, "viewers": int(h.get("viewers") or 0)})
        except ClusterUnavailable:
            raise
        except Exception as e:  # noqa: BLE001
            self._lost(e)
            raise ClusterUnavailable(str(e)) from None
        return sorted(out, key=lambda r: r["room"])

    async def room_url(self, room: str) -> str | None:
        """The base URL of the node where `room`'s presenter is live, if another allowed one."""
        if not self.reachable:
            return None
        c = self._client
        try:
            owner = await c.hget(f"{PREFIX}room:{room}", "node")
            if owner is None or owner == self.id:
                return None
            url = await c.hget(f"{PREFIX}node:{owner}", "url")
        except Exception as e:  # noqa: BLE001
            self._lost(e)
            return None
        return url if url and allowed(url, self.allow) else None


class ClusterUnavailable(Exception):
    """Redis could not be reached (or answered with an error)."""
