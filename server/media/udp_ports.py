"""Keep WebRTC's UDP sockets inside a configured port range (for firewalls).

aiortc's ICE layer (aioice) binds every host candidate to port 0, i.e. any ephemeral port,
and offers no setting. The server's event loop is the only place those binds pass
through, so the range is applied there: a UDP bind to port 0 tries the range's ports, in
random order, instead.
"""
from __future__ import annotations

import asyncio
import random


def parse_range(text: str) -> tuple[int, int]:
    """'40000-40100' -> (40000, 40100), with a clear error for anything else."""
    low, sep, high = str(text).partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo = hi = -1
    if not sep or not (1024 <= lo <= hi <= 65535):
        raise ValueError(f"UDP port range must look like 40000-40100 within 1024-65535, got {text!r}")
    return lo, hi


def confine_udp_ports(loop: asyncio.AbstractEventLoop, ports: tuple[int, int]):
    """Make loop's UDP binds to port 0 use a free port in `ports` (inclusive).
    Returns a function that undoes it."""
    lo, hi = ports
    original = loop.create_datagram_endpoint

    async def create_datagram_endpoint(protocol_factory, local_addr=None, **kwargs):
        if not local_addr or local_addr[1] != 0:
            return await original(protocol_factory, local_addr=local_addr, **kwargs)
        candidates = list(range(lo, hi + 1))
        random.shuffle(candidates)
        for port in candidates:
            try:
                return await original(protocol_factory, local_addr=(local_addr[0], port), **kwargs)
            except OSError:
                continue  # in use: try the next
        raise OSError(f"no free UDP port in {lo}-{hi} for {local_addr[0]}")

    loop.create_datagram_endpoint = create_datagram_endpoint
    return lambda: vars(loop).pop("create_datagram_endpoint", None)
