"""Many machines, one service (issue #37): avatar servers as separate processes sharing a real
Redis (`serve --cluster`), on loopback. Presenters are placed on the least-loaded node and
redirected there; a burst never over-admits; a killed node's registration expires; Redis lost
and back drops no running session; WHIP follows a 307 to a node with a free slot; one
`avatar audit --cluster` sees every node's uses."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from helpers import AvatarClient, ClipTrack, clip, read_seconds, wait_for

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "cluster-test-password"
TOKEN = "pres"
REDIS_SERVER = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                                else None)
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed "
                                                             "(Debian: apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A throwaway redis-server with a password, no persistence, on a free port."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path, Path] | None = None, extra=()):
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls  # (certificate, key, CA): TLS only, on self.port
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        port = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
            "--tls-key-file", str(self.tls[1]), "--tls-ca-cert-file", str(self.tls[2]), "--tls-auth-clients", "no"]
        return [REDIS_SERVER, *port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--requirepass", PASSWORD, "--dir", str(self.workdir), *self.extra]

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Node:
    """`python -m server.cli serve --cluster ...` as a process of its own, with its own home."""

    def __init__(self, redis: Redis, home: Path, max_sessions: int, port: int | None = None, extra=(),
                 cluster_url: str | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--home", str(home), "serve", "--port", str(self.port),
             "--cluster", cluster_url or redis.url, "--advertise-url", self.url, "--cluster-allow", "http://127.0.0.1:",
             "--max-sessions", str(max_sessions), "--compute", "thread", "--max-pending-per-address", "64",
             "--idle-timeout", "60", *extra],
            cwd=REPO, env={**os.environ, "AVATAR_TOKENS": f"{TOKEN}:*"},
            stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True)

    def wait_listening(self) -> None:
        line = self.proc.stdout.readline()  # "avatar server: open http://..." once it listens
        if "open http" not in line:
            raise AssertionError(f"node did not start: {line!r}\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    def __init__(self, tmp_path: Path, nodes: int, max_sessions: int):
        self.redis = Redis(tmp_path).start()
        # Each node accepts pages loaded from any other (a redirected page keeps its origin).
        ports = [free_port() for _ in range(nodes)]
        origins = [a for p in ports for a in ("--origin", f"http://127.0.0.1:{p}")]
        self.nodes = [Node(self.redis, tmp_path / f"node{i}", max_sessions, ports[i], origins)
                      for i in range(nodes)]
        for n in self.nodes:
            n.wait_listening()

    def close(self) -> None:
        for n in self.nodes:
            n.stop()
        self.redis.stop()


@pytest.fixture
def cluster_of(tmp_path):
    made: list[Cluster] = []

    def make(nodes: int = 3, max_sessions: int = 1) -> Cluster:
        made.append(Cluster(tmp_path, nodes, max_sessions))
        return made[-1]

    yield make
    for c in made:
        c.close()


def avatar(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=30)


async def get_json(url: str, path: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def get_text(url: str, path: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + path) as r:
            assert r.status == 200
            return await r.text()


def port_of(ws_url: str) -> int:
    return int(ws_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


async def presenter(node: Node, room: str | None = None) -> tuple[AvatarClient, dict]:
    c = await AvatarClient(node.ws_url).connect()
    return c, await c.hello(token=TOKEN, room=room)


async def eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}") from None
            await asyncio.sleep(0.2)


async def test_presenters_land_on_different_nodes_then_busy_rooms_span_the_cluster(cluster_of):
    cluster = cluster_of(3, max_sessions=1)
    first = cluster.nodes[0]
    clients = []
    try:
        for i in range(3):  # all arrive at the same node
            c, reply = await presenter(first, room=f"room{i}")
            assert reply["type"] == "session", reply
            clients.append(c)
        assert sorted(port_of(c.ws_url) for c in clients) == sorted(n.port for n in cluster.nodes)
        assert clients[0].redirects == [] and all(len(c.redirects) == 1 for c in clients[1:])
        # A poisoned registry entry (a free "node" outside --cluster-allow) sends no one anywhere.
        import redis.asyncio as redis
        r = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
        await r.hset("avatar:node:evil", mapping={"url": "http://evil.example/", "capacity": 100, "sessions": 0,
                                                  "load": 0, "state": "up"})
        await r.sadd("avatar:nodes", "evil")
        await r.aclose()
        fourth, reply = await presenter(cluster.nodes[1])
        assert (reply["type"], reply["code"]) == ("error", "busy"), reply
        assert fourth.redirects == []
        await fourth.close()

        # A room live on another node has its presenter: no second one anywhere.
        second, reply = await presenter(first, room="room1")
        assert reply.get("code") == "room_busy" and second.redirects == [], reply
        await second.close()

        # A viewer that asks any node for a room is sent to the room's node.
        viewer = await AvatarClient(first.ws_url).connect()
        hello = await viewer.watch("room2", token=TOKEN)
        assert hello["presenter"] == {"identity": "demo"} and port_of(viewer.ws_url) == port_of(clients[2].ws_url)
        await viewer.close()

        # Every node lists every room, with its node; WHEP for a room elsewhere is sent there.
        rooms = (await get_json(cluster.nodes[2].url, "rooms"))["rooms"]
        assert [(r["room"], r["url"]) for r in rooms] == \
            [(f"room{i}", f"http://127.0.0.1:{port_of(c.ws_url)}/") for i, c in enumerate(clients)]
        player = RTCPeerConnection()
        player.addTransceiver("video", direction="recvonly")
        await player.setLocalDescription(await player.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{first.url}whep/room1", data=player.localDescription.sdp.encode(),
                                 headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"},
                                 allow_redirects=False) as r:
                assert r.status == 307 and r.headers["Location"] == \
                    f"http://127.0.0.1:{port_of(clients[1].ws_url)}/whep/room1"
        await player.close()

        # `avatar nodes` from any node: three nodes, one session each, no slot reserved.
        out = avatar("nodes", "--url", cluster.nodes[2].url, "--token", TOKEN, "--json")
        nodes = [n for n in json.loads(out.stdout)["nodes"] if n["id"] != "evil"]
        assert sorted(n["url"] for n in nodes) == sorted(n.url for n in cluster.nodes)
        assert [(n["sessions"], n["reserved"], n["capacity"], n["state"]) for n in nodes] == [(1, 0, 1, "up")] * 3
        out = avatar("nodes", "--url", cluster.nodes[2].url, "--token", TOKEN)
        assert "http://evil.example/" in out.stdout and "not in --cluster-allow" in out.stdout, out.stdout
    finally:
        for c in clients:
            await c.close()


@pytest.mark.slow
async def test_a_burst_of_hellos_over_three_nodes_admits_exactly_their_capacity(cluster_of):
    cluster = cluster_of(3, max_sessions=2)
    clients = [await AvatarClient(cluster.nodes[i % 3].ws_url).connect() for i in range(20)]
    try:
        replies = await asyncio.gather(*(c.hello(token=TOKEN) for c in clients))
        kinds = [r.get("type") if r.get("type") == "session" else r.get("code") for r in replies]
        assert kinds.count("session") == 6 and kinds.count("busy") == 14, kinds
        landed = [port_of(c.ws_url) for c, r in zip(clients, replies) if r["type"] == "session"]
        assert sorted(landed) == sorted([n.port for n in cluster.nodes] * 2)

        async def settled():  # reservations all consumed, the counts are the sessions
            nodes = (await get_json(cluster.nodes[0].url, "nodes"))["nodes"]
            assert [(n["sessions"], n["reserved"]) for n in nodes] == [(2, 0)] * 3, nodes
        await eventually(settled, 5, "three nodes of two sessions each")
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.mark.slow
async def test_a_killed_node_is_gone_within_seconds(cluster_of):
    cluster = cluster_of(3, max_sessions=1)
    victim = cluster.nodes[2]
    listed = json.loads(avatar("nodes", "--url", cluster.nodes[0].url, "--token", TOKEN, "--json").stdout)
    assert victim.url in [n["url"] for n in listed["nodes"]]
    victim.proc.kill()  # kill -9: no withdrawal, only the key's expiry
    victim.proc.wait(10)
    killed = time.monotonic()

    async def gone():
        nodes = (await get_json(cluster.nodes[0].url, "nodes"))["nodes"]
        assert sorted(n["url"] for n in nodes) == sorted(n.url for n in cluster.nodes[:2]), nodes
    await eventually(gone, 8, "the killed node to leave the list")
    assert time.monotonic() - killed < 5.5  # its key's TTL is 3 s after its last refresh
    out = avatar("nodes", "--url", cluster.nodes[1].url, "--token", TOKEN)
    assert out.returncode == 0 and victim.url not in out.stdout and out.stdout.count("http://127.0.0.1:") == 2, \
        out.stdout + out.stderr
    # Placement no longer counts it: two presenters fit, the third is busy.
    clients = []
    try:
        for expected in ("session", "session", "busy"):
            c, reply = await presenter(cluster.nodes[0])
            clients.append(c)
            assert (reply.get("code") or reply["type"]) == expected, reply
    finally:
        for c in clients:
            await c.close()


async def rejoin(entry: Node, room: str, role: str = "presenter") -> tuple[AvatarClient, float]:
    """What a page does when its node is gone: start over at its entry node, again and again
    (the pages back off from 0.5 s; here every 0.25 s), until it is placed and streams. The
    client, and when it was placed."""
    from server.bench.client import ClientError

    while True:
        c = await AvatarClient(entry.ws_url).connect()
        try:
            if role == "presenter":
                await c.start_session(drive(), token=TOKEN, room=room)
            else:
                hello = await c.watch(room, token=TOKEN)
                if hello.get("presenter") is None:  # the room is not back yet
                    raise ClientError("no presenter yet")
            return c, time.monotonic()
        except (ClientError, aiohttp.ClientError, OSError):  # refused, or sent to a node just gone
            await c.close()
            await asyncio.sleep(0.25)


@pytest.mark.slow
async def test_a_killed_nodes_presenter_and_viewer_stream_again_from_a_live_node(cluster_of):
    # kill -9 the node that holds a room: within 5 s its presenter, starting over at its entry
    # node as the page does, streams from a live node, and the room's viewer sees the avatar again.
    cluster = cluster_of(3, max_sessions=1)
    entry = cluster.nodes[0]
    holder, reply = await presenter(entry)  # the entry node is full: the room goes elsewhere
    assert reply["type"] == "session", reply
    first, _ = await rejoin(entry, "onstage")
    viewer, _ = await rejoin(entry, "onstage", role="viewer")
    clients = [holder, first, viewer]
    try:
        await wait_for(lambda: len(first.received) >= 5 and len(viewer.received) >= 5, 20, "the first frames")
        victim = next(n for n in cluster.nodes if n.port == port_of(first.ws_url))
        assert victim is not entry and port_of(viewer.ws_url) == victim.port
        victim.proc.kill()
        killed = time.monotonic()
        again, placed = await rejoin(entry, "onstage")
        clients.append(again)
        await wait_for(lambda: len(again.received) >= 3, 10, "frames from the new node")
        streaming = time.monotonic() - killed
        assert port_of(again.ws_url) not in (victim.port, entry.port) and streaming < 5.0, streaming
        watcher, _ = await rejoin(entry, "onstage", role="viewer")
        clients.append(watcher)
        await wait_for(lambda: len(watcher.received) >= 3, 10, "the viewer's frames from the new node")
        assert port_of(watcher.ws_url) == port_of(again.ws_url)
        print(f"presenter placed {placed - killed:.2f} s and streaming {streaming:.2f} s after kill -9; "
              f"the viewer watching {time.monotonic() - killed:.2f} s after")
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.mark.slow
async def test_a_reservation_nobody_takes_expires(cluster_of):
    cluster = cluster_of(2, max_sessions=1)
    full, spare = cluster.nodes
    holder, reply = await presenter(full)
    assert reply["type"] == "session"
    clients = [holder]
    try:
        truant = await AvatarClient(full.ws_url).connect()  # told where to go, never goes
        clients.append(truant)
        reply = await truant.hello(token=TOKEN, max_redirects=0)
        target = reply.get("url", "")
        assert reply["type"] == "redirect" and target.startswith(f"ws://127.0.0.1:{spare.port}/ws?reservation=")
        reserved_at = time.monotonic()
        nodes = {n["url"]: n for n in (await get_json(full.url, "nodes"))["nodes"]}
        assert (nodes[spare.url]["sessions"], nodes[spare.url]["reserved"]) == (0, 1)
        late, reply = await presenter(full)  # the one free slot is promised
        clients.append(late)
        assert reply.get("code") == "busy", reply

        async def expired():
            nodes = {n["url"]: n for n in (await get_json(full.url, "nodes"))["nodes"]}
            assert nodes[spare.url]["reserved"] == 0
        await eventually(expired, 8, "the reservation to expire")
        assert time.monotonic() - reserved_at < 6.5  # held for 5 s
        # Going there late: the expired reservation counts for nothing, the hello is placed
        # afresh (the slot is free again); then the cluster is full once, not twice.
        truant_late = await AvatarClient(target).connect()
        clients.append(truant_late)
        reply = await truant_late.hello(token=TOKEN)
        assert reply["type"] == "session" and truant_late.redirects == [], reply
        last, reply = await presenter(full)
        clients.append(last)
        assert reply.get("code") == "busy", reply
    finally:
        for c in clients:
            await c.close()


@pytest.mark.slow
async def test_a_node_started_before_redis_serves_and_registers_when_redis_comes(tmp_path):
    redis = Redis(tmp_path)  # not started yet
    node = Node(redis, tmp_path / "node", 1)
    try:
        node.wait_listening()
        assert (await get_text(node.url, "healthz")).splitlines() == ["ok", "cluster: redis unreachable"]
        c, reply = await presenter(node)  # admitted locally meanwhile
        assert reply["type"] == "session"
        redis.start()

        async def registered():
            assert await get_text(node.url, "healthz") == "ok\n"
            nodes = (await get_json(node.url, "nodes"))["nodes"]
            assert [(n["url"], n["sessions"]) for n in nodes] == [(node.url, 1)]
        await eventually(registered, 5, "the node to register")
        await c.close()
    finally:
        node.stop()
        redis.stop()



def private_ca(folder: Path) -> tuple[Path, Path, Path]:
    """(certificate, key, CA certificate) for 127.0.0.1, signed by a CA no system trusts."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    span = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))

    def issue(subject, key, issuer, issuer_key, ca: bool):
        builder = x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]),
                                          issuer_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]),
                                          public_key=key.public_key(), serial_number=x509.random_serial_number(),
                                          **span)
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / "redis.pem", folder / "redis.key", folder / "ca.pem"
    paths[0].write_bytes(issue("redis", key, "test CA", ca_key, False).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(issue("test CA", ca_key, "test CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    return paths


async def test_nodes_reach_redis_over_tls_with_a_private_ca_and_not_without_it(tmp_path):
    tls = private_ca(tmp_path)
    try:
        redis = Redis(tmp_path, tls).start()
    except AssertionError:
        pytest.skip("this redis-server does not serve TLS")
    trusted = Node(redis, tmp_path / "trusted", 1, cluster_url=f"{redis.url}?ssl_ca_certs={tls[2]}")
    untrusted = Node(redis, tmp_path / "untrusted", 1)  # the system's CAs only
    try:
        trusted.wait_listening(), untrusted.wait_listening()

        async def registered():
            assert await get_text(trusted.url, "healthz") == "ok\n"
            assert [n["url"] for n in (await get_json(trusted.url, "nodes"))["nodes"]] == [trusted.url]
        await eventually(registered, 5, "the node with the CA to register over TLS")
        assert (await get_text(untrusted.url, "healthz")).splitlines() == ["ok", "cluster: redis unreachable"]
        assert "certificate verify failed" in untrusted.log.read_text()
    finally:
        trusted.stop(), untrusted.stop()
        redis.stop()


class Sentinel(Redis):
    """One redis-server in Sentinel mode watching `primary` as "avatar" (quorum 1, a primary
    counts as down after 1 s)."""

    def __init__(self, workdir: Path, primary: Redis):
        super().__init__(workdir, primary.tls)
        self.conf = workdir / "sentinel.conf"  # Sentinel rewrites it: a file of its own
        port = f"port {self.port}\n" if self.tls is None else (
            f"port 0\ntls-port {self.port}\ntls-cert-file {self.tls[0]}\ntls-key-file {self.tls[1]}\n"
            f"tls-ca-cert-file {self.tls[2]}\ntls-auth-clients no\ntls-replication yes\n")
        self.conf.write_text(f"{port}bind 127.0.0.1\ndir {workdir}\n"
                             f"sentinel monitor avatar 127.0.0.1 {primary.port} 1\n"
                             f"sentinel auth-pass avatar {PASSWORD}\n"
                             "sentinel down-after-milliseconds avatar 1000\n"
                             "sentinel failover-timeout avatar 4000\n")

    @property
    def url(self) -> str:
        if self.tls is None:
            return f"redis+sentinel://:{PASSWORD}@127.0.0.1:{self.port}/avatar/0"
        return f"rediss+sentinel://:{PASSWORD}@127.0.0.1:{self.port}/avatar/0?ssl_ca_certs={self.tls[2]}"

    def command(self) -> list[str]:
        return [REDIS_SERVER, str(self.conf), "--sentinel"]


def direct(redis: Redis):
    """A client of that one Redis (TLS if it serves TLS)."""
    import redis as redis_py

    tls = {} if redis.tls is None else {"ssl": True, "ssl_ca_certs": str(redis.tls[2])}
    password = None if isinstance(redis, Sentinel) else PASSWORD
    return redis_py.Redis(host="127.0.0.1", port=redis.port, password=password, decode_responses=True,
                          socket_timeout=1, **tls)


@contextlib.contextmanager
def asking(redis: Redis):
    """direct(redis), where a dropped connection is "not yet" to `eventually`, not a failure:
    a Redis switching roles may drop one as it is made (seen over TLS)."""
    import redis as redis_py

    try:
        with direct(redis) as client:
            yield client
    except redis_py.ConnectionError as e:
        raise AssertionError(f"redis on port {redis.port} not answering: {e}") from None


def role(redis: Redis) -> dict[str, str]:
    """INFO replication of one Redis, as a dict."""
    with asking(redis) as client:
        return {k: str(v) for k, v in client.info("replication").items()}


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_node_through_sentinel_follows_a_failed_primary_to_its_replica(tmp_path, tls):
    keys = private_ca(tmp_path) if tls else None
    primary = Redis(tmp_path / "primary", keys).start()
    replica = Redis(tmp_path / "replica", keys, extra=["--replicaof", "127.0.0.1", str(primary.port),
                                                        "--masterauth", PASSWORD, "--tls-replication",
                                                        "yes" if tls else "no"]).start()
    sentinel = Sentinel(tmp_path / "sentinel", primary).start()
    node = Node(primary, tmp_path / "node", 1, cluster_url=sentinel.url)
    try:
        node.wait_listening()

        async def registered(where: Redis):
            assert await get_text(node.url, "healthz") == "ok\n"
            with asking(where) as client:
                assert client.exists(f"avatar:node:{(await get_json(node.url, 'nodes'))['nodes'][0]['id']}")
        await eventually(lambda: registered(primary), 5, "the node to register through Sentinel")

        async def in_sync():
            assert role(replica).get("master_link_status") == "up"
            with asking(sentinel) as watcher:
                assert watcher.execute_command("SENTINEL", "get-master-addr-by-name", "avatar") == [
                    "127.0.0.1", str(primary.port)]
        await eventually(in_sync, 10, "the replica to sync and Sentinel to watch the primary")
        primary.stop()  # killed: Sentinel must notice, promote the replica, and the node follow
        started = time.monotonic()

        async def promoted():
            assert role(replica)["role"] == "master"
        await eventually(promoted, 30, "Sentinel to promote the replica")
        node_id = (await get_json(node.url, "nodes"))["nodes"][0]["id"]
        with direct(replica) as client:
            client.delete(f"avatar:node:{node_id}")  # the dead primary's copy: only the node can write it again
        await eventually(lambda: registered(replica), 15, "the node to register on the promoted replica")
        print(f"sentinel ({'TLS' if tls else 'plain'}): the node registered on the promoted replica "
              f"{time.monotonic() - started:.1f} s after the primary was killed")
        assert await cluster_audit(sentinel.url) == {}  # the audit query finds the primary too (no uses yet)
    finally:
        node.stop()
        for r in (sentinel, replica, primary):
            r.stop()


def drive() -> ClipTrack:
    return ClipTrack(read_seconds(clip("drive_expressive.mp4"), 1.0), loop=True)


@pytest.mark.slow
async def test_redis_lost_and_back_drops_no_session_and_nodes_reregister(cluster_of):
    cluster = cluster_of(3, max_sessions=1)
    a, b = cluster.nodes[0], cluster.nodes[1]
    streaming = await AvatarClient(a.ws_url).connect()
    local = None
    try:
        await streaming.start_session(drive(), token=TOKEN)
        await wait_for(lambda: len(streaming.received) >= 5, 20, "avatar frames")
        cluster.redis.stop()

        async def reported():
            assert (await get_text(a.url, "healthz")).splitlines() == ["ok", "cluster: redis unreachable"]
        await eventually(reported, 5, "/healthz to report Redis lost")
        # Admitted locally only, within the node's own capacity: b has a free slot, a has none.
        local, reply = await presenter(b)
        assert reply["type"] == "session" and local.redirects == [], reply
        refused, reply = await presenter(a)
        assert reply.get("code") == "busy", reply
        await refused.close()
        n = len(streaming.received)  # down for longer than a registration lives (3 s)
        await wait_for(lambda: len(streaming.received) >= n + 90, 15, "frames while Redis is down")
        assert (await get_text(a.url, "healthz")).splitlines()[1] == "cluster: redis unreachable"
        assert (await get_json(a.url, "nodes"))["cluster"] == "redis unreachable"

        cluster.redis.start()  # empty: every node registers again, with its sessions

        async def back():
            assert await get_text(a.url, "healthz") == "ok\n"
            nodes = (await get_json(a.url, "nodes"))["nodes"]
            assert sorted((n["url"], n["sessions"]) for n in nodes) == \
                sorted([(a.url, 1), (b.url, 1), (cluster.nodes[2].url, 0)]), nodes
        await eventually(back, 6, "the nodes to re-register")
        n = len(streaming.received)
        await wait_for(lambda: len(streaming.received) >= n + 10, 10, "frames after Redis came back")
        assert streaming.ws.close_code is None
    finally:
        await streaming.close()
        if local is not None:
            await local.close()


async def test_whip_to_a_full_node_is_redirected_and_streams(cluster_of):
    cluster = cluster_of(2, max_sessions=1)
    full, spare = cluster.nodes
    holder, reply = await presenter(full)
    assert reply["type"] == "session" and holder.redirects == []
    camera = RTCPeerConnection()
    received = asyncio.get_running_loop().create_future()

    def on_track(track):
        async def first_frame():
            frame = await track.recv()
            if not received.done():
                received.set_result(frame)
        if track.kind == "video":
            asyncio.ensure_future(first_frame())
    camera.on("track", on_track)
    try:
        camera.addTrack(drive())
        await camera.setLocalDescription(await camera.createOffer())
        offer = camera.localDescription.sdp.encode()
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{full.url}whip/stage?identity=demo", data=offer, headers=headers,
                                 allow_redirects=False) as r:
                assert r.status == 307, await r.text()
                location = r.headers["Location"]
            assert location.startswith(f"{spare.url}whip/stage?identity=demo&reservation=")
            async with http.post(location, data=offer, headers=headers, allow_redirects=False) as r:
                assert r.status == 201, await r.text()
                answer = await r.text()
        await camera.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.wait_for(received, 20)  # the avatar, back from the spare node
        rooms = (await get_json(full.url, "rooms"))["rooms"]
        assert [(r["room"], r["url"]) for r in rooms] == [("stage", spare.url)]
    finally:
        await camera.close()
        await holder.close()


def test_cluster_settings_are_checked_before_anything_starts():
    from server.config import ServerConfig
    from server.security import ConfigError

    redis_url = "redis://:pw@127.0.0.1:6379/0"
    for kwargs, needle in [({"cluster": redis_url, "cluster_allow": ["http://n"]}, "--advertise-url"),
                           ({"cluster": redis_url, "advertise_url": "http://n1:8080/"}, "--cluster-allow"),
                           ({"cluster": redis_url, "advertise_url": "http://n1:8080/",
                             "cluster_allow": ["https://n"]}, "matches no --cluster-allow"),
                           ({"cluster": redis_url, "advertise_url": "ftp://n1/", "cluster_allow": ["ftp"]},
                            "http(s)://"),
                           ({"advertise_url": "http://n1:8080/"}, "go with --cluster"),
                           ({"cluster": "http://:pw@127.0.0.1:6379/0", "advertise_url": "http://n1:8080/",
                             "cluster_allow": ["http://n"]}, "--cluster must be redis://"),
                           ({"cluster": "rediss://:pw@n:6380/0?ssl_ca_certs=/no/such/ca.pem",
                             "advertise_url": "http://n1:8080/", "cluster_allow": ["http://n"]}, "cannot read"),
                           ({"cluster": f"{redis_url}?ssl_ca_certs={__file__}", "advertise_url": "http://n1:8080/",
                             "cluster_allow": ["http://n"]}, "goes with rediss://"),
                           ({"cluster": "rediss://:pw@n:6380/0?verify=no", "advertise_url": "http://n1:8080/",
                             "cluster_allow": ["http://n"]}, "unknown option 'verify'"),
                           ({"cluster": "redis+sentinel://:pw@s1:26379,s2/", "advertise_url": "http://n1:8080/",
                             "cluster_allow": ["http://n"]}, "name for the primary is missing")]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            ServerConfig(**kwargs).validate()
    ServerConfig(cluster=redis_url, advertise_url="http://n1:8080", cluster_allow=["http://n"]).validate()


@pytest.mark.slow
async def test_the_presenter_page_follows_a_redirect_and_streams(cluster_of, tmp_path):
    from server.bench.chromium import CHROMIUM, browser_page, write_y4m
    from test_browser import poll

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    y4m = tmp_path / "camera.y4m"
    write_y4m(clip("drive_wink.mp4"), y4m)
    cluster = cluster_of(2, max_sessions=1)
    full, spare = cluster.nodes
    holder, reply = await presenter(full)
    assert reply["type"] == "session"
    page_state = """(() => ({frames: (document.getElementById('avatar').getVideoPlaybackQuality
        ? document.getElementById('avatar').getVideoPlaybackQuality().totalVideoFrames : 0),
        url: window.avatar.url, message: document.getElementById('message').textContent}))()"""
    try:
        async with browser_page(f"{full.url}?autostart=1&token={TOKEN}&room=onstage", y4m,
                                tmp_path / "profile") as tools:
            state = await poll(tools, lambda s: s.get("frames", 0) > 10, 40, page_state)
            rooms = (await get_json(full.url, "rooms"))["rooms"]
        assert state.get("frames", 0) > 10 and "Streaming" in state.get("message", ""), state
        assert (state.get("url") or "").startswith(f"ws://127.0.0.1:{spare.port}/ws?reservation="), state
        assert [(r["room"], r["url"]) for r in rooms] == [("onstage", spare.url)]
    finally:
        await holder.close()


@pytest.mark.slow
async def test_the_viewer_page_follows_a_redirect_to_the_rooms_node(cluster_of, tmp_path):
    """A viewer link of any node plays the room: the page follows the redirect to the node
    where the room's presenter is."""
    from server.bench.chromium import CHROMIUM, browser_page, write_y4m
    from test_browser import poll

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    y4m = tmp_path / "camera.y4m"
    write_y4m(clip("drive_wink.mp4"), y4m)  # the page asks for no camera; the flag wants a file
    cluster = cluster_of(2, max_sessions=1)
    elsewhere, home = cluster.nodes
    streaming = await AvatarClient(home.ws_url).connect()
    page_state = """(() => ({frames: (document.getElementById('stream').getVideoPlaybackQuality
        ? document.getElementById('stream').getVideoPlaybackQuality().totalVideoFrames : 0),
        url: window.viewer.url, message: document.getElementById('message').textContent}))()"""
    try:
        await streaming.start_session(drive(), token=TOKEN, room="onstage")
        await wait_for(lambda: len(streaming.received) >= 5, 20, "avatar frames")
        async with browser_page(f"{elsewhere.url}viewer.html?room=onstage&token={TOKEN}", y4m,
                                tmp_path / "profile", "--autoplay-policy=no-user-gesture-required") as tools:
            state = await poll(tools, lambda s: s.get("frames", 0) > 10, 40, page_state)
        assert state.get("frames", 0) > 10, state
        assert (state.get("url") or "").startswith(f"ws://127.0.0.1:{home.port}/ws"), state
    finally:
        await streaming.close()


async def test_one_address_gets_a_bounded_number_of_redirects_across_the_cluster(tmp_path):
    # Each redirect holds a slot elsewhere for a while: one client (address and token) gets at
    # most REDIRECTS_PER_ADDRESS of them from all the nodes together, then is placed where it
    # knocks or nowhere. Counted in Redis, so knocking at another node does not reset it.
    import redis.asyncio as redis

    from server.cluster import node

    server = Redis(tmp_path).start()
    full = [node.ClusterNode(server.url, f"http://127.0.0.1:{9000 + i}/", ["http://127.0.0.1:"], 1,
                             node.LocalView(lambda: 1, lambda: [])) for i in range(2)]  # no slot of their own
    try:
        for n in full:
            await n.start()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        await r.hset("avatar:node:spare", mapping={"url": "http://127.0.0.1:9100/", "capacity": 100,
                                                   "sessions": 0, "load": 0, "state": "up"})
        await r.sadd("avatar:nodes", "spare")
        alice, bob = node.client_key("10.0.0.1", "alice"), node.client_key("10.0.0.1", "bob")
        for i in range(node.REDIRECTS_PER_ADDRESS):  # alternating between the two entry nodes
            with pytest.raises(node.Redirect):
                await full[i % 2].place(address=alice)
        for n in full:
            with pytest.raises(node.NoSlot):
                await n.place(address=alice)
        with pytest.raises(node.Redirect):  # another address is sent on as before
            await full[0].place(address=node.client_key("10.0.0.2", "alice"))
        with pytest.raises(node.Redirect):  # and so is another token behind the same NAT
            await full[0].place(address=bob)
        assert int(await r.get(f"avatar:redirects:{alice}")) == node.REDIRECTS_PER_ADDRESS
        assert 0 < await r.pttl(f"avatar:redirects:{alice}") <= node.RESERVATION_MS  # forgotten after
        await r.aclose()
    finally:
        for n in full:
            await n.stop()
        server.stop()


@pytest.mark.slow
async def test_a_draining_node_sends_new_presenters_to_the_others(cluster_of):
    cluster = cluster_of(2, max_sessions=2)
    draining, other = cluster.nodes
    out = avatar("drain", "--url", draining.url)
    assert out.returncode == 0 and "draining" in out.stdout, out.stdout + out.stderr

    async def marked():
        nodes = {n["url"]: n["state"] for n in (await get_json(other.url, "nodes"))["nodes"]}
        assert nodes[draining.url] == "draining", nodes
    await eventually(marked, 5, "the node to say it is draining")
    metrics = await get_text(other.url, "metrics")  # a loopback scrape: every sample names its node
    assert f'avatar_sessions_active{{node="{other.url}"}}' in metrics, metrics[:500]
    c, reply = await presenter(draining)
    try:
        assert reply["type"] == "session" and c.redirects and port_of(c.redirects[-1]) == other.port, \
            (reply, c.redirects)
    finally:
        await c.close()


# ---- one audit across nodes ---------------------------------------------------------------
async def cluster_audit(redis_url: str, *flags) -> dict[str, dict]:
    """The uses by id that `avatar audit --cluster URL --json FLAGS` prints (run in this
    process: it is polled)."""
    from server.audit import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    assert await asyncio.to_thread(run, parser.parse_args(["--cluster", redis_url, "--json", *flags]), None, out) == 0
    return {u["use_id"]: u for u in map(json.loads, out.getvalue().splitlines())}


@pytest.mark.slow
async def test_one_audit_query_sees_every_nodes_uses_and_a_killed_nodes_use_as_lost(cluster_of, tmp_path):
    from server.audit import ABNORMAL

    cluster = cluster_of(2, max_sessions=1)
    first, second = cluster.nodes
    node_id = {n["url"]: n["id"] for n in (await get_json(first.url, "nodes"))["nodes"]}
    done, reply = await presenter(first, room="left")
    assert reply["type"] == "session" and done.redirects == []
    live, reply = await presenter(first, room="right")  # the first node is full: placed on the second
    assert reply["type"] == "session" and port_of(live.ws_url) == second.port
    done_id, live_id = done.session["id"], live.session["id"]
    try:
        await done.close()

        async def both_on_record():
            uses = await cluster_audit(cluster.redis.url)
            assert {done_id, live_id} <= set(uses), uses
            assert (uses[done_id]["node"], uses[done_id]["node_url"], uses[done_id]["status"]) == \
                (node_id[first.url], first.url, "ok"), uses
            assert (uses[live_id]["node"], uses[live_id]["status"]) == (node_id[second.url], "open"), uses
        await eventually(both_on_record, 5, "both nodes' uses in the cluster's audit")
        out = avatar("audit", "--cluster", cluster.redis.url, "--kind", "session")
        table = out.stdout.splitlines()
        assert out.returncode == 0 and table[0].split()[:2] == ["id", "node"], out.stdout + out.stderr
        assert sorted(row.split()[1] for row in table[1:]) == sorted(node_id.values()), out.stdout

        second.proc.kill()  # kill -9 mid-session: no end recorded, the node's key expires

        async def lost():
            assert (await cluster_audit(cluster.redis.url)).get(live_id, {}).get("status") == "node lost"
        await eventually(lost, 8, "the killed node's session to show as lost")
        assert list(await cluster_audit(cluster.redis.url, "--id", live_id[:8])) == [live_id]

        # Started again on the same home, it ends what it left open, and says so to the cluster.
        second.proc.wait(10)
        cluster.nodes[1] = again = Node(cluster.redis, tmp_path / "node1", 1, second.port)
        again.wait_listening()

        async def recovered():
            use = (await cluster_audit(cluster.redis.url)).get(live_id, {})
            assert (use.get("status"), use.get("reason"), use.get("node")) == \
                ("abnormal", ABNORMAL, node_id[second.url]), use
        await eventually(recovered, 5, "the restarted node's 'ended abnormally' in the cluster's audit")
    finally:
        await done.close()
        await live.close()


async def test_the_audit_mirror_sends_what_waited_for_redis_and_what_a_stopped_mirror_left(tmp_path):
    """In one process, a real Redis: events written while Redis is down reach the stream once
    it is back; a mirror started again (a restarted node) sends what the last one did not."""
    from server.audit import AuditLog, AuditThread, audit_path, fold_uses
    from server.cluster.audit import MIRROR_EVERY, STREAM, AuditMirror, read_stream
    from server.cluster.node import ClusterNode, LocalView

    redis = Redis(tmp_path).start()
    audit = AuditThread(AuditLog(audit_path(tmp_path / "home"), "test"))
    node = ClusterNode(redis.url, "http://127.0.0.1:1/", ["http://127.0.0.1:"], 1, LocalView(lambda: 0, lambda: []))
    mirror = AuditMirror(node, audit)

    async def stream() -> list[dict]:
        return (await asyncio.to_thread(read_stream, redis.url))[0]

    async def streamed(expected: list[tuple[str, str]], what: str) -> list[dict]:
        async def check():
            entries = await stream()
            assert [(e["use_id"], e["event"]) for e in entries] == expected, entries
            assert {e["node"] for e in entries} == {node.id}
            return entries
        return await eventually(check, 6, what)

    try:
        older = await audit.start("render", "local:jo", "demo")  # before this server: never the cluster's
        await audit.open()
        await node.start()
        await mirror.start()
        a = await audit.start("session", "tok-a", "demo", room="main")
        await streamed([(a, "start")], "a start in the stream")

        redis.stop()

        async def unreachable():
            assert not node.reachable
        await eventually(unreachable, 5, "the node to find Redis lost")
        await audit.switched(a, "alice")
        await audit.end(a, frames=10)
        b = await audit.start("viewer", "tok-b", "alice", room="main")
        await asyncio.sleep(MIRROR_EVERY)  # a flush meanwhile finds Redis lost: the events wait
        redis.start()  # empty, as a restarted Redis without persistence is
        await streamed([(a, "identity"), (a, "end"), (b, "start")], "the waiting events, once Redis is back")

        mirror._task.cancel()  # as a killed node's: no last flush
        await asyncio.gather(mirror._task, return_exceptions=True)
        await audit.end(b, frames=3)
        mirror = AuditMirror(node, audit)  # the node started again on the same home
        await mirror.start()
        entries = await streamed([(a, "identity"), (a, "end"), (b, "start"), (b, "end")], "what the last mirror left")
        assert older not in {e["use_id"] for e in entries}
        [viewer] = fold_uses(entries, {node.id})  # a's start went with the Redis that was lost
        assert (viewer["use_id"], viewer["status"], viewer["frames"], viewer["node"]) == (b, "ok", 3, node.id)
        assert mirror.cursor.read_text() == f"{mirror.seq}\n" and mirror.seq == await audit.last_seq()

        # A Redis that answers the node but refuses the entries (the stream's key taken): they wait too.
        await node.client.delete(STREAM)
        await node.client.set(STREAM, "not a stream")
        c = await audit.start("viewer", "tok-c", "alice", room="main")

        async def refused():
            assert mirror._failing and mirror.seq < await audit.last_seq()
        await eventually(refused, 3, "the mirror to find its entries refused")
        await node.client.delete(STREAM)
        await streamed([(c, "start")], "the refused event, once Redis takes it")
        await audit.end(c, frames=1)
        await mirror.stop()  # a clean stop sends what is left before the node leaves
        assert [(e["use_id"], e["event"]) for e in await stream()] == [(c, "start"), (c, "end")]
    finally:
        await mirror.stop()
        await node.stop()
        await audit.close()
        redis.stop()


def test_avatar_audit_cluster_says_in_one_line_what_is_wrong(tmp_path):
    redis = Redis(tmp_path).start()
    try:
        for url, needle in [("http://127.0.0.1:6379/0", "error: --cluster must be redis://"),
                            (f"redis://127.0.0.1:{free_port()}/0", "error: cannot read the cluster's audit stream "
                                                                  "at redis://127.0.0.1:"),
                            (redis.url.replace(PASSWORD, "wrong-password"), "error: cannot read the cluster's audit "
                                                                            "stream at redis://:***@127.0.0.1:")]:
            out = avatar("audit", "--cluster", url)
            assert out.returncode == 2 and out.stdout == "", (url, out)
            assert out.stderr.startswith(needle) and out.stderr.count("\n") == 1, (url, out.stderr)
            assert "wrong-password" not in out.stderr
    finally:
        redis.stop()
