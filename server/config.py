"""Server settings, declared once.

Each ServerConfig field says, in its metadata, its help text and bounds; from that follow
the `avatar serve` flags (`--idle-timeout`), the JSON config-file keys (`idle_timeout`),
their type checks and validation. A new setting is one new field.

Precedence: defaults < config file < AVATAR_TOKENS / AVATAR_VIEWER_TOKENS (tokens only) < flags
that were given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from engines.identity import identities_dir
from engines.neural.config import PRESETS
from .security import ConfigError, parse_tokens_env, parse_tokens_json
from .media.stages import check_kind as check_compute
from .media.udp_ports import parse_range
from .cluster.node import check_advertise_url
from .cluster.redis_url import check_redis_url

# libvpx's realtime speeds (cpu-used) for --vp8-speed (server/media/vp8.py): 16 is its fastest; 6
# is aiortc's own, denoiser included; 10 measured 0.67x of aiortc's encode time at +0.8 dB.
VP8_SPEED_DEFAULT, VP8_SPEED_MIN, VP8_SPEED_MAX, VP8_SPEED_AIORTC = 10, 4, 16, 6


def default_max_sessions() -> int:
    # One session keeps roughly one core busy at 30 fps; more would starve them all.
    return max(1, os.cpu_count() or 1)


def setting(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING,
            minimum=None, maximum=None, positive: bool = False, flag: str | None = "",
            repeat: str | None = None, metavar: str | None = None, default_text: str | None = None, check=None):
    """A ServerConfig field. flag=None: no command-line flag (config file only); repeat: the
    flag is given once per list item under that singular name; check(value) may raise ValueError."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "positive": positive, "flag": flag,
            "repeat": repeat, "metavar": metavar, "default_text": default_text, "check": check}
    return field(default=default, default_factory=factory, metadata=meta)


def check_output_size(side: int) -> None:
    if side % 16:
        raise ValueError(f"the output size must be a multiple of 16 (whole VP8 blocks), got {side}")


def check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown enrollment preset {name!r} (use {', '.join(PRESETS)})")


