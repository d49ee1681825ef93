"""`avatar serve`: one port for the web client (HTTP GET) and signaling (/ws WebSocket).

    run(args)              blocks until Ctrl-C; returns an exit code (flags: config.add_arguments)
    start_server(config)   async context manager for tests: `async with start_server(c) as srv`
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import ssl
import sys
import time
from importlib.resources import files
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Response

from engines.identity import DEFAULT_IDENTITY
from .config import ServerConfig, config_from_args
from .security import ConfigError, client_address, host_allowed, is_loopback, origin_allowed
from .signaling import Connection
from .state import ServerState
from .udp_ports import confine_udp_ports, parse_range

log = logging.getLogger("avatar.server")

# The web client ships inside the package as `server.web` (pyproject maps it to web/), so
# an installed `avatar` serves it too, not only a checkout.
WEB = files("server.web")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
# The page loads nothing from elsewhere; camera needs a secure context (https or localhost).
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; "
                                "img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


def _response(status: int, body: bytes, content_type: str) -> Response:
    import http
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close"), *SECURITY_HEADERS])
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def _text(status: int, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def make_process_request(state: ServerState):
    """HTTP routing before the WebSocket handshake: static files, health, metrics."""

    def process_request(connection, request):
        try:
            return route(connection, request)
        except MultipleValuesError as e:  # e.g. two Host or Authorization headers
            return _text(400, f"duplicate {str(e).strip(chr(39))} header\n")

    def route(connection, request):
        url = urlsplit(request.path)
        path = url.path
        if not host_allowed(request.headers.get("Host"), state.auth.demo_mode, state.config.hosts):
            state.metrics.reject("bad_host")
            return _text(421, "this server does not answer to that Host name\n")
        if path == "/ws":
            origin = request.headers.get("Origin")
            if not origin_allowed(origin, request.headers.get("Host"), state.config.origins):
                state.metrics.reject("bad_origin")
                return _text(403, f"origin {origin!r} is not allowed\n")
            return None  # go on with the WebSocket handshake
        if "upgrade" in request.headers.get("Connection", "").lower():
            return _text(404, "WebSockets live at /ws\n")
        if path in STATIC:
            name, ctype = STATIC[path]
            try:
                body = WEB.joinpath(name).read_bytes()
            except OSError:
                return _text(404, "web client not found\n")
            return _response(200, body, ctype)
        if path == "/healthz":
            return _text(200, "ok\n")
        if path == "/metrics":
            if not (state.config.metrics_public or is_loopback(client_address(connection))
                    or state.auth.allowed(bearer_token(request, url)) is not None):
                return _text(401, "metrics: a token, or a loopback client\n")
            return _response(200, state.metrics.prometheus().encode(), "text/plain; version=0.0.4")
        if path == "/identities":
            allow = state.auth.allowed(bearer_token(request, url))
            if allow is None:
                return _text(401, "missing or invalid token\n")
            body = json.dumps({"identities": state.visible_identities(allow)}).encode()
            return _response(200, body, "application/json")
        return _text(404, "not found\n")

    return process_request


def bearer_token(request, url) -> str | None:
    """The Authorization bearer token, else ?token= (the header is better: query strings
    end up in logs)."""
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else (parse_qs(url.query).get("token") or [None])[0]


class AcceptErrorLog:
    """A loop exception handler that reports failed accept() calls (out of descriptors,
    memory) once per `interval` with a count, instead of a traceback per attempt: a
    descriptor flood once wrote 390,000 of them (174 MB) in 40 s. Everything else goes to
    the handler that was there before."""

    def __init__(self, loop, interval: float = 10.0, clock=time.monotonic):
        self.loop, self.interval, self.clock = loop, interval, clock
        self.previous = loop.get_exception_handler()
        self.suppressed = 0
        self.last: float | None = None

    def __call__(self, loop, context: dict) -> None:
        if not context.get("message", "").startswith("socket.accept()"):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.suppressed += 1
            return
        log.error("cannot accept connections: %s (%d more such errors in the last %.0f s)",
                  context.get("exception"), self.suppressed, self.interval)
        self.last, self.suppressed = now, 0

    def install(self):
        self.loop.set_exception_handler(self)
        return lambda: self.loop.set_exception_handler(self.previous)


@dataclasses.dataclass
class RunningServer:
    state: ServerState
    server: object
    url: str  # http(s)://host:port/
    ws_url: str  # ws(s)://host:port/ws


@contextlib.asynccontextmanager
async def start_server(config: ServerConfig | None = None):
    """Start in this event loop (port 0 picks a free port); close on exit."""
    config = (config or ServerConfig()).validate()
    if not config.tokens and not is_loopback(config.host):
        raise ConfigError(f"refusing to serve {config.host} without tokens: set AVATAR_TOKENS or "
                          "--config tokens, or bind 127.0.0.1 for the localhost-only demo mode")
    state = ServerState(config)
    # Make the demo identity now, so the first visitor does not wait for it.
    await asyncio.get_running_loop().run_in_executor(None, state.store.ensure_default)
    tls = None
    if config.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(config.cert, config.key)

    async def handler(ws):
        await Connection(ws, state).run()

    server = await serve(
        handler, config.host, config.port, ssl=tls,
        process_request=make_process_request(state),
        # Hard cap at the protocol level; the app checks the smaller max_message itself so
        # it can answer with a "too_large" error instead of just dropping the connection.
        max_size=4 * config.max_message, max_queue=16,
        server_header="avatar-server", ping_interval=20, ping_timeout=20,
        # A flooding client may never read our close frame; do not wait long for it.
        close_timeout=2,
    )
    port = server.sockets[0].getsockname()[1]
    host = config.host if ":" not in config.host else f"[{config.host}]"
    scheme = "https" if tls else "http"
    running = RunningServer(state, server, f"{scheme}://{host}:{port}/",
                            f"{'wss' if tls else 'ws'}://{host}:{port}/ws")
    restore_handler = AcceptErrorLog(asyncio.get_running_loop()).install()
    release_ports = (confine_udp_ports(asyncio.get_running_loop(), parse_range(config.udp_ports))
                     if config.udp_ports else lambda: None)
    try:
        yield running
    finally:
        server.close()
        # Closing the sockets ends each handler, whose `finally` closes its session.
        await server.wait_closed()
        release_ports()
        restore_handler()


async def _serve_until_stopped(config: ServerConfig) -> None:
    async with start_server(config) as srv:
        if srv.state.auth.demo_mode:
            log.warning("no tokens configured: localhost-only demo mode (any local client may "
                        "connect; set AVATAR_TOKENS or --config to serve other hosts)")
        print(f"avatar server: open {srv.url}  (identity '{DEFAULT_IDENTITY}' ready; Ctrl-C stops)",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("avatar server: stopping", flush=True)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        asyncio.run(_serve_until_stopped(config))
    except ConfigError as e:
        print(f"avatar serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"avatar serve: cannot listen: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
