"""HTTP routes on the signaling port, config/token parsing, origin checks, the CLI hook."""
from __future__ import annotations

import argparse
import asyncio
import json

import av
import cv2
import numpy as np
import pytest
import websockets

from server.http import app
from server.config import ServerConfig, add_arguments, config_from_args, load_config
from server.media.tracks import LatestFrame, encoder_planes, input_size, video_frame
from server.security import (ALL, ConfigError, RateLimiter, TokenAuth, origin_allowed,
                             parse_tokens_env)
from server.http.app import start_server
from helpers import running_server


async def http_get(url: str, path: str, headers: dict | None = None, method: str = "GET"
                   ) -> tuple[int, dict, bytes]:
    """A tiny HTTP/1.1 request that asks the server to close after its response."""
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, body


async def test_static_health_metrics_identities(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, tokens={"tok": frozenset({"demo"})}) as srv:
        status, headers, body = await http_get(srv.url, "/")
        assert status == 200 and headers["content-type"].startswith("text/html") and b"<video" in body
        for path, ctype in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
            status, headers, _ = await http_get(srv.url, path)
            assert status == 200 and headers["content-type"].startswith(ctype)
        assert (await http_get(srv.url, "/healthz"))[:3:2] == (200, b"ok\n")
        status, headers, body = await http_get(srv.url, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=")
        assert b"avatar_sessions_active 0.0" in body and b"avatar_viewers_active 0.0" in body
        assert b'avatar_stage_seconds_bucket{le="0.01",stage="render"} 0.0' in body
        assert (await http_get(srv.url, "/identities"))[0] == 401
        status, _, body = await http_get(srv.url, "/identities?token=tok")
        assert status == 200 and json.loads(body) == {"identities": ["demo"]}
        status, _, body = await http_get(srv.url, "/identities", {"Authorization": "Bearer tok"})
        assert status == 200 and json.loads(body) == {"identities": ["demo"]}
        assert (await http_get(srv.url, "/../../etc/passwd"))[0] == 404
        assert (await http_get(srv.url, "/nope"))[0] == 404
        # Methods: HEAD is GET without a body; anything else on a GET route is 405 with Allow.
        status, headers, body = await http_get(srv.url, "/", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 100
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = await http_get(srv.url, "/healthz", method=method)
            assert status == 405 and "GET" in headers["allow"], method
        assert (await http_get(srv.url, "/ws"))[0] == 426  # plain GET on the WebSocket route


async def test_websocket_origin_check(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, origins=["https://ok.example"]) as srv:
        port = srv.url.rsplit(":", 1)[1].strip("/")
        for origin in (None, f"http://127.0.0.1:{port}", "https://ok.example"):
            async with websockets.connect(srv.ws_url, origin=origin) as ws:
                await ws.send(json.dumps({"v": 1, "type": "ping"}))
                assert json.loads(await ws.recv())["type"] == "pong"
        with pytest.raises(websockets.InvalidStatus) as e:
            async with websockets.connect(srv.ws_url, origin="https://evil.example"):
                pass
        assert e.value.response.status_code == 403


async def test_no_hello_times_out(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, hello_timeout=0.3) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["code"] == "timeout"
            await asyncio.wait_for(ws.wait_closed(), 5)


async def test_refuses_public_bind_without_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="without tokens"):
        async with start_server(ServerConfig(host="0.0.0.0", port=0)):
            pass


def test_token_parsing_and_auth():
    tokens = parse_tokens_env("tokenA:demo,alice; tokenB:*")
    assert tokens == {"tokenA": frozenset({"demo", "alice"}), "tokenB": ALL}
    auth = TokenAuth(tokens)
    assert auth.allowed("tokenB") == ALL and auth.allowed("tokenA") == {"demo", "alice"}
    assert auth.allowed("tokenC") is None and auth.allowed(None) is None and auth.allowed(5) is None
    assert TokenAuth({}).allowed(None) == ALL  # demo mode
    for bad in ("tokenA", "tokenA:../../etc", "tok en:demo", "tokenA:"):
        with pytest.raises(ConfigError):
            parse_tokens_env(bad)


def test_config_file_and_env(tmp_path):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"tokens": {"t1": ["demo"]}, "origins": ["https://a.example"],
                                "max_sessions": 2}))
    config = load_config(str(path), env={"AVATAR_TOKENS": "t2:*"}, port=9000)
    assert config.tokens == {"t1": frozenset({"demo"}), "t2": ALL}
    assert config.max_sessions == 2 and config.port == 9000 and config.origins == ["https://a.example"]
    path.write_text(json.dumps({"max_sessions": "many"}))
    with pytest.raises(ConfigError):
        load_config(str(path), env={})
    path.write_text(json.dumps({"surprise": 1}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(str(path), env={})


def test_cli_hook_arguments():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--max-sessions", "3", "--origin", "https://x.example"])
    config = config_from_args(args)
    assert (config.host, config.port, config.max_sessions) == ("127.0.0.1", 0, 3)
    assert config.origins == ["https://x.example"]
    assert config_from_args(parser.parse_args([])).port == 8080


def test_serve_uses_the_home_it_is_given(tmp_path):
    from server.cli import build_parser

    args = build_parser().parse_args(["--home", str(tmp_path), "serve"])
    assert config_from_args(args).identities_root == tmp_path / "identities"
    assert config_from_args(build_parser().parse_args(["serve"])).identities_root is None


def test_origin_and_rate_limit_and_sizes():
    assert origin_allowed(None, "h:1", [])
    assert origin_allowed("http://h:1", "h:1", []) and not origin_allowed("http://h:2", "h:1", [])
    now = [0.0]
    limiter = RateLimiter(rate=1, burst=2, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(3)] == [True, True, False]
    now[0] = 1.0
    assert limiter.allow()
    assert input_size(1280, 720) == (640, 360)
    assert input_size(3840, 2160)[0] == 640
    assert input_size(720, 1280) == (360, 640)  # a phone held upright: the same pixel budget
    assert input_size(8, 8) is None and input_size(4000, 10) is None
    assert input_size(320, 240) == (320, 240)


def test_avatar_images_reach_the_encoder_as_the_colours_swscale_would_make():
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 2.6, y * 4, 255 - x - y], axis=2).astype(np.uint8)  # smooth, like skin
    frame = video_frame(encoder_planes(rgb))
    assert (frame.format.name, frame.width, frame.height) == ("yuv420p", 96, 64)
    theirs = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
    diff = np.abs(frame.to_ndarray().astype(int) - theirs)
    assert diff.mean() < 0.5  # the same BT.601 video range (full range is ~10 levels off)
    odd = rgb[:63]  # I420 cannot hold an odd side: the RGB goes as it is
    assert video_frame(encoder_planes(odd)).format.name == "rgb24"


