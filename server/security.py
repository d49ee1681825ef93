"""Who may connect and what they may send: tokens, Origin check, rate limit, field checks.

Presenter tokens map to an identity allow list; viewer tokens to a room allow list (a
viewer may watch those rooms, never present or send controls). Two sources each, merged
(the config file wins on clashes):

    AVATAR_TOKENS="tokenA:demo,alice;tokenB:*"      token ':' comma-separated names or '*'
    --config server.json  {"tokens": {"tokenA": ["demo", "alice"], "tokenB": "*"}}
    AVATAR_VIEWER_TOKENS="v1:main,lobby"            --config {"viewer_tokens": {"v1": ["main"]}}

With no token at all the server runs in localhost-only demo mode: any client is accepted
and sees every identity, and app.py refuses to bind a non-loopback address.
"""
from __future__ import annotations

import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from engines.identity import NAME_RE, IdentityError, check_name
from engines.render.frame import parse_frame_size

ALL = "*"  # allow list meaning "every identity in the store" (or every room)


class ConfigError(ValueError):
    """The server configuration is invalid; the message says why."""


def check_room(name: object) -> str:
    """A room name: the same rules as an identity name. ValueError says what is wrong."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid room name {str(name)[:70]!r}: use 1-63 lowercase letters, digits, "
                         "'-' or '_', starting with a letter or digit")
    return name


MAX_CALL_FRAME = (1920, 1080)  # the largest call frame a client may ask a session to send


def check_call_frame(text: object) -> tuple[int, int]:
    """A client's call frame ("1280x720"): (width, height). ValueError says what is wrong."""
    if not isinstance(text, str):
        raise ValueError("frame must be a string such as \"1280x720\"")
    return parse_frame_size(text, MAX_CALL_FRAME)


def _check_identity(name: object) -> str:
    try:
        return check_name(name)
    except IdentityError as e:
        raise ValueError(str(e))


def _allow_list(value: object, where: str, check=_check_identity) -> frozenset[str] | str:
    if value == ALL:
        return ALL
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected '*' or a non-empty list of names")
    names = []
    for name in value:
        name = name.strip() if isinstance(name, str) else name
        try:
            names.append(check(name))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}")
    return frozenset(names)


def _check_token(token: object, where: str) -> str:
    if not isinstance(token, str) or not token or any(c in token for c in " \t\r\n:;,"):
        raise ConfigError(f"{where}: a token must be a non-empty string without spaces, ':', ';' or ','")
    return token


def parse_tokens_env(text: str, variable: str = "AVATAR_TOKENS", rooms: bool = False
                     ) -> dict[str, frozenset[str] | str]:
    """'tokenA:demo,alice;tokenB:*' -> {'tokenA': {'demo', 'alice'}, 'tokenB': '*'}
    (names are identities, or rooms for viewer tokens)."""
    tokens: dict[str, frozenset[str] | str] = {}
    for i, entry in enumerate(e.strip() for e in text.split(";")):
        if not entry:
            continue
        token, sep, names = entry.partition(":")
        where = f"{variable} entry {i + 1}"
        if not sep:
            raise ConfigError(f"{where}: expected 'token:names' (names: 'a,b' or '*')")
        tokens[_check_token(token.strip(), where)] = _allow_list(
            names.strip(), where, check_room if rooms else _check_identity)
    return tokens


def parse_tokens_json(value: object, key: str = "tokens", rooms: bool = False
                      ) -> dict[str, frozenset[str] | str]:
    if not isinstance(value, dict):
        raise ConfigError(f"config '{key}' must be an object {{token: '*' | [names]}}")
    return {_check_token(t, f"config {key}"): _allow_list(v, f"config {key}[{t[:4]}...]",
                                                          check_room if rooms else _check_identity)
            for t, v in value.items()}


def _lookup(table: list, token: object):
    """The value for a token, compared against every entry in constant time, or None."""
    if not isinstance(token, str) or len(token) > 512:
        return None
    given = token.encode("utf-8", "replace")
    found = None
    # Compare against every token, without an early exit, so timing says nothing.
    for known, value in table:
        if hmac.compare_digest(given, known):
            found = value
    return found


