"""`avatar serve`: one port (aiohttp) for the web client, signaling (/ws), WHIP/WHEP, browser enrollment
and /metrics.

Why aiohttp: it carries plain HTTP (every method, HEAD without a body, 405 with Allow, request
bodies for WHIP/WHEP offers with a size cap) and the signaling WebSocket on one port, and
it is what aiortc's own examples use, so nothing else comes along.

    run(args)              blocks until Ctrl-C; returns an exit code (flags: config.add_arguments)
    start_server(config)   async context manager for tests: `async with start_server(c) as srv`
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
import sys
import time
from importlib.resources import files

from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from engines.identity import DEFAULT_IDENTITY
from ..config import ServerConfig, config_from_args
from ..security import ConfigError, bearer, host_allowed, is_loopback, origin_allowed, room_allowed
from .signaling import Closed, Connection
from ..state import ServerState
from ..media.udp_ports import confine_udp_ports, parse_range
from . import enroll, whip
from ..media import stages, vp8

log = logging.getLogger("avatar.server")

# The web client ships inside the package as `server.web` (pyproject maps it to web/), so
# an installed `avatar` serves it too, not only a checkout.
WEB = files("server.web")
LINGER = 2.0  # seconds
DRAINING = web.AppKey("draining", asyncio.Task)  # the drain POST /drain started
STATIC = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js",
          "/viewer.html": "viewer.html", "/viewer.js": "viewer.js", "/common.js": "common.js", "/style.css": "style.css",
          "/enroll.html": "enroll.html", "/enroll.js": "enroll.js"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The pages load nothing from elsewhere; camera needs a secure context (https or localhost).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; "
                               "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Headers the server decides on: two of them is an attack or a broken proxy, never a choice.
SINGLE_HEADERS = ("Host", "Authorization", "Origin", "Connection", "Content-Type")
STATE = web.AppKey("state", ServerState)


class QuietBadRequests(logging.Filter):
    """aiohttp answers a malformed request (two Host headers, a broken request line) with 400
    itself, then logs it at ERROR with a traceback. It is the client's fault, and a probe
    sends thousands: one warning line each, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = "malformed HTTP request answered with %s: %s", (error.code, error.message)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())


def text(status: int, message: str, **headers) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


def client_address(request: web.Request) -> str:
    """The peer's IP address (what per-address limits count), or "unknown"."""
    return request.remote or "unknown"


def bearer_token(request: web.Request) -> str | None:
    """The Authorization bearer token, else ?token= (the header is better: query strings
    end up in logs)."""
    auth = request.headers.get("Authorization", "")
    return bearer(auth) if auth else request.query.get("token")


@web.middleware
async def guard(request: web.Request, handler):
    """Before any route: one of each header that matters, a Host this server answers to;
    after: the security headers on every response, errors included."""
    state = request.app[STATE]
    for name in SINGLE_HEADERS:
        if len(request.headers.getall(name, ())) > 1:
            response = text(400, f"duplicate {name} header")
            break
    else:
        if not host_allowed(request.headers.get("Host"), state.auth.demo_mode, state.config.hosts):
            state.metrics.reject("bad_host")
            response = text(421, "this server does not answer to that Host name")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as e:
                response = e
    if not response.prepared:  # a WebSocket has sent its headers already
        response.headers.update({k: v for k, v in SECURITY_HEADERS.items() if k not in response.headers})
        if response.status in (400, 421):  # a client that sends these is not worth keeping
            response.force_close()
    return response


# What browser pages on other sites may call (a WHIP/WHEP client, the in-call extension):
# with an Origin from --origin (demo mode: loopback pages too), bearer tokens, no cookies.
CORS_PREFIXES = ("/whip/", "/whep/", "/identities", "/rooms", "/nodes")
CORS_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
                "Access-Control-Expose-Headers": "Location, Link, ETag", "Access-Control-Max-Age": "600"}


@web.middleware
async def cors(request: web.Request, handler):
    """Answers preflights; refuses, before anything starts, a cross-site request from an
    origin that is not allowed; lets an allowed one read the answer (and its Location)."""
    origin = request.headers.get("Origin")
    if origin is None or not request.path.startswith(CORS_PREFIXES):
        return await handler(request)
    state = request.app[STATE]
    if not origin_allowed(origin, request.headers.get("Host"), state.config.origins, state.auth.demo_mode):
        state.metrics.reject("bad_origin")
        return text(403, f"pages from {origin[:100]} may not use this server (see --origin)")
    if request.method == "OPTIONS":
        response = web.Response(status=204)
    else:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            response = e
    response.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin", **CORS_HEADERS})
    return response


