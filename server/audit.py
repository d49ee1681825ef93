"""The audit log: every use of an identity on record (issue #14).

One SQLite file, `<home>/audit.db` (stdlib sqlite3, WAL, synchronous=FULL), holds an
append-only list of events. A *use* is one presenter session, viewer, render or enrollment;
it has a 'start' event (who, which identity, room, client address), perhaps 'identity'
events (a session switched to another identity), and one 'end' event (frames produced,
status, reason). `who` is a token id (`token_id`), never a token.

    log = AuditLog(audit_path(home))
    use = log.start("session", who, "alice", address="10.0.0.7", room="main", use_id=session.id)
    log.end(use, frames=1234, reason="bye")
    with log.use("render", local_user(), "alice") as u: ...; u.frames = n     # CLI commands
    log.query(identity="alice", since=parse_since("7d"))                      # one dict per use

Crash safety: each event is its own committed transaction before the call returns, and a
commit is on disk (WAL + FULL sync), so a SIGKILL loses no committed event. A process that
dies leaves its open uses without an end: `recover()` (the server calls it at start) ends
them with status 'abnormal'. Which processes are dead is told by a lock, not a pid: every
process that writes (a *run*) holds an flock on `audit.runs/<run id>.lock` for its life; the
kernel drops it when the process dies however it dies. A pid can be reused (a restarted
container's server is pid 1 again), a lock cannot be inherited, so a second live server
on the same home is never taken for dead and a dead one never for alive. The run's pid and
host are recorded too, for people.

Append-only: triggers make the database itself refuse UPDATE and DELETE on the events and
runs tables. Retention (`prune`) is the one deleter: in one write transaction it drops the
DELETE trigger, deletes whole uses that ended before the cutoff, and creates the trigger
again; no other connection can write in between, and a crash rolls all of it back.

`AuditThread` is the same log for the event loop: every call runs on one thread of its own
(a FULL-sync commit is an fsync: 0.5 ms typically, 10 ms and more on a busy disk) and is
awaited until committed.

In a cluster (`serve --cluster`) each node also copies its events into Redis
(server/cluster/audit.py); `fold_uses` makes them the same rows, with each use's node, for
`avatar audit --cluster`. This file stays each node's truth.

`avatar audit` is `add_arguments` + `run` below.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

from engines.identity import default_home
from .security import ConfigError

log = logging.getLogger("avatar.audit")

KINDS = ("session", "viewer", "render", "enroll")
STATUSES = ("ok", "abnormal", "error")
ABNORMAL = "server stopped without ending it"
SCHEMA_VERSION = 1
MAX_TEXT = 500  # characters of a reason or an address kept

_TRIGGERS = {
    name: f"CREATE TRIGGER {name} BEFORE {op} ON {table} "
          f"BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
    for name, op, table in (("events_no_update", "UPDATE", "events"), ("events_no_delete", "DELETE", "events"),
                            ("runs_no_update", "UPDATE", "runs"), ("runs_no_delete", "DELETE", "runs"))
}

SCHEMA = ["""
CREATE TABLE runs (                 -- one process that wrote here: a server, or a CLI command
    run_id     TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    started_at TEXT NOT NULL,
    program    TEXT NOT NULL
)""", f"""
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    use_id   TEXT NOT NULL,
    event    TEXT NOT NULL CHECK (event IN ('start', 'identity', 'end')),
    at       TEXT NOT NULL,          -- ISO-8601 UTC, milliseconds: sorts as it reads
    kind     TEXT NOT NULL CHECK (kind IN {KINDS!r}),
    who      TEXT NOT NULL,          -- a token id (tok-...), 'demo' or 'local:USER'; never a token
    identity TEXT,                   -- start: the identity; identity: the one switched to
    room     TEXT,
    address  TEXT,
    frames   INTEGER,                -- end only
    status   TEXT CHECK (status IN {STATUSES!r}),  -- end only
    reason   TEXT,                   -- end only
    run_id   TEXT NOT NULL           -- the run that wrote this event
)""",
    # one start and one end per use: the database itself refuses a second
    "CREATE UNIQUE INDEX events_once ON events (use_id, event) WHERE event IN ('start', 'end')",
    "CREATE INDEX events_use ON events (use_id, event)",  # what joins and lookups use
    "CREATE INDEX events_at ON events (at)",
    *_TRIGGERS.values(), """