class TokenAuth:
    """Presenter token -> allowed identities; viewer token -> rooms it may watch."""

    def __init__(self, tokens: dict[str, frozenset[str] | str], viewer_tokens: dict | None = None):
        self._tokens = [(t.encode(), allow) for t, allow in tokens.items()]
        self._viewers = [(t.encode(), rooms) for t, rooms in (viewer_tokens or {}).items()]

    @property
    def demo_mode(self) -> bool:
        return not self._tokens and not self._viewers

    def allowed(self, token: object) -> frozenset[str] | str | None:
        """A presenter token's identity allow list, or None (invalid, or a viewer token)."""
        return ALL if self.demo_mode else _lookup(self._tokens, token)

    def rooms(self, token: object) -> frozenset[str] | str | None:
        """The rooms a token may watch: every room for a presenter token, its list for a
        viewer token, None for anything else."""
        if self.allowed(token) is not None:
            return ALL
        return _lookup(self._viewers, token)

    def role(self, token: object) -> str | None:
        """'presenter', 'viewer' or None."""
        if self.allowed(token) is not None:
            return "presenter"
        return "viewer" if _lookup(self._viewers, token) is not None else None


def identity_allowed(allow: frozenset[str] | str, name: str) -> bool:
    return allow == ALL or name in allow


