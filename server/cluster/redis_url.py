"""The cluster's Redis, as `--cluster` names it, and the one way every part of the cluster
connects to it.

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]               one Redis
    rediss://...[?ssl_ca_certs=CA.pem&...]                     the same over TLS (TLS_OPTIONS)
    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?sentinel_password=P]
                                                               the primary that these Sentinels
                                                               name SERVICE (default port 26379)
    rediss+sentinel://...[&ssl_ca_certs=CA.pem&...]            the same, TLS to the Sentinels and
                                                               to the primary alike
    unix://PATH

With Sentinel, the password is the primary's (and its replicas'); Sentinels that ask for one
of their own get `sentinel_password`. When the primary fails, the next call after the
failover asks the Sentinels again and reaches the promoted replica.
"""
from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

TIMEOUT = 1.0  # seconds any Redis call may take before Redis counts as unreachable
SENTINEL_PORT = 26379

# What a rediss:// URL may add (redis-py passes them to its TLS connection): a private CA's
# certificates, this node's own certificate and key where Redis asks for one
# (tls-auth-clients), and whether the host name must match the certificate.
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_OPTIONS = (*TLS_FILES, "ssl_check_hostname")
SENTINEL_OPTIONS = ("sentinel_password",)
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?")
SERVICE = re.compile(r"/([A-Za-z0-9._-]{1,64})(?:/(\d{1,2}))?/?")
FORM = ("--cluster must be redis://[:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS, "
        "redis[s]+sentinel://[:PASSWORD@]HOST[:PORT][,HOST...]/SERVICE[/DB] for Sentinel)")


def redacted(url: str) -> str:
    """A Redis URL fit for a log: no password."""
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return url
    credentials = netloc.rpartition("@")[0]
    user, colon, _ = credentials.partition(":")
    return url.replace(f"{credentials}@", f"{user}{colon}{'***' if colon else ''}@", 1)


def check_redis_url(url: str) -> str:
    """The cluster's Redis URL as given (the forms above); ValueError, its password hidden,
    if it is not one. Options after `?`, once each: TLS_OPTIONS (rediss:// and
    rediss+sentinel://; files readable), SENTINEL_OPTIONS (redis[s]+sentinel://)."""
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        sentinel_parts(url)
    else:
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
            ok = (parts.scheme in ("redis", "rediss") and bool(parts.hostname)
                  and re.fullmatch(r"/?\d*", parts.path) is not None) or (parts.scheme == "unix" and bool(parts.path))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{FORM}, got {redacted(url)!r}")
    _check_options(parse_qs(parts.query, keep_blank_values=True), parts.scheme)
    return url


def _check_options(options: dict[str, list[str]], scheme: str) -> None:
    allowed = {"rediss": TLS_OPTIONS, "redis+sentinel": SENTINEL_OPTIONS,
               "rediss+sentinel": TLS_OPTIONS + SENTINEL_OPTIONS}.get(scheme, ())
    for name, values in options.items():
        if name not in TLS_OPTIONS + SENTINEL_OPTIONS:
            raise ValueError(f"--cluster: unknown option {name!r}; rediss:// may add {', '.join(TLS_OPTIONS)}, "
                             f"redis+sentinel:// {', '.join(SENTINEL_OPTIONS)}")
        if name not in allowed:
            needs = "rediss:// or rediss+sentinel:// (TLS)" if name in TLS_OPTIONS else "redis[s]+sentinel://"
            raise ValueError(f"--cluster: {name} goes with {needs}, not {scheme}://")
        if len(values) != 1 or not values[0]:
            raise ValueError(f"--cluster: {name} needs one value")
        if name in TLS_FILES and not os.access(values[0], os.R_OK):
            raise ValueError(f"--cluster: {name}: cannot read {values[0]}")
        if name == "ssl_check_hostname" and values[0] not in ("true", "false"):
            raise ValueError("--cluster: ssl_check_hostname must be true or false")


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]  # (host, port)
    service: str  # the Sentinels' name for the primary
    db: int
    username: str | None
    password: str | None  # the primary's
    sentinel_password: str | None
    tls: dict  # rediss+sentinel: redis-py's TLS arguments, for the Sentinels and the primary alike


def sentinel_parts(url: str) -> SentinelURL:
    """The parts of a redis[s]+sentinel:// URL; ValueError if it is not one."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    user, _, password = credentials.partition(":")
    sentinels = []
    for host in hosts.split(","):
        m = HOST.fullmatch(host)
        if m is None or (m.group(2) and not 0 < int(m.group(2)) < 65536):
            raise ValueError(f"{FORM}: {host!r} is not HOST[:PORT], in {redacted(url)!r}")
        sentinels.append((m.group(1).strip("[]"), int(m.group(2) or SENTINEL_PORT)))
    service = SERVICE.fullmatch(parts.path)
    if service is None:
        raise ValueError(f"{FORM}: the Sentinels' name for the primary is missing, in {redacted(url)!r}")
    options = {k: v[0] for k, v in parse_qs(parts.query).items()}
    tls = {}
    if parts.scheme == "rediss+sentinel":
        tls = {"ssl": True, **{k: options[k] for k in TLS_OPTIONS if k in options}}
    if "ssl_check_hostname" in tls:
        tls["ssl_check_hostname"] = tls["ssl_check_hostname"] == "true"
    return SentinelURL(sentinels, service.group(1), int(service.group(2) or 0), unquote(user) or None,
                       unquote(password) or None, options.get("sentinel_password"), tls)


def redis_client(url: str, *, sync: bool = False, single_connection: bool = False):
    """A client of the cluster's Redis, made as every part of the cluster makes one: a call
    fails after TIMEOUT, with no retries, and replies are str. ValueError for a bad URL."""
    check_redis_url(url)
    if sync:  # a command's client (avatar audit --cluster): a fresh connection each time
        import redis
        from redis.retry import Retry
        from redis.sentinel import Sentinel, SentinelConnectionPool
    else:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
    from redis.backoff import NoBackoff

    common = dict(socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0))
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, single_connection_client=single_connection, decode_responses=True, **common)
    where = sentinel_parts(url)
    common.update(where.tls)
    follow = {} if sync else {"connection_class": _following_connection(bool(where.tls))}
    watchers = Sentinel(where.sentinels, sentinel_kwargs={"password": where.sentinel_password, **common})
    pool = SentinelConnectionPool(where.service, watchers, is_master=True, db=where.db, username=where.username,
                                  password=where.password, decode_responses=True, **follow, **common)
    client = redis.Redis(connection_pool=pool, single_connection_client=single_connection)
    client.auto_close_connection_pool = True  # the client owns its pool, as from_url's does
    return client


@functools.cache
def _following_connection(tls: bool):
    """redis-py's asyncio Sentinel connection (over TLS or not), asking the Sentinels where the
    primary is each time it connects again. redis-py 6.4 does so only when a pool hands a
    connection out; a single-connection client (the node's: commands in the order issued)
    reconnects in send_packed_command, which went back to the failed primary's address forever."""
    from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    class FollowingConnection(SentinelManagedSSLConnection if tls else SentinelManagedConnection):
        async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
            if not self.is_connected and self.connection_pool.is_master:
                self.host, self.port = await self.connection_pool.get_master_address()
            return await super().connect_check_health(check_health, retry_socket_connect)

    return FollowingConnection