CREATE VIEW uses AS
SELECT s.seq, s.use_id, s.kind, s.who, s.identity, s.room, s.address,
       s.at AS started, e.at AS ended, e.frames, COALESCE(e.status, 'open') AS status, e.reason,
       s.run_id,
       (SELECT group_concat(i.identity, ',') FROM events i
         WHERE i.use_id = s.use_id AND i.event = 'identity') AS switched_to
  FROM events s LEFT JOIN events e ON e.use_id = s.use_id AND e.event = 'end'
 WHERE s.event = 'start'""",
    f"PRAGMA user_version = {SCHEMA_VERSION}"]


# ---- who, when, where --------------------------------------------------------------------
def token_id(token: str | None) -> str:
    """What the log says of a token: 'tok-' + 12 hex digits of its sha256 (stable, not
    reversible for a random token); no token (demo mode) -> 'demo'."""
    if not token:
        return "demo"
    return "tok-" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def local_user() -> str:
    """`who` for a command run on the server's machine: 'local:' + the login name."""
    try:
        name = os.environ.get("USER") or getpass.getuser()
    except Exception:
        name = str(os.getuid())
    return f"local:{name}"


def audit_path(home: str | os.PathLike | None = None) -> Path:
    return Path(home or default_home()) / "audit.db"


def _stamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> str:
    """'2026-11-01', '2026-11-01T09:30' (UTC unless it says otherwise), or an age: '30m',
    '24h', '7d', '2w'. The log's timestamp of that moment; ValueError says what is accepted."""
    text = (text or "").strip()
    age = _AGE.fullmatch(text.lower())
    if age:
        seconds = float(age[1]) * _UNITS[age[2]]
        return _stamp((now or _utcnow()) - timedelta(seconds=seconds))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a date (2026-11-01), a UTC date and time "
                         "(2026-11-01T09:30), or an age such as 30m, 24h, 7d or 2w") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return _stamp(when)


def _clip(value, limit: int = MAX_TEXT):
    return None if value is None else str(value)[:limit]


# ---- the log -----------------------------------------------------------------------------
@dataclasses.dataclass
class Use:
    """A use in progress, for `AuditLog.use`: set `frames` (and `reason`) before it ends."""
    id: str
    frames: int | None = None
    reason: str = ""


