"""Every node's audit events in one Redis stream, so that one `avatar audit --cluster URL`
sees every node's uses (issue #37).

    avatar:audit    stream: one entry per event of any node's audit log: the columns of
                    server/audit.py's events table (seq, use_id, event, at, kind, who, identity,
                    room, address, frames, status, reason, run_id; none that are empty), plus
                    `node` (the node's id, as `avatar nodes` shows it) and `node_url`

Each node's own SQLite log stays the truth; the stream is a copy for reading across nodes.
`AuditMirror` tails the local log by its `seq` and XADDs what it has not sent yet, about once
a second, through the node's own Redis connection (its 1 s timeouts). It never touches a
session: sessions write the local log and go on, whatever Redis does. Everything the log
records is copied: session and viewer starts, switches and ends, recover()'s 'abnormal' ends
at start, and anything else written to the same home (renders, enrollments).

Redis unreachable: nothing is lost; the events wait in the local log, and once Redis answers
they are sent, oldest first (at most MAXLEN of them: older ones would be trimmed at once).
The last seq sent is kept in `<home>/audit.mirrored`, so a node that stops or is killed sends
the rest when it starts again on the same home.

What the cluster's view can still miss (each node's `avatar audit` has all of it):
* uses older than the stream's last ~MAXLEN entries: trimmed, and a use whose start was
  trimmed is not shown;
* events a node wrote but had not sent when it died (up to a second's, or all since Redis
  became unreachable), until it starts again on the same home;
* what a Redis that restarted empty held before (it has what was sent since);
* uses recorded on a home before it first joined a cluster.

A use with no end whose node is no longer registered shows as 'node lost' (server/audit.py
fold_uses): that node was killed, and records the end (recover()'s 'abnormal' one) when it
starts again; or it is cut off from Redis, and the use shows open again once it is back.
Imports only redis (and the stdlib).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from .node import PREFIX, ClusterNode
from .redis_url import redacted, redis_client

log = logging.getLogger("avatar.cluster.audit")

STREAM = PREFIX + "audit"
# Entries the stream keeps (XADD MAXLEN ~: Redis trims whole blocks, so a few more). A use is
# two entries (start, end), so this is the cluster's last ~50,000 uses: its recent past, not
# an archive (each node's log is that). Measured with 20 nodes' session and viewer events:
# ~290 bytes an entry, ~29 MB of Redis memory when full, and `avatar audit --cluster` reads
# and folds it all in ~7 s on 2 busy cores. More would make both grow in proportion.
MAXLEN = 100_000
MIRROR_EVERY = 1.0  # seconds between looks at the local log: how late an event reaches the stream
BATCH = 500  # events read from the local log at once
PAGE = 1000  # entries read from the stream at once by `avatar audit --cluster`
FINAL_FLUSH = 2.0  # seconds a stopping node may spend sending its last events


def entry(event: dict, node: ClusterNode) -> dict:
    """An event of the local log as a stream entry of `node`'s."""
    fields = {k: v for k, v in event.items() if v is not None}
    fields.update(node=node.id, node_url=node.url)
    return fields


class AuditMirror:
    """Copies a node's audit log into the stream. `audit` is the node's AuditThread (its log,
    events_after, last_seq and seq_at_open); the last seq sent is kept beside the log."""

    def __init__(self, node: ClusterNode, audit):
        self.node, self.audit = node, audit
        self.cursor = audit.log.path.with_name(audit.log.path.stem + ".mirrored")  # <home>/audit.mirrored
        self.seq: int | None = None
        self._task: asyncio.Task | None = None
        self._failing = False

    async def start(self) -> None:
        """From where it stopped on this home; the first time, from the events of this server's
        start on (the uses before were never in the cluster)."""
        self.seq = await asyncio.to_thread(read_cursor, self.cursor)
        if self.seq is None:
            self.seq = self.audit.seq_at_open if self.audit.seq_at_open is not None else await self.audit.last_seq()
            await asyncio.to_thread(write_cursor, self.cursor, self.seq)
        self._task = asyncio.get_running_loop().create_task(self._mirror_forever())

    async def stop(self) -> None:
        """Send what is left (the ends of the sessions just closed), for at most FINAL_FLUSH s."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), FINAL_FLUSH)
        await asyncio.to_thread(write_cursor, self.cursor, self.seq)  # exact, even if cut short

    async def _mirror_forever(self) -> None:
        while True:
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - the local log unreadable: said, and tried again
                log.exception("audit mirror: cannot read the local audit log")
            await asyncio.sleep(MIRROR_EVERY)

    async def flush(self) -> int:
        """Send every event after the cursor while Redis answers; how many were sent."""
        if self.seq is None or not self.node.reachable:
            return 0  # the node says when Redis is lost and back; the events wait meanwhile
        last = await self.audit.last_seq()
        if last - self.seq > MAXLEN:
            log.warning("audit mirror: %d event(s) older than the stream keeps are not sent (the local "
                        "log has them)", last - MAXLEN - self.seq)
            self.seq = last - MAXLEN
        sent = 0
        while self.seq < last:
            events = await self.audit.events_after(self.seq, BATCH)
            if not events:
                break
            went = await self._send(events)
            sent += went
            await asyncio.to_thread(write_cursor, self.cursor, self.seq)
            if went < len(events):
                return sent  # Redis failed: the rest waits for the next flush
        self._back(sent)
        return sent

    async def _send(self, events: list[dict]) -> int:
        """XADD the events in order, up to the first failure; how many went."""
        for went, event in enumerate(events):
            try:
                await self.node.client.xadd(STREAM, entry(event, self.node), maxlen=MAXLEN, approximate=True)
            except Exception as e:  # noqa: BLE001 - redis' ConnectionError, TimeoutError, ResponseError...
                self._failed(e)
                return went
            self.seq = event["seq"]
        return len(events)

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            log.warning("audit mirror: cannot write to Redis (%s: %s); the events wait in the local log",
                        type(error).__name__, error)
        self._failing = True

    def _back(self, sent: int) -> None:
        if self._failing:
            log.info("audit mirror: Redis takes events again; %d sent", sent)
        self._failing = False


def read_cursor(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def write_cursor(path: Path, seq: int) -> None:
    """Not synced, and a failure only logged: a cursor behind sends some events again, and
    readers count them once."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(f"{seq}\n")
        os.replace(temporary, path)
    except OSError as e:
        log.warning("audit mirror: cannot keep its place in %s: %s", path, e)


# ---- reading: avatar audit --cluster ----------------------------------------------------------
def read_stream(redis_url: str) -> tuple[list[dict], set[str]]:
    """Every entry of the stream, oldest first, and the ids of the nodes registered now.
    ValueError for a URL that is not a Redis one; RuntimeError (one line) if Redis cannot be read."""
    import redis

    client = redis_client(redis_url, sync=True)
    try:
        events = _entries(client)
        live = {n for n in client.smembers(PREFIX + "nodes") if client.exists(f"{PREFIX}node:{n}")}
    except (redis.RedisError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RuntimeError(f"cannot read the cluster's audit stream at {redacted(redis_url)}: {reason}") from None
    finally:
        client.close()
    return events, live


def _entries(client) -> list[dict]:
    entries, start = [], "-"
    while True:
        page = client.xrange(STREAM, start, "+", count=PAGE)
        entries += [fields for _, fields in page]
        if len(page) < PAGE:
            return entries
        start = "(" + page[-1][0]  # after the last one read
