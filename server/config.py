"""Server settings (flags + optional JSON config file + env) and the shared server state."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from engines.identity import DEFAULT_IDENTITY, IdentityStore, identities_dir
from .security import (ConfigError, TokenAuth, identity_allowed, parse_tokens_env,
                       parse_tokens_json)
from .telemetry import Metrics
from .udp_ports import parse_range

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def default_max_sessions() -> int:
    # One session keeps roughly one core busy at 30 fps; more would starve them all.
    return max(1, os.cpu_count() or 1)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    cert: str | None = None
    key: str | None = None
    tokens: dict = field(default_factory=dict)  # token -> frozenset of names | "*"
    origins: list[str] = field(default_factory=list)  # extra allowed WebSocket Origins
    max_sessions: int = field(default_factory=default_max_sessions)
    idle_timeout: float = 30.0  # seconds without messages or camera frames
    hello_timeout: float = 10.0  # seconds to say hello after connecting
    max_message: int = 64 * 1024  # bytes per signaling message
    max_sdp: int = 32 * 1024
    rate: float = 20.0  # signaling messages per second, sustained
    burst: int = 40
    stats_interval: float = 1.0
    ice_servers: list[str] = field(default_factory=list)  # e.g. ["stun:stun.example.org:3478"]
    udp_ports: str | None = None  # e.g. "40000-40100": WebRTC media ports; default any
    identities_root: Path | None = None  # default: $AVATAR_HOME/identities
    web_dir: Path = WEB_DIR

    def validate(self) -> "ServerConfig":
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.max_sessions < 1:
            raise ConfigError(f"max-sessions must be at least 1, got {self.max_sessions}")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--cert and --key go together")
        if self.udp_ports is not None:
            try:
                parse_range(self.udp_ports)
            except ValueError as e:
                raise ConfigError(str(e))
        for name in ("idle_timeout", "hello_timeout", "rate", "stats_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        return self


# JSON config keys that map straight onto ServerConfig fields.
_JSON_KEYS = {"host": str, "port": int, "cert": str, "key": str, "origins": list,
              "max_sessions": int, "idle_timeout": (int, float), "rate": (int, float),
              "burst": int, "ice_servers": list, "identities_root": str, "udp_ports": str}


def load_config(path: str | None, env: dict | None = None, **overrides) -> ServerConfig:
    """File settings, then AVATAR_TOKENS, then explicit overrides (flags that were given)."""
    env = os.environ if env is None else env
    values: dict = {}
    tokens: dict = {}
    if env.get("AVATAR_TOKENS"):
        tokens.update(parse_tokens_env(env["AVATAR_TOKENS"]))
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
            elif key in _JSON_KEYS:
                if not isinstance(value, _JSON_KEYS[key]) or isinstance(value, bool):
                    raise ConfigError(f"{path}: '{key}' has the wrong type")
                values[key] = value
            else:
                raise ConfigError(f"{path}: unknown key '{key}'")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "identities_root" in values:
        values["identities_root"] = Path(values["identities_root"])
    return ServerConfig(tokens=tokens, **values).validate()


class ServerState:
    """What every connection shares: config, identities, auth, metrics, live sessions."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = IdentityStore(config.identities_root or identities_dir())
        self.auth = TokenAuth(config.tokens)
        self.metrics = Metrics()
        self.sessions: dict = {}  # id -> Session

    def visible_identities(self, allow) -> list[str]:
        names = set(self.store.names()) | {DEFAULT_IDENTITY}
        return sorted(n for n in names if identity_allowed(allow, n))
