"""The audit log (server/audit.py): every use of an identity on record, append-only,
token ids never tokens, and nothing lost when the server is killed."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from helpers import Client, ClipTrack, clip, read_seconds, running_server, wait_for
from server.audit import (ABNORMAL, NODE_LOST, AuditLog, add_arguments, audit_path, fold_uses, format_table,
                          parse_since, run, token_id)

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def audit(tmp_path, clock):
    log = AuditLog(audit_path(tmp_path), clock=clock)
    yield log
    log.close()


def cli(home, *argv) -> str:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    assert run(parser.parse_args(argv), home, out=out) == 0
    return out.getvalue()


# ---- the log itself ------------------------------------------------------------------------
def test_uses_start_end_and_filters(audit, clock):
    s = audit.start("session", token_id("presenter-secret"), "demo", address="10.0.0.7", room="main",
                    use_id="ab12" + "0" * 28)
    v = audit.start("viewer", "tok-viewer00000", "demo", address="10.0.0.8", room="main")
    clock.advance(minutes=5)
    assert audit.switched(s, "alice")
    clock.advance(minutes=5)
    assert audit.end(s, frames=9000, reason="bye")
    assert not audit.end(s, frames=1), "a use ends once"
    assert not audit.end("no-such-use"), "an end needs a start"
    clock.advance(days=2)
    r = audit.start("render", "local:jo", "bob")
    audit.end(r, frames=300)

    uses = {u["use_id"]: u for u in audit.query()}
    assert list(uses) == [s, v, r]  # oldest first
    session = uses[s]
    assert session["who"] == token_id("presenter-secret") and session["who"].startswith("tok-")
    assert (session["kind"], session["room"], session["address"]) == ("session", "main", "10.0.0.7")
    assert session["identities"] == ["demo", "alice"]
    assert (session["frames"], session["status"], session["reason"]) == (9000, "ok", "bye")
    assert session["started"] == "2026-11-01T09:00:00.000Z" and session["duration_s"] == 600
    assert uses[v]["status"] == "open" and uses[v]["ended"] is None

    assert [u["use_id"] for u in audit.query(identity="alice")] == [s]  # switched to counts
    assert [u["use_id"] for u in audit.query(identity="demo")] == [s, v]
    assert [u["use_id"] for u in audit.query(kind="render")] == [r]
    assert [u["use_id"] for u in audit.query(id_prefix="AB12")] == [s]  # a watermark's prefix
    # since: uses active at or after it (the open viewer is still active)
    assert [u["use_id"] for u in audit.query(since=parse_since("1d", now=clock.now))] == [v, r]
    assert [u["use_id"] for u in audit.query(since="2026-11-01T09:05:00.000Z")] == [s, v, r]
    assert [u["use_id"] for u in audit.query(since="1d")] == [v, r]  # text as --since takes it
    with pytest.raises(ValueError):
        audit.query(since="last week")


def test_token_id_is_stable_and_not_the_token():
    assert token_id("tokenA") == token_id("tokenA") != token_id("tokenB")
    assert token_id("tokenA").startswith("tok-") and len(token_id("tokenA")) == 16
    assert "tokenA" not in token_id("tokenA")
    assert token_id(None) == token_id("") == "demo"


def test_the_database_refuses_updates_and_deletes(audit):
    use = audit.start("session", "demo", "demo")
    audit.end(use, frames=3)
    db = sqlite3.connect(audit.path, isolation_level=None)
    try:
        for sql in ("UPDATE events SET who = 'someone-else'", "DELETE FROM events", "DELETE FROM events WHERE seq = 1",
                    "UPDATE runs SET pid = 1", "DELETE FROM runs"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)
        with pytest.raises(sqlite3.IntegrityError):  # a second end for the same use
            db.execute("INSERT INTO events (use_id, event, at, kind, who, status, run_id) "
                       "VALUES (?, 'end', 'x', 'session', 'demo', 'ok', 'r')", (use,))
    finally:
        db.close()
    assert [(e["event"], e["frames"]) for e in audit.events()] == [("start", None), ("end", 3)]


def test_retention_prunes_only_uses_that_ended_long_ago(audit, clock):
    old = audit.start("session", "demo", "demo")
    audit.end(old)
    still_open = audit.start("viewer", "demo", "demo", room="main")
    clock.advance(days=40)
    recent = audit.start("session", "demo", "alice")
    audit.end(recent)
    assert audit.prune(0) == 0  # 0: keep forever
    assert audit.prune(30) == 2  # the old use's start and end
    assert [u["use_id"] for u in audit.query()] == [still_open, recent]
    db = sqlite3.connect(audit.path, isolation_level=None)
    try:  # the guard is back after pruning
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM events")
    finally:
        db.close()


def test_recover_ends_the_uses_of_dead_runs_only(tmp_path):
    path = audit_path(tmp_path)
    alive, dead, server = AuditLog(path), AuditLog(path), AuditLog(path)
    a = alive.start("session", "demo", "demo")
    d = dead.start("session", "demo", "alice")
    done = dead.start("render", "local:jo", "alice")
    dead.end(done, frames=5)
    dead._lock_file.close()  # as when its process is killed: the kernel drops the lock
    dead._lock_file = None
    quiet = AuditLog(path)  # died with nothing open: only its lock file is left
    rendered = quiet.start("render", "local:jo", "demo")
    quiet.end(rendered)
    quiet._lock_file.close()
    quiet._lock_file = None
    try:
        assert server.recover() == 1
        assert server.recover() == 0  # once
        locks = {p.stem for p in (tmp_path / "audit.runs").glob("*.lock")}
        assert locks == {alive.run_id, server.run_id}, "dead runs' lock files are removed, live ones kept"
        status = {u["use_id"]: (u["status"], u["reason"]) for u in server.query()}
        assert status == {a: ("open", None), d: ("abnormal", ABNORMAL), done: ("ok", ""), rendered: ("ok", "")}
        alive.end(a, frames=1)
        assert server.query(id_prefix=a)[0]["status"] == "ok"
    finally:
        for log in (alive, dead, quiet, server):
            log.close()


def test_use_context_records_errors(audit):
    with audit.use("render", "local:jo", "demo") as u:
        u.frames = 42
    with pytest.raises(RuntimeError):
        with audit.use("enroll", "local:jo", "alice"):
            raise RuntimeError("out of disk")
    ok, failed = audit.query()
    assert (ok["status"], ok["frames"]) == ("ok", 42)
    assert (failed["status"], failed["reason"]) == ("error", "RuntimeError: out of disk")


# ---- avatar audit --------------------------------------------------------------------------
def test_since_accepts_dates_and_ages_and_explains_the_rest():
    now = datetime(2026, 11, 8, 12, 0, tzinfo=timezone.utc)
    assert parse_since("2026-11-01") == "2026-11-01T00:00:00.000Z"
    assert parse_since("2026-11-01T09:30") == "2026-11-01T09:30:00.000Z"
    assert parse_since("2026-11-01T09:30+01:00") == "2026-11-01T08:30:00.000Z"
    assert parse_since("24h", now) == "2026-11-07T12:00:00.000Z"
    assert parse_since("7d", now) == "2026-11-01T12:00:00.000Z"
    assert parse_since("30m", now) == "2026-11-08T11:30:00.000Z"
    for bad in ("yesterday", "7 days", "-1d", "2026-13-01", ""):
        with pytest.raises(ValueError, match="expected a date"):
            parse_since(bad)


def test_cli_table_json_lines_and_empty_log(tmp_path, clock):
    assert "no uses recorded" in cli(tmp_path)
    assert not audit_path(tmp_path).exists(), "reading creates no log"
    with pytest.raises(ValueError, match="--since 'last week'"):
        cli(tmp_path, "--since", "last week")
    log = AuditLog(audit_path(tmp_path), clock=clock)
    s = log.start("session", token_id("t"), "demo", address="127.0.0.1", room="main")
    clock.advance(seconds=75)
    log.end(s, frames=2250, reason="bye")
    log.start("viewer", "demo", "demo", address="127.0.0.1", room="main")
    log.close()

    table = cli(tmp_path).splitlines()
    print("\n".join(table))
    assert table[0].split()[:4] == ["id", "kind", "who", "identity"]
    assert table[1].split() == [s[:8], "session", token_id("t"), "demo", "main", "127.0.0.1", "2026-11-01",
                                "09:00:00", "09:01:15", "1m15s", "2250", "ok"]
    assert table[2].split()[-1] == "open"
    lines = cli(tmp_path, "--json", "--kind", "session").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["use_id"] == s
    assert "no uses recorded that match" in cli(tmp_path, "--identity", "nobody")
    assert format_table([json.loads(lines[0])]).splitlines()[1].startswith(s[:8])


# ---- the cluster's view (avatar audit --cluster) -------------------------------------------
def test_stream_events_fold_into_the_same_uses_with_their_node(audit, clock):
    """Events as nodes send them (server/cluster/audit.py: the log's rows, str values, plus the
    node) make AuditLog.query's rows: sent twice, they count once; an open use on a node that
    left is 'node lost'; a malformed event or one whose start is gone is left out."""
    s = audit.start("session", "tok-a", "demo", room="main", use_id="ab12" + "0" * 28)
    clock.advance(minutes=5)
    audit.switched(s, "alice")
    clock.advance(minutes=5)
    audit.end(s, frames=9000, reason="bye")
    v = audit.start("viewer", "tok-b", "alice", room="main")
    r = audit.start("render", "local:jo", "bob")
    local = {u["use_id"]: u for u in audit.query()}
    sent = [{**{k: str(v) for k, v in e.items() if v is not None}, "node": "n1", "node_url": "http://n1/"}
            for e in audit.events()]
    sent[-1]["node"] = "n2"  # the render's start came from another node
    orphan_end = {**sent[2], "use_id": "f" * 32}  # an end whose start was trimmed from the stream
    malformed = [{**sent[0], "use_id": "e" * 32, "kind": "party"}, {**sent[0], "use_id": "d" * 32, "at": "soon"},
                 {"event": "start"}]
    uses = fold_uses(sent + sent[:4] + [orphan_end] + malformed, live_nodes={"n1"})

    assert [u["use_id"] for u in uses] == [s, v, r]
    for u in uses:  # the same row as the node's own log, plus its node
        expected = {**local[u["use_id"]], "node": "n2" if u["use_id"] == r else "n1", "node_url": "http://n1/"}
        if u["use_id"] == r:
            expected["status"] = NODE_LOST  # open, and n2 is not in the cluster any more
        assert u == expected
    assert uses[0]["identities"] == ["demo", "alice"] and uses[0]["frames"] == 9000  # a switch sent twice: once
    # The same filters as the local log.
    assert [u["use_id"] for u in fold_uses(sent, {"n1"}, identity="alice")] == [s, v]
    assert [u["use_id"] for u in fold_uses(sent, {"n1"}, kind="render")] == [r]
    assert [u["use_id"] for u in fold_uses(sent, {"n1"}, id_prefix="AB12")] == [s]
    assert [u["use_id"] for u in fold_uses(sent, {"n1"}, since="2026-11-01T09:11:00.000Z")] == [v, r]
    table = format_table(uses).splitlines()
    assert table[0].split()[:3] == ["id", "node", "kind"]
    assert table[3].split()[:3] == [r[:8], "n2", "render"] and table[3].endswith(NODE_LOST)


# ---- the server ----------------------------------------------------------------------------
TOKEN = "very-secret-presenter-token-42"
VIEWER_TOKEN = "very-secret-viewer-token-43"


async def test_server_records_token_ids_never_tokens(tmp_path, monkeypatch):
    frames = read_seconds(clip("drive_wink.mp4"), 1.0)
    home = tmp_path / "home"
    async with running_server(tmp_path, monkeypatch, tokens={TOKEN: "*"},
                              viewer_tokens={VIEWER_TOKEN: "*"}) as srv:
        presenter = await Client(srv.ws_url).connect()
        viewer = await Client(srv.ws_url).connect()
        try:
            assert (await presenter.start_session(ClipTrack(frames, loop=True), token=TOKEN, room="main"))
            await wait_for(lambda: len(presenter.received) >= 3, 20, "avatar frames")
            await viewer.watch("main", token=VIEWER_TOKEN)
            session_id, viewer_id = presenter.session["id"], viewer.session["id"]
        finally:
            await viewer.close()
            await presenter.close()
        await wait_for(lambda: not srv.state.sessions and not srv.state.viewers, 10, "both to end")
        reader = AuditLog(audit_path(home))
        await wait_for(lambda: all(u["status"] != "open" for u in reader.query()), 5, "the end rows")
        uses = {u["use_id"]: u for u in reader.query()}
        reader.close()
        stored = b"".join(p.read_bytes() for p in home.rglob("audit*") if p.is_file())  # WAL included
    assert set(uses) == {session_id, viewer_id}
    s, v = uses[session_id], uses[viewer_id]
    assert (s["kind"], s["who"], s["identity"], s["room"], s["address"]) == \
        ("session", token_id(TOKEN), "demo", "main", "127.0.0.1")
    assert s["frames"] >= 3 and s["status"] == "ok" and s["reason"]
    assert (v["kind"], v["who"], v["identity"], v["status"]) == ("viewer", token_id(VIEWER_TOKEN), "demo", "ok")
    stored += b"".join(p.read_bytes() for p in home.rglob("audit*") if p.is_file())
    assert token_id(TOKEN).encode() in stored
    for token in (TOKEN, VIEWER_TOKEN):
        assert token.encode() not in stored and token.encode("utf-16-le") not in stored


def _serve(home: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--home", str(home), "serve", "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "avatar server: open http://127.0.0.1:PORT/ ..." once it listens
    if "open http" not in line:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r}")
    url = line.split("open ", 1)[1].split()[0]
    return proc, url.replace("http://", "ws://") + "ws"


async def test_sigkill_loses_no_completed_use_and_records_the_interrupted_one(tmp_path):
    home = tmp_path / "home"
    proc, ws_url = _serve(home)
    try:
        done = await Client(ws_url).connect()
        assert (await done.hello())["type"] == "session"
        done_id = done.session["id"]
        await done.send({"v": 1, "type": "bye"})
        await asyncio.wait_for(done.ws.wait_closed(), 10)
        live = await Client(ws_url).connect()
        assert (await live.hello())["type"] == "session"  # its start is committed before this reply
        live_id = live.session["id"]
        reader = AuditLog(audit_path(home))
        await wait_for(lambda: reader.query(id_prefix=done_id)[0]["status"] == "ok", 10, "the end row")
        reader.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await live.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, _ = _serve(home)  # the restarted server recovers at start, before it listens
    try:
        out = subprocess.run([sys.executable, "-m", "server.cli", "--home", str(home), "audit", "--json"],
                             cwd=REPO, capture_output=True, text=True) if _cli_has_audit() else None
        reader = AuditLog(audit_path(home))
        uses = {u["use_id"]: u for u in reader.query()}
        reader.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert set(uses) == {done_id, live_id}
    assert (uses[done_id]["status"], uses[done_id]["reason"]) == ("ok", "closed")
    assert (uses[live_id]["status"], uses[live_id]["reason"]) == ("abnormal", ABNORMAL)
    assert uses[live_id]["ended"] >= uses[live_id]["started"]
    if out is not None:
        assert [json.loads(line)["status"] for line in out.stdout.splitlines()] == ["ok", "abnormal"]


def _cli_has_audit() -> bool:
    from server.cli import build_parser
    try:
        build_parser().parse_args(["audit"])
    except SystemExit:
        return False
    return True