class AuditLog:
    """The audit log in one SQLite file. Safe to share between threads: each thread gets a
    connection of its own. The first write makes this process a run (see the module doc)."""

    def __init__(self, path: str | os.PathLike, program: str | None = None, clock=_utcnow):
        self.path = Path(path)
        self.program = program or Path(sys.argv[0]).name  # what the runs table says ran, e.g. "avatar serve"
        self.clock = clock
        self.run_id: str | None = None
        self._lock_file = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.RLock()

    # ---- connections -----------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # who used which face, from where: for the operator only
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            # Autocommit mode: every write below is one explicit BEGIN IMMEDIATE ... COMMIT.
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                with self._write(db):
                    if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # not made meanwhile
                        for statement in SCHEMA:
                            db.execute(statement)
            elif version > SCHEMA_VERSION:
                db.close()
                raise RuntimeError(f"{self.path} was written by a newer version (schema {version})")
            self._local.db = db
            with self._guard:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def _write(self, db: sqlite3.Connection | None = None):
        """One write transaction, committed (on disk) when the block ends."""
        db = db or self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _run(self) -> str:
        """This process's run id: registered, and its lock held, on the first write."""
        with self._guard:
            if self.run_id is None:
                run_id = secrets.token_hex(8)
                folder = self.path.parent / (self.path.stem + ".runs")
                folder.mkdir(parents=True, exist_ok=True)
                lock = open(folder / f"{run_id}.lock", "w")
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before the row: never seen unlocked
                with self._write() as db:
                    db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                               (run_id, os.getpid(), socket.gethostname(), _stamp(self.clock()),
                                self.program[:100]))
                self._lock_file, self.run_id = lock, run_id
            return self.run_id

    def _lock_path(self, run_id: str) -> Path:
        return self.path.parent / (self.path.stem + ".runs") / f"{run_id}.lock"

    # ---- writing -------------------------------------------------------------------------
    def start(self, kind: str, who: str, identity: str | None, address: str | None = None,
              room: str | None = None, use_id: str | None = None) -> str:
        """Record that a use started; its id (`use_id`, or a new one)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not who:
            raise ValueError("who must name someone: a token id, 'demo' or 'local:USER'")
        use_id = use_id or secrets.token_hex(16)
        run = self._run()
        with self._write() as db:
            db.execute("INSERT INTO events (use_id, event, at, kind, who, identity, room, address, run_id) "
                       "VALUES (?, 'start', ?, ?, ?, ?, ?, ?, ?)",
                       (use_id, _stamp(self.clock()), kind, _clip(who, 100), identity, room,
                        _clip(address, 100), run))
        return use_id

    def switched(self, use_id: str, identity: str) -> bool:
        """Record that an open use now shows another identity; False if it is not open."""
        run = self._run()
        with self._write() as db:
            return self._append(db, use_id, "identity", run, identity=identity)

    def end(self, use_id: str, frames: int | None = None, status: str = "ok", reason: str = "") -> bool:
        """Record that a use ended; False (nothing written) if it never started or has ended."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        run = self._run()
        with self._write() as db:
            return self._append(db, use_id, "end", run, frames=frames, status=status, reason=_clip(reason))

    def _append(self, db, use_id: str, event: str, run: str, identity=None, frames=None,
                status=None, reason=None) -> bool:
        """An event copying its use's who/where from the start; only while the use is open."""
        cursor = db.execute(
            "INSERT INTO events (use_id, event, at, kind, who, identity, room, address, frames, status, "
            "reason, run_id) "
            "SELECT use_id, ?, ?, kind, who, COALESCE(?, identity), room, address, ?, ?, ?, ? FROM events s "
            "WHERE s.use_id = ? AND s.event = 'start' AND NOT EXISTS "
            "(SELECT 1 FROM events e WHERE e.use_id = s.use_id AND e.event = 'end')",
            (event, _stamp(self.clock()), identity, frames, status, reason, run, use_id))
        return cursor.rowcount == 1

    @contextlib.contextmanager
    def use(self, kind: str, who: str, identity: str | None, **where):
        """start() ... end(): status 'error' (with the exception) if the block raises."""
        use = Use(self.start(kind, who, identity, **where))
        try:
            yield use
        except BaseException as e:
            self.end(use.id, use.frames, "error", f"{type(e).__name__}: {e}")
            raise
        self.end(use.id, use.frames, "ok", use.reason)

    def recover(self) -> int:
        """End every open use of a run that is no longer alive (status 'abnormal'), and remove
        dead runs' lock files; how many uses were ended. The server calls it at start."""
        db = self._db()
        open_uses = ("SELECT use_id FROM events s WHERE s.event = 'start' AND s.run_id = ? AND NOT EXISTS "
                     "(SELECT 1 FROM events e WHERE e.use_id = s.use_id AND e.event = 'end')")
        runs = {r[0] for r in db.execute(
            "SELECT DISTINCT s.run_id FROM events s WHERE s.event = 'start' AND NOT EXISTS "
            "(SELECT 1 FROM events e WHERE e.use_id = s.use_id AND e.event = 'end')")}
        # Lock files left by runs that died with nothing open. Only runs on record: a run's row
        # is written once its lock is held, so a lock file without a row may be one being made.
        folder = self._lock_path("x").parent
        if folder.is_dir():
            known = {r[0] for r in db.execute("SELECT run_id FROM runs")}
            runs |= {p.stem for p in folder.glob("*.lock")} & known
        ended = 0
        for run_id in sorted(runs - {self.run_id}):
            path = self._lock_path(run_id)
            try:
                lock = open(path, "rb")
            except FileNotFoundError:
                lock = None  # no lock file: no process holds it
            try:
                if lock is not None:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # that process is alive: its uses are not ours to end
                stranded = [r[0] for r in db.execute(open_uses, (run_id,))]
                if stranded:
                    me = self._run()
                    with self._write(db):
                        for use_id in stranded:
                            ended += self._append(db, use_id, "end", me, status="abnormal", reason=ABNORMAL)
                with contextlib.suppress(OSError):
                    path.unlink()
            finally:
                if lock is not None:
                    lock.close()
        if ended:
            log.warning("audit: %d use(s) of a server that stopped without ending them recorded as "
                        "ended abnormally", ended)
        return ended

    def prune(self, retention_days: float) -> int:
        """Delete the uses that ended more than `retention_days` ago (all their events), and
        runs with nothing left; 0 days keeps everything. How many events went."""
        if not retention_days or retention_days <= 0:
            return 0
        cutoff = _stamp(self.clock() - timedelta(days=retention_days))
        with self._write() as db:
            db.execute("DROP TRIGGER events_no_delete")
            db.execute("DROP TRIGGER runs_no_delete")
            gone = db.execute("DELETE FROM events WHERE use_id IN (SELECT use_id FROM events "
                              "WHERE event = 'end' AND at < ?)", (cutoff,)).rowcount
            db.execute("DELETE FROM runs WHERE started_at < ? AND run_id IS NOT ? AND run_id NOT IN "
                       "(SELECT run_id FROM events)", (cutoff, self.run_id))
            db.execute(_TRIGGERS["events_no_delete"])
            db.execute(_TRIGGERS["runs_no_delete"])
        if gone:
            log.info("audit: %d event(s) older than %g days pruned", gone, retention_days)
        return gone

    # ---- reading -------------------------------------------------------------------------
    def query(self, identity: str | None = None, since: str | datetime | None = None, kind: str | None = None,
              id_prefix: str | None = None) -> list[dict]:
        """One dict per use, oldest first. identity: uses that showed it (at start or after a
        switch); since: uses active at or after then (a datetime, or text parse_since reads:
        '7d', '2026-11-01'); id_prefix: the use id starts with it (watermarks carry a session
        id prefix). ValueError for a `since` it cannot read."""
        return _select_uses(self._db(), identity, _since_stamp(since, self.clock), kind, id_prefix)

    def events(self) -> list[dict]:
        """Every event, in order: the raw log."""
        return [dict(row) for row in self._db().execute("SELECT * FROM events ORDER BY seq")]

    def events_after(self, seq: int, limit: int) -> list[dict]:
        """The first `limit` events after event `seq`, in order (seq only grows: a reader that
        remembers the last seq it saw misses nothing, pruned events aside)."""
        return [dict(row) for row in self._db().execute(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))]

    def last_seq(self) -> int:
        """The seq of the newest event (0 for an empty log)."""
        return self._db().execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._guard:
            connections, self._connections = self._connections, []
            lock, self._lock_file = self._lock_file, None
            run_id = self.run_id
        for db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._local = threading.local()
        if lock is not None:
            with contextlib.suppress(OSError):
                self._lock_path(run_id).unlink()
            lock.close()


