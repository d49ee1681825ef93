"""Draining (issue #37): SIGTERM or `avatar drain` stop new presenters, give running sessions
time, then tell them to connect again (elsewhere, in a cluster)."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from helpers import Client, ClipTrack, clip, read_seconds, running_server, wait_for


async def next_error(client: Client, timeout: float) -> dict:
    """The first error message the server sends (stats and notices skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await client.recv(max(0.1, deadline - time.monotonic()))
        if msg.get("type") == "error":
            return msg


async def test_a_drained_server_refuses_new_presenters_and_moves_the_running_ones(tmp_path, monkeypatch):
    frames = read_seconds(clip("drive_wink.mp4"), 1.0)
    async with running_server(tmp_path, monkeypatch, drain_timeout=1.5) as srv, aiohttp.ClientSession() as http:
        presenter = await Client(srv.ws_url).connect()
        try:
            await presenter.start_session(ClipTrack(frames, loop=True))
            await wait_for(lambda: len(presenter.received) >= 5, 20, "avatar frames")
            async with http.post(f"{srv.url}drain") as r:
                assert r.status == 202 and "1 session" in await r.text()
            async with http.get(f"{srv.url}healthz") as r:
                assert r.status == 503 and await r.text() == "draining\n"  # load balancers: no one new

            newcomer = await Client(srv.ws_url).connect()
            reply = await newcomer.hello()
            assert reply["type"] == "error" and reply["code"] == "busy" and "draining" in reply["message"], reply
            await newcomer.close()

            n = len(presenter.received)
            await asyncio.sleep(0.5)
            assert len(presenter.received) > n, "the running session stopped before its grace ran out"
            error = await next_error(presenter, 5)
            assert error["code"] == "server_draining", error
            await wait_for(lambda: not srv.state.sessions and srv.state.metrics.sessions_active == 0, 5,
                           "the slot to be free")
        finally:
            await presenter.close()


async def test_drain_is_asked_from_the_servers_own_machine(tmp_path, monkeypatch):
    import server.http.app as app

    monkeypatch.setattr(app, "client_address", lambda request: "203.0.113.9")
    async with running_server(tmp_path, monkeypatch) as srv, aiohttp.ClientSession() as http:
        async with http.post(f"{srv.url}drain") as r:
            assert r.status == 403
        assert not srv.state.draining


@pytest.mark.slow
async def test_sigterm_drains_then_stops(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--home", str(tmp_path / "home"), "serve",
                             "--port", "0", "--drain-timeout", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "open http" in line, line
        url = line.split("open ", 1)[1].split()[0]
        presenter = await Client(url.replace("http://", "ws://") + "ws").connect()
        await presenter.start_session(ClipTrack(read_seconds(clip("drive_wink.mp4"), 1.0), loop=True))
        await wait_for(lambda: len(presenter.received) >= 5, 20, "avatar frames")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        error = await next_error(presenter, 10)
        assert error["code"] == "server_draining", error
        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert 0.9 < time.monotonic() - started < 12
        await presenter.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