async def static(request: web.Request) -> web.Response:
    name = STATIC[request.path]
    try:
        body = WEB.joinpath(name).read_bytes()
    except OSError:
        return text(404, "web client not found")
    ctype = CONTENT_TYPES[name[name.rfind("."):]]
    return web.Response(body=body, content_type=ctype, charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    # 200 "ok" on its first line while the node serves; with --cluster and Redis lost, a second
    # line says so (the node still admits presenters, locally only). Draining: 503, so load
    # balancers send no one new.
    if request.app[STATE].draining:
        return text(503, "draining")
    cluster = request.app[STATE].cluster
    if cluster is not None and cluster.status != "ok":
        return text(200, f"ok\ncluster: {cluster.status}")
    return text(200, "ok")


async def drain(request: web.Request) -> web.Response:
    """POST /drain (`avatar drain`), from this machine only: as SIGTERM, without the stop."""
    state = request.app[STATE]
    if not is_loopback(client_address(request)):
        return text(403, "drain is asked from the server's own machine (avatar drain)")
    if not state.draining:
        request.app[DRAINING] = asyncio.get_running_loop().create_task(state.drain(state.config.drain_timeout))
    return text(202, f"draining: {len(state.sessions)} session(s) have {state.config.drain_timeout:g} s to end")


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not (state.config.metrics_public or is_loopback(client_address(request))
            or state.auth.allowed(bearer_token(request)) is not None):
        return text(401, "metrics: a token, or a loopback client")
    body, content_type = state.metrics.exposition(state.cluster.url if state.cluster is not None else None)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def identities(request: web.Request) -> web.Response:
    state = request.app[STATE]
    allow = state.auth.allowed(bearer_token(request))
    if allow is None:
        return text(401, "missing or invalid token")
    return web.json_response({"identities": state.visible_identities(allow)})


async def rooms(request: web.Request) -> web.Response:
    state = request.app[STATE]
    watchable = state.auth.rooms(bearer_token(request))
    if watchable is None:
        return text(401, "missing or invalid token")
    # A viewer token sees only the rooms it may watch: no other room's name or identity.
    listed = state.rooms.describe()
    body: dict = {}
    if state.cluster is not None:  # every room of the cluster, each with its node
        from ..cluster.node import ClusterUnavailable
        for r in listed:
            r["node"], r["url"] = state.cluster.id, state.cluster.url
        try:
            here = {r["room"] for r in listed}
            listed += [{"room": r["room"], "presenter": {"identity": r["identity"]} if r["identity"] else None,
                        "viewers": r["viewers"], "sfu": None, "node": r["node"], "url": r["url"]}
                       for r in await state.cluster.rooms() if r["room"] not in here]
            listed.sort(key=lambda r: r["room"])
        except ClusterUnavailable:
            body["cluster"] = "redis unreachable: this node's rooms only"
    body["rooms"] = [r for r in listed if room_allowed(watchable, r["room"])]
    return web.json_response(body)


async def nodes(request: web.Request) -> web.Response:
    """The cluster's nodes (auth as /rooms): capacity, sessions, reservations, load, state.
    Without --cluster, or with Redis unreachable, this node alone."""
    state = request.app[STATE]
    if state.auth.rooms(bearer_token(request)) is None:
        return text(401, "missing or invalid token")
    cluster = state.cluster
    if cluster is not None:
        from ..cluster.node import ClusterUnavailable
        try:
            return web.json_response({"cluster": "ok", "nodes": await cluster.nodes()})
        except ClusterUnavailable:
            pass
    me = {"id": cluster.id if cluster else None, "url": cluster.url if cluster else None,
          "capacity": state.config.max_sessions, "sessions": state.metrics.sessions_active, "reserved": 0,
          "load": None, "state": "up", "allowed": True, "self": True}
    return web.json_response({"cluster": cluster.status if cluster else None, "nodes": [me]})


class Socket:
    """The signaling Connection's view of an aiohttp WebSocket: recv/send/close, and
    `Closed` for every way a socket ends."""

    def __init__(self, ws: web.WebSocketResponse, address: str):
        self.ws, self.address = ws, address
        self.reservation: str | None = None

    async def recv(self) -> str | bytes:
        msg = await self.ws.receive()
        if msg.type == WSMsgType.TEXT:
            return msg.data
        if msg.type == WSMsgType.BINARY:
            return msg.data
        raise Closed(str(msg.data or msg.type))  # close, error (e.g. over max_msg_size)

    async def send(self, message: str) -> None:
        if self.ws.closed:
            raise Closed("closed")
        try:
            await self.ws.send_str(message)
        except ConnectionError as e:
            raise Closed(str(e))

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.ws.close(code=code, message=reason.encode()[:120])


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.headers.get("Host"), state.config.origins):
        state.metrics.reject("bad_origin")
        return text(403, f"origin {origin!r} is not allowed")
    ws = web.WebSocketResponse(
        # Hard cap at the protocol level; the app checks the smaller max_message itself so it
        # can answer with a "too_large" error instead of just dropping the connection.
        max_msg_size=4 * state.config.max_message, heartbeat=20,
        # A flooding client may never read our close frame; do not wait long for it.
        timeout=2)
    if not ws.can_prepare(request).ok:
        return text(426, "this is the signaling WebSocket: connect with a WebSocket client")
    await ws.prepare(request)
    state.sockets.add(ws)
    socket = Socket(ws, client_address(request))
    socket.reservation = request.query.get("reservation")  # --cluster: a slot another node reserved here
    try:
        await Connection(socket, state).run()
    finally:
        state.sockets.discard(ws)
        if not ws.closed:
            await ws.close()
    return ws