def _since_stamp(since: str | datetime | None, clock=_utcnow) -> str | None:
    """`since` as a log timestamp: a datetime, or text parse_since reads."""
    if isinstance(since, datetime):
        return _stamp(since if since.tzinfo else since.replace(tzinfo=timezone.utc))
    return None if since is None else parse_since(since, clock())


def _select_uses(db: sqlite3.Connection, identity: str | None, since: str | None, kind: str | None,
                 id_prefix: str | None) -> list[dict]:
    """The `uses` view of `db`, filtered as AuditLog.query says; `since` a log timestamp."""
    where, args = [], []
    if kind is not None:
        where.append("kind = ?")
        args.append(kind)
    if id_prefix:
        where.append("substr(use_id, 1, ?) = ?")
        args += [len(id_prefix), id_prefix.lower()]
    if since is not None:
        where.append("COALESCE(ended, '9999') >= ?")
        args.append(since)
    if identity is not None:
        where.append("(identity = ? OR use_id IN (SELECT use_id FROM events WHERE event = 'identity' "
                     "AND identity = ?))")
        args += [identity, identity]
    sql = "SELECT * FROM uses" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY started, seq"
    return [_use(row) for row in db.execute(sql, args)]


def _use(row: sqlite3.Row) -> dict:
    use = dict(row)
    del use["seq"]
    switched = use.pop("switched_to")
    use["identities"] = [use["identity"]] + (switched.split(",") if switched else [])
    if use["identity"] is None:
        use["identities"] = use["identities"][1:]
    use["duration_s"] = (round((_parse_stamp(use["ended"]) - _parse_stamp(use["started"])).total_seconds(), 3)
                         if use["ended"] else None)
    return use


