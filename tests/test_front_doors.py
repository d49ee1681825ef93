"""The 2026-12-06 probe's reproductions against the HTTP front doors (issue #33): each fails
to hold a slot, a seat, a process or an audit row, and none leaves a traceback in the log."""
from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
from aiortc import RTCPeerConnection

from helpers import ClipTrack, clip, read_seconds, running_server, wait_for
from test_rooms import post, present, streaming, whip_offer

from server.http.app import LINGER

TOKENS = {"tokens": {"pres": "*"}, "viewer_tokens": {"watch": frozenset({"main"})}}


async def camera_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTrack(ClipTrack(read_seconds(clip("drive_expressive.mp4"), 0.5), loop=True))
    sdp = await whip_offer(pc)
    await pc.close()
    return sdp


async def player_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    sdp = await whip_offer(pc)
    await pc.close()
    return sdp


def bad_bundle(sdp: str) -> str:
    """The probe's offer: its BUNDLE group names a mid no media section has."""
    return re.sub(r"a=group:BUNDLE [^\r\n]*", "a=group:BUNDLE 9 0", sdp)


def nothing_held(srv) -> bool:
    state = srv.state
    return (not state.sessions and state.metrics.sessions_active == 0 and not state.viewers
            and state.rooms.viewers() == 0)


async def audit_rows(srv) -> int:
    await srv.state.audit._call(lambda: None)  # after every write queued before it
    return len(srv.state.audit.log.query())


async def test_bad_bundle_offers_are_refused_before_anything_is_held(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.ERROR)
    async with running_server(tmp_path, monkeypatch, max_sessions=2, **TOKENS) as srv, \
            aiohttp.ClientSession() as http:
        base = srv.url.rstrip("/")
        for _ in range(3):  # more than --max-sessions: none may stick
            status, _, body = await post(http, f"{base}/whip/main", bad_bundle(await camera_offer()), "pres")
            assert status == 400 and "BUNDLE" in body, (status, body)
        presenter = await present(srv, token="pres", audio=False)
        try:
            rows = await audit_rows(srv)
            for _ in range(4):
                status, _, body = await post(http, f"{base}/whep/main", bad_bundle(await player_offer()), "watch")
                assert status == 400 and "BUNDLE" in body, (status, body)
            assert srv.state.rooms.viewers() == 0 and not srv.state.viewers
            assert await audit_rows(srv) == rows  # refused before a row was written
            await streaming(presenter, 5)
        finally:
            await presenter.close()
        await wait_for(lambda: nothing_held(srv), 5, "every slot free")
    assert "Traceback" not in caplog.text


async def test_an_offer_aiortc_fails_on_still_frees_the_whole_setup(tmp_path, monkeypatch, caplog):
    """Past the checks, aiortc itself fails on the offer and its close() raises on the half-made
    connection (the probe's AttributeError): the session, its process, its room and its audit
    row are all released, and the client gets a 400, not a 500."""
    import server.http.whip as whip

    monkeypatch.setattr(whip, "check_offer_sdp", lambda *a, **k: None)
    async with running_server(tmp_path, monkeypatch, max_sessions=1, **TOKENS) as srv, \
            aiohttp.ClientSession() as http:
        base = srv.url.rstrip("/")
        for _ in range(2):
            status, _, body = await post(http, f"{base}/whip/main", bad_bundle(await camera_offer()), "pres")
            assert status == 400, (status, body)
            assert nothing_held(srv) and srv.state.rooms.live("main") is None
        await audit_rows(srv)
        records = srv.state.audit.log.query()
        assert len(records) == 2 and all(r["status"] == "error" and r["ended"] for r in records), records
        # The slot is really free: a good presenter gets in.
        status, _, body = await post(http, f"{base}/whip/main", await camera_offer(), "pres")
        assert status == 201, body


async def test_whep_viewers_that_never_connect_are_freed(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, connect_timeout=1.0, max_viewers=4, **TOKENS) as srv, \
            aiohttp.ClientSession() as http:
        presenter = await present(srv, token="pres", audio=False)
        try:
            no_ice = re.sub(r"a=candidate:[^\r\n]*\r\n", "", await player_offer())
            for _ in range(4):
                status, _, body = await post(http, f"{srv.url}whep/main", no_ice, "watch")
                assert status == 201, body
            assert srv.state.rooms.viewers() == 4
            started = time.monotonic()
            await wait_for(lambda: srv.state.rooms.viewers() == 0 and not srv.state.viewers, 5,
                           "the ICE-less viewers to be freed")
            assert time.monotonic() - started < 3
            status, _, _ = await post(http, f"{srv.url}whep/main", no_ice, "watch")
            assert status == 201  # the seats are free again
            await streaming(presenter, 5)
        finally:
            await presenter.close()