room_allowed = identity_allowed  # the same rule for a room allow list


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer T` header value (the scheme is case-insensitive,
    RFC 7235), or None."""
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, demo_mode: bool, allowed: list[str]) -> bool:
    """The Host a request names. In demo mode only loopback names (a page on another name
    reaching a localhost server is what DNS rebinding looks like); with tokens, the
    configured names, or any when none are configured."""
    if not host_header:
        return False
    if demo_mode:
        try:
            hostname = urlsplit(f"//{host_header}").hostname
        except ValueError:
            return False
        return hostname is not None and is_loopback(hostname)
    return not allowed or host_header.lower() in (a.lower() for a in allowed)


EXTENSION_SCHEMES = ("chrome-extension", "moz-extension", "safari-web-extension")


def origin_allowed(origin: str | None, host_header: str | None, extra: list[str],
                   demo_mode: bool = False) -> bool:
    """Browsers send Origin on a WebSocket handshake and a cross-site request; other clients
    may not. Accept no Origin, the page's own host, an explicitly configured origin, a browser
    extension (the user installed it and gave it this server: not a web page, like any other
    client it needs a token), and in demo mode (loopback only) a page served from loopback,
    e.g. another local port."""
    if origin is None:
        return True
    if origin in extra:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme in EXTENSION_SCHEMES and parts.netloc:
        return True
    if demo_mode and parts.scheme in ("http", "https") and parts.hostname and is_loopback(parts.hostname):
        return True
    return bool(host_header) and parts.netloc.lower() == host_header.lower()


class RateLimiter:
    """Token bucket: `rate` messages a second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = float(burst)
        self.last = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.last) * self.rate)
        self.last = now

    def allow(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self.level >= 1:
            self.level -= 1
            return True
        return False

    def empty(self) -> bool:
        """No token left, without taking one."""
        self._refill()
        return self.level < 1


def is_number(value: object) -> bool:
    """A finite JSON number. Not a bool, NaN or infinity, nor an integer too large for a
    float (JSON allows 400 digits; math.isfinite would raise OverflowError on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


FINGERPRINT_ALGORITHMS = {"sha-1", "sha-224", "sha-256", "sha-384", "sha-512"}  # RFC 8122
MAX_MEDIA_SECTIONS = {"video": 1, "audio": 1, "application": 1}


def check_offer_sdp(sdp: str, max_candidates: int, role: str | None = None) -> None:
    """ValueError (with a message for the client) for an offer the server will not try, so
    nothing is admitted, forked or recorded for it: not parseable SDP, no media section, more
    m-lines of a kind than a session uses, a BUNDLE group naming a mid no section has, a
    section without ICE credentials or a DTLS fingerprint (or an unknown fingerprint hash),
    more ICE candidates than max_candidates (each costs STUN checks). With `role`, also what
    that peer must offer: a presenter sends video, a viewer only receives."""
    counts: dict[str, int] = {}
    candidates = 0
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
            if kind not in MAX_MEDIA_SECTIONS:
                raise ValueError(f"unsupported media section {kind[:20]!r}")
            if counts[kind] > MAX_MEDIA_SECTIONS[kind]:
                raise ValueError(f"at most {MAX_MEDIA_SECTIONS[kind]} {kind} section(s) per offer")
        elif line.startswith("a=fingerprint:"):
            algorithm = line[len("a=fingerprint:"):].split(" ", 1)[0].lower()
            if algorithm not in FINGERPRINT_ALGORITHMS:
                raise ValueError(f"unsupported DTLS fingerprint algorithm {algorithm[:20]!r}")
        elif line.startswith("a=candidate:"):
            candidates += 1
            if candidates > max_candidates:
                raise ValueError(f"at most {max_candidates} ICE candidates per offer")
    if not counts:
        raise ValueError("the offer has no media section")
    _check_parsed(_parse_sdp(sdp))
    if role == "presenter" and "video" not in sending_media(sdp):
        raise ValueError("a presenter's offer must send video (the camera)")
    if role == "viewer" and (only := sending_media(sdp, only=True)):
        raise ValueError(f"a viewer receives: offer {' and '.join(only)} as recvonly or sendrecv")


def _parse_sdp(sdp: str):
    from aiortc.sdp import SessionDescription

    try:
        return SessionDescription.parse(sdp)
    except Exception as e:  # the parser raises what it meets: IndexError, KeyError, ValueError...
        raise ValueError(f"unparseable SDP ({type(e).__name__})") from None


def _check_parsed(description) -> None:
    """What aiortc assumes of a parsed offer and fails on, half set up, when it is missing."""
    mids = [m.rtp.muxId for m in description.media]
    for media in description.media:
        if not media.ice.usernameFragment or not media.ice.password:
            raise ValueError(f"the {media.kind} section has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
        if media.dtls is None or not media.dtls.fingerprints:
            raise ValueError(f"the {media.kind} section has no DTLS fingerprint (a=fingerprint)")
    for group in description.group:
        if group.semantic == "BUNDLE":
            missing = [m for m in group.items if m not in mids]
            if missing:
                raise ValueError(f"the BUNDLE group names mid {str(missing[0])[:20]!r}, which no media section has")


def sending_media(sdp: str, only: bool = False) -> list[str]:
    """The media kinds an offer wants to send (sendrecv or sendonly; sendrecv when unsaid), or
    with `only`, wants only to send (sendonly)."""
    sending = ("sendonly",) if only else ("sendrecv", "sendonly", None)
    kinds, kind, direction = [], None, None
    for line in sdp.splitlines() + ["m=end"]:
        if line.startswith("m="):
            if kind in ("audio", "video") and direction in sending:
                kinds.append(kind)
            kind, direction = line[2:].split(" ", 1)[0], None
        elif line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive") and line.startswith("a="):
            direction = line[2:]
    return kinds


class AddressLimits:
    """Limits per client address, so reconnecting does not reset them: how many connections
    may wait unauthenticated, how many messages per second all its connections may send,
    and how fast it may try wrong tokens. Remembers at most `capacity` addresses (least recently
    seen forgotten first), so a flood of addresses cannot grow memory."""

    def __init__(self, max_pending: int, rate: float, burst: int, auth_rate: float, auth_burst: int,
                 capacity: int = 4096, clock=time.monotonic):
        self.max_pending = max_pending
        self._limits = (rate, burst, auth_rate, auth_burst)
        self._clock = clock
        self._capacity = capacity
        self._entries: OrderedDict[str, dict] = OrderedDict()

    def _entry(self, address: str) -> dict:
        entry = self._entries.get(address)
        if entry is None:
            rate, burst, auth_rate, auth_burst = self._limits
            entry = {"pending": 0, "messages": RateLimiter(rate, burst, self._clock),
                     "auth": RateLimiter(auth_rate, auth_burst, self._clock)}
            self._entries[address] = entry
            self._forget_old()
        self._entries.move_to_end(address)
        return entry

    def _forget_old(self) -> None:
        # Never forget an address that holds pending connections: its count must come back down.
        for address in list(self._entries):
            if len(self._entries) <= self._capacity:
                return
            if self._entries[address]["pending"] == 0:
                del self._entries[address]

    def open_pending(self, address: str) -> bool:
        """Count a new unauthenticated connection; False if the address has too many."""
        entry = self._entry(address)
        if entry["pending"] >= self.max_pending:
            return False
        entry["pending"] += 1
        return True

    def close_pending(self, address: str) -> None:
        """The connection authenticated or ended."""
        entry = self._entries.get(address)
        if entry is not None and entry["pending"] > 0:
            entry["pending"] -= 1

    def allow_message(self, address: str) -> bool:
        return self._entry(address)["messages"].allow()

    def auth_blocked(self, address: str) -> bool:
        """Too many failed hellos lately: do not even look at the token."""
        return self._entry(address)["auth"].empty()

    def auth_failed(self, address: str) -> None:
        self._entry(address)["auth"].allow()