@dataclass
class ServerConfig:
    host: str = setting("127.0.0.1", "address to bind; without tokens only a loopback address is allowed")
    port: int = setting(8080, "port (0 = any free)", minimum=0, maximum=65535)
    cert: str | None = setting(None, "TLS certificate (PEM); serves https/wss with --key", metavar="PEM")
    key: str | None = setting(None, "TLS private key (PEM)", metavar="PEM")
    origins: list[str] = setting(help="a page origin on another site that may use this server, e.g. "
                                      "https://meet.example.org: its WebSocket handshakes, and CORS on WHIP, "
                                      "WHEP, /identities and /rooms (demo mode also allows loopback pages)",
                                 factory=list, repeat="origin", metavar="URL")
    hosts: list[str] = setting(help="Host header names clients may use, e.g. avatar.example.org:8443 "
                                    "(default: any with tokens; loopback names only in demo mode)",
                               factory=list, repeat="allowed-host", metavar="HOST")
    metrics_public: bool = setting(False, "serve /metrics to any client; by default only to loopback clients "
                                          "or with a valid token")
    max_sessions: int = setting(help="concurrent sessions before new ones get 'busy'", factory=default_max_sessions,
                                minimum=1, default_text="the CPU count", metavar="N")
    idle_timeout: float = setting(30.0, "seconds without messages or camera frames before a session ends",
                                  positive=True, metavar="SECONDS")
    drain_timeout: float = setting(30.0, "seconds running sessions get to end after SIGTERM or `avatar drain` "
                                         "before they are told to connect again (elsewhere, with --cluster)",
                                   positive=True, metavar="SECONDS")
    hello_timeout: float = setting(10.0, "seconds a new connection has to say hello", positive=True,
                                   metavar="SECONDS")
    connect_timeout: float = setting(15.0, "seconds a presenter or viewer has, from its answer, to connect "
                                           "(ICE and DTLS) before it is ended and its slot freed",
                                     positive=True, metavar="SECONDS")
    header_timeout: float = setting(15.0, "seconds an HTTP client has to send a request's headers, and an "
                                          "idle keep-alive connection stays open", positive=True, metavar="SECONDS")
    body_timeout: float = setting(10.0, "seconds an HTTP client has to send an SDP offer's body",
                                  positive=True, metavar="SECONDS")
    max_message: int = setting(64 * 1024, "bytes per signaling message", minimum=256, metavar="BYTES")
    max_sdp: int = setting(32 * 1024, "bytes per SDP offer", minimum=256, metavar="BYTES")
    max_candidates: int = setting(32, "ICE candidates per offer (each costs the server STUN checks)",
                                  minimum=1, metavar="N")
    rate: float = setting(20.0, "signaling messages per second per connection, sustained", positive=True,
                          metavar="PER_S")
    burst: int = setting(40, "signaling messages per connection allowed in a burst", minimum=1, metavar="N")
    max_pending: int = setting(256, "connections that have not said hello yet, in all", minimum=1, metavar="N")
    max_pending_per_address: int = setting(8, "connections that have not said hello yet, per client address",
                                           minimum=1, metavar="N")
    address_rate: float = setting(40.0, "signaling messages per second per client address, all its "
                                        "connections together", positive=True, metavar="PER_S")
    address_burst: int = setting(80, "signaling messages per client address allowed in a burst", minimum=1,
                                 metavar="N")
    auth_rate: float = setting(1.0, "failed hellos per second per client address (token guessing)",
                               positive=True, metavar="PER_S")
    auth_burst: int = setting(10, "failed hellos per client address allowed in a burst", minimum=1,
                              metavar="N")
    marker_completion: bool = setting(True, "hand received video frames to the decoder on their RTP marker "
                                            "bit (server/media/jitter.py); --no-marker-completion waits for the next "
                                            "frame, as aiortc does (one frame interval later)")
    compute: str = setting("process", "where each session's frames are computed: process (a process of its own, "
                                      "forked from a preloaded one: every core is usable, sessions do not wait "
                                      "for each other's Python, and a crash there ends only that session) or "
                                      "thread (two threads of the server's own process: less memory)",
                           metavar="KIND", check=check_compute)
    opencv_threads: int = setting(0, "threads OpenCV may use inside one image operation (0: its default, "
                                     "one per core); 1 leaves the cores to the sessions' own workers",
                                  minimum=0, maximum=64, metavar="N")
    vp8_speed: int = setting(VP8_SPEED_DEFAULT, "libvpx speed (cpu-used) of the VP8 this server sends, with "
                                                "its denoiser off: rendered frames have no sensor noise "
                                                f"(server/media/vp8.py); {VP8_SPEED_AIORTC} keeps aiortc's own settings "
                                                "(its speed, denoiser on); higher is faster",
                             minimum=VP8_SPEED_MIN, maximum=VP8_SPEED_MAX, metavar="N")
    output_size: int = setting(512, "largest side of the avatar a session renders and sends: a photo identity "
                                    "made larger is scaled down to it (256 fits more sessions on a machine); "
                                    "smaller ones and enrolled ones keep their own size", minimum=128,
                               maximum=1024, metavar="PX", check=check_output_size)
    max_viewers: int = setting(16, "viewers (browser pages and WHEP players) in all rooms together, "
                                   "separate from --max-sessions: a viewer costs an encode, not a model",
                               minimum=0, metavar="N")
    max_viewers_per_room: int = setting(8, "viewers per room", minimum=1, metavar="N")
    audio_delay: float = setting(0.0, "extra milliseconds the presenter's audio is held on top of the "
                                      "measured avatar latency (calibration for A/V sync; negative: less)",
                                 minimum=-200, maximum=500, metavar="MS")
    voice_lookahead: float = setting(0.06, "seconds of speech recognized before the frame showing it is made, "
                                           "where the voice drives the face (voice agents, a presenter's camera "
                                           "off): more gives steadier lips, later (docs/BENCHMARKS.md)",
                                     minimum=0.0, maximum=1.0, metavar="SECONDS")
    janus_url: str | None = setting(None, "publish every live room into this Janus VideoRoom HTTP API, e.g. "
                                          "http://127.0.0.1:8088/janus (docs/SFU.md); viewers then watch "
                                          "through Janus", metavar="URL")
    janus_admin_key: str | None = setting(None, "the VideoRoom admin_key, needed to create rooms in Janus",
                                          metavar="KEY")
    stats_interval: float = setting(1.0, "seconds between stats messages to the client", positive=True,
                                    metavar="SECONDS")
    ice_servers: list[str] = setting(help="STUN/TURN URL for the server side (default: none, host candidates only)",
                                     factory=list, repeat="ice-server", metavar="URL")
    udp_ports: str | None = setting(None, "UDP port range for WebRTC media, e.g. 40000-40100 (default: any)",
                                    metavar="MIN-MAX", check=parse_range)
    audit_retention_days: int = setting(0, "days the audit log (<home>/audit.db, `avatar audit`) keeps a use "
                                           "after it ended; 0 keeps every use forever", minimum=0, metavar="DAYS")
    browser_enrollment: bool | None = setting(None, "enroll new identities from the browser (/enroll.html: a webcam "
                                                    "self-scan, consent, training on this server)",
                                              default_text="on in demo mode, off with tokens")
    enroll_preset: str = setting("quick", "training preset of browser enrollments: " + ", ".join(PRESETS),
                                 metavar="PRESET", check=check_preset)
    enroll_steps: int | None = setting(None, "training steps of browser enrollments (default: the preset's)",
                                       minimum=1, metavar="N")
    enroll_max_bytes: int = setting(200 * 2**20, "bytes per uploaded self-scan recording", minimum=2**20,
                                    metavar="BYTES")
    enroll_queue: int = setting(4, "browser enrollments waiting behind the one in training; more get 503",
                                minimum=1, maximum=100, metavar="N")
    enroll_threads: int = setting(1, "CPU threads of the training process (it also runs at a lower priority, "
                                     "so live sessions come first)", minimum=1, maximum=64, metavar="N")
    enroll_max_memory: int = setting(4 * 2**30, "bytes of memory the training process may take (RLIMIT_DATA); "
                                                "past it the job fails 'out of memory'", minimum=2**30, metavar="BYTES")
    enroll_min_rate: int = setting(64 * 2**10, "bytes per second an enrollment upload must average once "
                                               "--enroll-idle-timeout has passed; a slower one is closed (408)",
                                   minimum=1, metavar="BYTES")
    enroll_idle_timeout: float = setting(10.0, "seconds an enrollment upload may send nothing (408 after)",
                                         positive=True, metavar="SECONDS")
    enroll_uploads_per_address: int = setting(2, "enrollment uploads one client address may send at once; "
                                                 "more get 429", minimum=1, maximum=100, metavar="N")
    cluster: str | None = setting(None, "join a cluster of avatar servers through this Redis, "
                                        "redis://[:PASSWORD@]HOST:6379/0 (rediss://...?ssl_ca_certs=CA.pem for "
                                        "TLS, redis+sentinel://[:PASSWORD@]S1:26379,S2:26379/SERVICE/0 for "
                                        "Sentinel): presenters are placed on the least-loaded node and "
                                        "redirected there (docs/CLUSTER.md)",
                                  metavar="REDIS_URL", check=check_redis_url)
    advertise_url: str | None = setting(None, "with --cluster: this node's base URL as clients reach it, "
                                              "e.g. https://node1.example.org:8443/ (redirects point there)",
                                        metavar="URL", check=check_advertise_url)
    cluster_allow: list[str] = setting(help="with --cluster: a URL prefix other nodes' advertised URLs must start "
                                            "with before any client is redirected to them, e.g. "
                                            "https://node (a poisoned registry entry sends no one elsewhere)",
                                       factory=list, repeat="cluster-allow", metavar="URL_PREFIX")
    # Set by the top-level --home flag; the config file may name a folder too.
    identities_root: Path | None = setting(None, "identities folder (default: $AVATAR_HOME/identities)",
                                           flag=None)
    # Not settings: filled in by code (tokens from AVATAR_TOKENS or the file's "tokens").
    tokens: dict = field(default_factory=dict, metadata={"internal": True})  # token -> names | "*"
    viewer_tokens: dict = field(default_factory=dict, metadata={"internal": True})  # token -> rooms | "*"

    def validate(self) -> "ServerConfig":
        for f in settings():
            value = getattr(self, f.name)
            if value is None:
                continue
            m = f.metadata
            low, high = m["minimum"], m["maximum"]
            if (low is not None and value < low) or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f"at least {low}"
                raise ConfigError(f"{_flag_name(f)} must be {bound}, got {value}")
            if m["positive"] and not value > 0:
                raise ConfigError(f"{_flag_name(f)} must be positive, got {value}")
            if m["check"] is not None:
                try:
                    m["check"](value)
                except ValueError as e:
                    raise ConfigError(str(e))
        if self.cluster:
            if not self.advertise_url:
                raise ConfigError("--cluster needs --advertise-url: the URL other nodes send presenters to")
            if not self.cluster_allow:
                raise ConfigError("--cluster needs at least one --cluster-allow URL prefix: the only places "
                                  "presenters may be redirected to")
            if not any(check_advertise_url(self.advertise_url).startswith(p) for p in self.cluster_allow):
                raise ConfigError(f"--advertise-url {self.advertise_url} matches no --cluster-allow prefix")
        elif self.advertise_url or self.cluster_allow:
            raise ConfigError("--advertise-url and --cluster-allow go with --cluster")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--cert and --key go together")
        return self