class AuditThread:
    """An AuditLog for the event loop: each call runs on the log's own thread and returns
    once committed. Shielded: a caller cancelled mid-write does not cancel the write, and
    the thread runs writes in order, so a use's end is never written before its start.
    start() raises if the log cannot be written (a use that cannot be recorded does not
    happen); switched() and end() log the failure and go on (the use happened)."""

    def __init__(self, audit: AuditLog, retention_days: float = 0, prune_every: float = 3600.0):
        self.log = audit
        self.retention_days = retention_days
        self.prune_every = prune_every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-audit")
        self._pruned = time.monotonic()
        self._closed = False
        self.seq_at_open: int | None = None  # the newest event before open(): later ones are this server's time

    async def _call(self, fn, *args, **kwargs):
        if self._closed:
            raise RuntimeError("the audit log is closed")
        future = asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        return await asyncio.shield(future)

    async def open(self) -> None:
        """Recover what an earlier run left open, then prune: at server start. ConfigError if
        the log cannot be used (the server does not run unrecorded)."""
        try:
            self.seq_at_open = await self._call(self.log.last_seq)
            await self._call(self.log.recover)
            await self._call(self.log.prune, self.retention_days)
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"cannot use the audit log {self.log.path}: {e}") from None

    async def start(self, kind: str, who: str, identity: str | None, **where) -> str:
        return await self._call(self.log.start, kind, who, identity, **where)

    async def switched(self, use_id: str, identity: str) -> None:
        try:
            await self._call(self.log.switched, use_id, identity)
        except Exception:
            log.exception("audit: cannot record that %s switched to %r", use_id[:8], identity)

    async def end(self, use_id: str, frames: int | None = None, status: str = "ok", reason: str = "") -> None:
        try:
            await self._call(self.log.end, use_id, frames, status, reason)
            if self.retention_days and time.monotonic() - self._pruned > self.prune_every:
                self._pruned = time.monotonic()
                await self._call(self.log.prune, self.retention_days)
        except Exception:
            log.exception("audit: cannot record the end of %s", use_id[:8])

    async def events_after(self, seq: int, limit: int) -> list[dict]:
        return await self._call(self.log.events_after, seq, limit)

    async def last_seq(self) -> int:
        return await self._call(self.log.last_seq)

    async def close(self) -> None:
        if not self._closed:
            with contextlib.suppress(Exception):
                await self._call(self.log.close)
            self._closed = True
            self._executor.shutdown(wait=False)


# ---- many nodes' events: the cluster's view ----------------------------------------------
NODE_LOST = "node lost"  # the status of an open use whose node left the cluster
_EVENT_COLUMNS = ("use_id", "event", "at", "kind", "who", "identity", "room", "address", "frames", "status",
                  "reason", "run_id")