def make_app(state: ServerState) -> web.Application:
    # client_max_size bounds every body read whole: WHIP/WHEP offers. An enrollment's recording
    # is streamed to disk in chunks instead, under its own cap (server/http/enroll.py).
    app = web.Application(middlewares=[guard, cors], client_max_size=state.config.max_sdp + 1024)
    app[STATE] = state
    for path in STATIC:
        app.router.add_get(path, static)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/identities", identities)
    app.router.add_get("/rooms", rooms)
    app.router.add_post("/drain", drain)
    app.router.add_get("/nodes", nodes)
    app.router.add_get("/ws", websocket)
    whip.add_routes(app, STATE)
    enroll.add_routes(app, STATE, bearer_token)
    app.on_shutdown.append(_close_sockets)
    return app


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[STATE].sockets):
        await ws.close(code=1001, message=b"server stopping")


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
    runner: web.AppRunner
    url: str  # http(s)://host:port/
    ws_url: str  # ws(s)://host:port/ws


@contextlib.asynccontextmanager
async def start_server(config: ServerConfig | None = None):
    """Start in this event loop (port 0 picks a free port); close on exit."""
    config = (config or ServerConfig()).validate()
    if not (config.tokens or config.viewer_tokens) and not is_loopback(config.host):
        raise ConfigError(f"refusing to serve {config.host} without tokens: set AVATAR_TOKENS or "
                          "--config tokens, or bind 127.0.0.1 for the localhost-only demo mode")
    if config.opencv_threads:
        import cv2

        cv2.setNumThreads(config.opencv_threads)  # process-wide: every session's warp and resizes
    try:
        vp8.install(config.vp8_speed)  # process-wide, as aiortc's encoder choice is
    except vp8.IncompatibleAiortc as e:
        raise ConfigError(f"--vp8-speed {config.vp8_speed}: {e}") from None
    state = ServerState(config)
    loop = asyncio.get_running_loop()
    await state.audit.open()  # what a killed server left open is recorded as ended abnormally
    # Make the demo identity now, so the first visitor does not wait for it.
    await loop.run_in_executor(None, state.store.ensure_default)
    if config.compute == "process":
        loop.run_in_executor(None, stages.warm_up)  # the first session waits for it if need be
    tls = None
    if config.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(config.cert, config.key)
    # aiohttp's keep-alive timer runs from the connection's start and closes it if no whole
    # request has arrived by then: the header deadline (slowloris) and the idle keep-alive bound.
    # Lingering (reading the rest of a refused body so the client sees the answer) is bounded
    # by LINGER instead of aiohttp's 10 s, which a client trickling a body could hold.
    runner = web.AppRunner(make_app(state), handle_signals=False, access_log=None, shutdown_timeout=5,
                           keepalive_timeout=config.header_timeout, lingering_time=LINGER)
    await runner.setup()
    restore_handler = AcceptErrorLog(loop).install()
    release_ports = (confine_udp_ports(loop, parse_range(config.udp_ports))
                     if config.udp_ports else lambda: None)
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=tls)
        await site.start()
        await state.start_cluster()  # listening first: a redirect here must find a server
        port = runner.addresses[0][1]
        host = config.host if ":" not in config.host else f"[{config.host}]"
        scheme = "https" if tls else "http"
        yield RunningServer(state, runner, f"{scheme}://{host}:{port}/",
                            f"{'wss' if tls else 'ws'}://{host}:{port}/ws")
    finally:
        # Shutdown closes every WebSocket; each handler's `finally` closes its session.
        await runner.cleanup()
        await state.close()
        release_ports()
        restore_handler()


async def _serve_until_stopped(config: ServerConfig) -> None:
    async with start_server(config) as srv:
        if srv.state.auth.demo_mode:
            log.warning("no tokens configured: localhost-only demo mode (any local client may "
                        "connect; set AVATAR_TOKENS or --config to serve other hosts)")
        print(f"avatar server: open {srv.url}  (identity '{DEFAULT_IDENTITY}' ready; viewers watch a "
              f"room at {srv.url}viewer.html?room=NAME; Ctrl-C stops)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def drain_then_stop():  # SIGTERM (systemd, Kubernetes): sessions get time to move
            await srv.state.drain(config.drain_timeout)
            stop.set()

        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(drain_then_stop()))
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
