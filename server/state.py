"""What every connection of one server shares: settings, identities, auth, metrics, the
live sessions, and admission (how many compute-heavy sessions may run at once)."""
from __future__ import annotations

from engines.identity import DEFAULT_IDENTITY, IdentityStore, identities_dir
from .config import ServerConfig
from .security import AddressLimits, TokenAuth, identity_allowed
from .telemetry import Metrics


class ServerState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = IdentityStore(config.identities_root or identities_dir())
        self.auth = TokenAuth(config.tokens)
        self.metrics = Metrics()
        self.sessions: dict = {}  # id -> Session
        self.addresses = AddressLimits(config.max_pending_per_address, config.address_rate, config.address_burst,
                                       config.auth_rate, config.auth_burst)
        self.pending = 0  # connections that have not said hello yet

    def visible_identities(self, allow) -> list[str]:
        names = set(self.store.names()) | {DEFAULT_IDENTITY}
        return sorted(n for n in names if identity_allowed(allow, n))

    # ---- admission: check and reserve with no await in between ---------------------------
    def admit(self) -> bool:
        """Reserve a session slot; False when the server is at max_sessions."""
        if self.metrics.sessions_active >= self.config.max_sessions:
            return False
        self.metrics.sessions_active += 1
        self.metrics.sessions_total += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by admit()."""
        self.metrics.sessions_active -= 1

    # ---- connections before hello: bounded in all and per address ----------------------
    def open_pending(self, address: str) -> bool:
        """Count a connection that has not said hello; False when over either bound."""
        if self.pending >= self.config.max_pending or not self.addresses.open_pending(address):
            return False
        self.pending += 1
        return True

    def close_pending(self, address: str) -> None:
        self.pending -= 1
        self.addresses.close_pending(address)