async def test_latest_frame_keeps_newest():
    box = LatestFrame()
    for i in range(5):
        box.put(i)
    assert await box.get() == 4 and box.dropped == 4


async def test_idle_session_ends(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, idle_timeout=0.5) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"v": 1, "type": "hello"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "session"
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["code"] == "session_ended" and "idle" in reply["message"]
            await asyncio.wait_for(ws.wait_closed(), 5)
        await asyncio.sleep(0.2)
        assert srv.state.metrics.sessions_active == 0 and not srv.state.sessions


async def test_internal_failure_ends_only_that_connection(tmp_path, monkeypatch):
    from server.session import Session

    async def broken(self):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(Session, "recalibrate", broken)
    async with running_server(tmp_path, monkeypatch) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"v": 1, "type": "hello"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "session"
            await ws.send(json.dumps({"v": 1, "type": "control", "recalibrate": True}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["code"] == "internal_error"
            await asyncio.wait_for(ws.wait_closed(), 5)
        assert (await http_get(srv.url, "/healthz"))[0] == 200
        await asyncio.sleep(0.2)
        assert srv.state.metrics.sessions_active == 0


def test_metrics_carry_the_cluster_node_in_a_label():
    from server.telemetry import Metrics

    metrics = Metrics()
    metrics.sessions_active = 2
    plain = metrics.exposition()[0].decode()
    labelled = metrics.exposition("http://node1.example:8080/")[0].decode()
    samples = [line for line in labelled.splitlines() if line and not line.startswith("#")]
    assert samples and all('node="http://node1.example:8080/"' in line for line in samples)
    assert 'avatar_sessions_active{node="http://node1.example:8080/"} 2.0' in samples
    assert "node=" not in plain