def fold_uses(events: list[dict], live_nodes: set[str], identity: str | None = None, since=None,
              kind: str | None = None, id_prefix: str | None = None) -> list[dict]:
    """The uses that many nodes' events make (the cluster's stream, server/cluster/audit.py),
    as AuditLog.query's rows and filters, plus `node` and `node_url`: the node the use started
    on. Folded by the log's own schema and view in a database in memory, so the same rules make
    the same rows, and an event sent twice counts once. An open use whose node is not in
    `live_nodes` is 'node lost': nothing there will end it. A use whose start is not among
    `events` (trimmed from the stream) is left out."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.row_factory = sqlite3.Row
    for statement in SCHEMA:
        db.execute(statement)
    db.execute("CREATE UNIQUE INDEX events_resent ON events (use_id, event, at, identity)")  # a switch sent twice
    insert = (f"INSERT OR IGNORE INTO events ({', '.join(_EVENT_COLUMNS)}) "  # OR IGNORE: a malformed one too
              f"VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})")
    started_on = {}
    db.execute("BEGIN")
    for event in events:
        if not _is_stamp(event.get("at")):
            continue  # the rows' durations are read from it
        inserted = db.execute(insert, [event.get(c) for c in _EVENT_COLUMNS]).rowcount
        if inserted and event["event"] == "start":
            started_on[event["use_id"]] = (event.get("node"), event.get("node_url"))
    db.execute("COMMIT")
    uses = _select_uses(db, identity, _since_stamp(since), kind, id_prefix)
    db.close()
    for use in uses:
        use["node"], use["node_url"] = started_on[use["use_id"]]
        if use["status"] == "open" and use["node"] not in live_nodes:
            use["status"] = NODE_LOST
    return uses


def _is_stamp(text) -> bool:
    try:
        _parse_stamp(text)
    except (TypeError, ValueError):
        return False
    return True


# ---- avatar audit ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", metavar="NAME", help="only uses that showed this identity")
    p.add_argument("--since", metavar="WHEN",
                   help="only uses active since then: 2026-11-01, 2026-11-01T09:30 (UTC), or an age: 30m, 24h, 7d")
    p.add_argument("--kind", choices=KINDS, help="only sessions, viewers, renders or enrollments")
    p.add_argument("--id", dest="id_prefix", metavar="PREFIX",
                   help="only the use whose id starts with PREFIX (e.g. from a watermark)")
    p.add_argument("--json", action="store_true", help="one JSON object per use and line (an export)")
    p.add_argument("--cluster", metavar="REDIS_URL",
                   help="every node's uses instead of this machine's: read from the Redis of a cluster "
                        "(serve --cluster's URL, redis://[:PASSWORD@]HOST:6379/0), with the node of each")


def run(args: argparse.Namespace, home=None, out=None) -> int:
    """Print the uses the flags select: a table, or JSON lines with --json."""
    out = out or sys.stdout
    since = parse_since(args.since) if args.since is not None else None  # a bad --since fails first
    filters = {"identity": args.identity, "since": since, "kind": args.kind, "id_prefix": args.id_prefix}
    uses, source = _cluster_uses(args.cluster, filters) if args.cluster else _local_uses(audit_path(home), filters)
    if args.json:
        for use in uses:
            print(json.dumps(use), file=out)
        return 0
    if not uses:
        filtered = any(filters.values())
        print("no uses recorded" + (" that match" if filtered else "") + f" ({source})", file=out)
        return 0
    print(format_table(uses), file=out)
    return 0


def _local_uses(path: Path, filters: dict) -> tuple[list[dict], str]:
    uses = []
    if path.exists():
        audit = AuditLog(path)
        try:
            uses = audit.query(**filters)
        finally:
            audit.close()
    return uses, f"audit log: {path}"


def _cluster_uses(redis_url: str, filters: dict) -> tuple[list[dict], str]:
    """Every node's uses, from the cluster's stream; ValueError or RuntimeError (one line) if
    it cannot be read."""
    from .cluster.audit import read_stream
    from .cluster.redis_url import redacted

    events, live_nodes = read_stream(redis_url)
    return fold_uses(events, live_nodes, **filters), f"the cluster's audit stream at {redacted(redis_url)}"


COLUMNS = ("id", "kind", "who", "identity", "room", "address", "started (UTC)", "ended", "duration",
           "frames", "status")


def format_table(uses: list[dict]) -> str:
    """A use per line; a `node` column after the id when the uses have one (the cluster's view)."""
    with_node = any("node" in u for u in uses)
    columns = COLUMNS[:1] + ("node",) + COLUMNS[1:] if with_node else COLUMNS
    rows = [columns]
    for u in uses:
        started = u["started"][:19].replace("T", " ")
        ended = u["ended"] or ""
        ended = ended[11:19] if ended[:10] == u["started"][:10] else ended[:19].replace("T", " ")
        status = u["status"] + (f": {u['reason']}" if u["status"] != "ok" and u["reason"] else "")
        node = (u.get("node") or "-",) if with_node else ()
        rows.append((u["use_id"][:8], *node, u["kind"], u["who"], "→".join(u["identities"]) or "-",
                     u["room"] or "-", u["address"] or "-", started, ended or "-", _duration(u["duration_s"]),
                     "-" if u["frames"] is None else str(u["frames"]), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