def settings() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ServerConfig) if not f.metadata.get("internal")]


def _flag_name(f: dataclasses.Field) -> str:
    return f.name.replace("_", "-")


_TYPES = typing.get_type_hints(ServerConfig)


def _base_type(f: dataclasses.Field):
    """str, int, float, bool, list or Path: what a field holds (None aside)."""
    t = _TYPES[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is list:
        return list
    return args[0] if args else t


def _from_json(f: dataclasses.Field, value, where: str):
    """The file's value for a field, type-checked (bool is not a number; an int is a float)."""
    kind = _base_type(f)
    ok = {str: isinstance(value, str), Path: isinstance(value, str), bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          list: isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        raise ConfigError(f"{where}: '{f.name}' has the wrong type (expected {kind.__name__})")
    return Path(value) if kind is Path else value


def load_config(path: str | None, env: dict | None = None, **overrides) -> ServerConfig:
    """File settings, then AVATAR_TOKENS, then explicit overrides (flags that were given)."""
    env = os.environ if env is None else env
    fields = {f.name: f for f in settings()}
    values: dict = {}
    tokens: dict = {}
    viewer_tokens: dict = {}
    if env.get("AVATAR_TOKENS"):
        tokens.update(parse_tokens_env(env["AVATAR_TOKENS"]))
    if env.get("AVATAR_VIEWER_TOKENS"):
        viewer_tokens.update(parse_tokens_env(env["AVATAR_VIEWER_TOKENS"], "AVATAR_VIEWER_TOKENS", rooms=True))
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read JSON config ({e})")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        for key, value in data.items():
            if key == "tokens":
                tokens.update(parse_tokens_json(value))
            elif key == "viewer_tokens":
                viewer_tokens.update(parse_tokens_json(value, key, rooms=True))
            elif key in fields:
                values[key] = _from_json(fields[key], value, path)
            else:
                raise ConfigError(f"{path}: unknown key '{key}' (known: tokens, viewer_tokens, {', '.join(fields)})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServerConfig(tokens=tokens, viewer_tokens=viewer_tokens, **values).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (help and default from the field), plus --config."""
    parser.add_argument("--config", help="JSON config file: tokens and any setting below by its "
                                         "name with underscores, e.g. {\"idle_timeout\": 20} (docs/PROTOCOL.md)")
    defaults = ServerConfig()
    for f in settings():
        m = f.metadata
        if m["flag"] is None:
            continue
        kind = _base_type(f)
        default = m["default_text"] or getattr(defaults, f.name)
        help_text = m["help"] if kind is list or default is None or "(default" in m["help"] \
            else f"{m['help']} (default: {default})"
        if kind is list:
            parser.add_argument(f"--{m['repeat']}", dest=f.name, action="append", default=None,
                                help=help_text + " (repeatable)", metavar=m["metavar"])
        elif kind is bool:
            parser.add_argument(f"--{_flag_name(f)}", dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(f"--{_flag_name(f)}", dest=f.name, type=kind, default=None,
                                help=help_text, metavar=m["metavar"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The settings from parsed `add_arguments` flags; the top-level --home, when given,
    beats the config file's identities_root."""
    given = {f.name: getattr(args, f.name, None) for f in settings() if f.metadata["flag"] is not None}
    home = getattr(args, "home", None)
    return load_config(getattr(args, "config", None), identities_root=identities_dir(home) if home else None,
                       **given)