async def test_an_empty_offer_is_refused_before_a_session_starts(tmp_path, monkeypatch):
    from server.state import ServerState

    async def never(*args, **kwargs):
        raise AssertionError("a session was opened for an offer that could not be used")

    monkeypatch.setattr(ServerState, "open_session", never)
    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv, aiohttp.ClientSession() as http:
        no_fingerprint = re.sub(r"a=fingerprint:[^\r\n]*\r\n", "", await camera_offer())
        for sdp, says in (("v=0\r\n", "no media section"), (no_fingerprint, "fingerprint"),
                          (await player_offer(), "must send video")):
            started = time.monotonic()
            status, _, body = await post(http, f"{srv.url}whip/main", sdp, "pres")
            assert status == 400 and says in body, (status, body)
            assert time.monotonic() - started < 0.5
        assert await audit_rows(srv) == 0


async def raw(url: str):
    host, port = url.split("//")[1].strip("/").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader, seconds: float) -> bytes:
    """What the server sent before it closed the connection, or AssertionError if it did not."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except asyncio.TimeoutError:
        raise AssertionError(f"the server kept the connection open for {seconds} s") from None


async def test_slow_clients_are_cut_off(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, header_timeout=1.0, body_timeout=1.0,
                              max_pending_per_address=2, **TOKENS) as srv:
        # Slowloris: headers at a byte every 0.2 s.
        reader, writer = await raw(srv.url)
        started = time.monotonic()

        async def trickle():
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)

        dripping = asyncio.ensure_future(trickle())
        await closed_within(reader, 3)
        assert time.monotonic() - started < 2.5
        dripping.cancel()
        writer.close()

        # A WHIP offer whose body never completes: 408.
        reader, writer = await raw(srv.url)
        writer.write(b"POST /whip/main HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer pres\r\n"
                     b"Content-Type: application/sdp\r\nContent-Length: 2000\r\n\r\nv=0\r\n")
        started = time.monotonic()
        reply = await closed_within(reader, 6)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert time.monotonic() - started < 1 + LINGER + 1
        writer.close()
        assert nothing_held(srv)

        # Unfinished offers count against their address's budget (max_pending_per_address).
        head = (b"POST /whip/main HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer pres\r\n"
                b"Content-Type: application/sdp\r\nContent-Length: 2000\r\n\r\nv=0\r\n")
        slow = [await raw(srv.url) for _ in range(2)]
        for _, w in slow:
            w.write(head)
        await wait_for(lambda: srv.state.pending == 2, 2, "two unfinished offers")
        reader, writer = await raw(srv.url)
        writer.write(head)
        assert (await closed_within(reader, 3)).startswith(b"HTTP/1.1 429")
        for r, w in slow + [(reader, writer)]:
            w.close()
        await wait_for(lambda: srv.state.pending == 0, 5, "their budget back")

        # An idle WebSocket session is not an idle HTTP connection: it outlives the header deadline.
        from helpers import Client

        c = await Client(srv.ws_url).connect()
        await asyncio.sleep(1.5)
        assert (await c.request({"v": 1, "type": "hello", "token": "pres"}))["type"] == "session"
        await c.close()


async def test_a_body_cut_off_mid_request_is_one_quiet_line(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv:
        for path in ("/whip/main", "/whep/main"):
            for _ in range(5):
                reader, writer = await raw(srv.url)
                writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer pres\r\n"
                             "Content-Type: application/sdp\r\nContent-Length: 5000\r\n\r\nv=0\r\nm=vid".encode())
                await writer.drain()
                writer.close()
        await wait_for(lambda: caplog.text.count("left mid-request") >= 8, 5, "the hang-ups to be logged")
        assert nothing_held(srv)
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text


async def test_bearer_scheme_is_case_insensitive_and_rooms_are_listed_per_token(tmp_path, monkeypatch):
    tokens = {"tokens": {"pres": "*"}, "viewer_tokens": {"watch": frozenset({"main"})}}
    async with running_server(tmp_path, monkeypatch, **tokens) as srv, aiohttp.ClientSession() as http:
        main = await present(srv, room="main", token="pres", audio=False)
        other = await present(srv, room="secret", token="pres", audio=False)
        try:
            for scheme in ("bearer", "BEARER", "Bearer"):
                async with http.get(f"{srv.url}rooms", headers={"Authorization": f"{scheme} watch"}) as r:
                    assert r.status == 200
                    listed = [room["room"] for room in (await r.json())["rooms"]]
                assert listed == ["main"], listed  # not the room it may not watch, nor its identity
            async with http.get(f"{srv.url}rooms", headers={"Authorization": "bearer pres"}) as r:
                assert sorted(room["room"] for room in (await r.json())["rooms"]) == ["main", "secret"]
            status, _, body = await post(http, f"{srv.url}whep/main", await player_offer(), None)
            assert status == 401
            async with http.post(f"{srv.url}whep/main", data=(await player_offer()).encode(),
                                 headers={"Content-Type": "application/sdp", "Authorization": "bearer watch"}) as r:
                assert r.status == 201, await r.text()
        finally:
            await main.close()
            await other.close()
