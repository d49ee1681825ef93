"""What a measured run means: per-session results, their summary, drift and B/A ratios.

Percentiles come from engines/measure.py and stage names from server/telemetry.py, so the
bench's figures mean what the server's own telemetry and `avatar bench engines` mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engines.measure import percentiles
from server.telemetry import COMPUTE_STAGES, STAGES

# Where a frame's glass-to-glass time goes, in order; per frame they add up to it exactly.
# Transit figures compare the client's clock with the server's: only meaningful on one
# machine (the local server), so they are left out for --url.
CHAIN = ("client_encode", "transit_server_decode", "queue", *COMPUTE_STAGES, "server_encode_send",
         "transit_client_decode")

from .client import AvatarClient, ClipTrack, nearest


@dataclass
class SessionResult:
    config: str
    session: int
    sent: int = 0
    received: int = 0
    matched: int = 0
    latencies_ms: list = field(default_factory=list)  # (send time offset s, latency ms)
    arrivals: list = field(default_factory=list)  # receive times (s from start)
    server_stages: dict = field(default_factory=dict)  # stage -> list of per-second p50
    chain: list = field(default_factory=list)  # per matched frame: CHAIN part -> ms
    client_cpu_percent: float | None = None  # the bench process's CPU per session, % of a core
    server_cpu_percent: float | None = None  # a local server's CPU per session, % of a core
    machine_cpu_percent: dict | None = None  # the whole machine's {"busy", "steal"}, % of a core
    landed: str | None = None  # the server (signaling URL) the session ended up on
    redirects: int = 0  # cluster redirects its hello followed
    connect_ms: float | None = None  # connect + hello (+ redirects) + offer/answer
    error: str | None = None


def frame_chain(sent: float, left: float | None, server: dict | None, received: float) -> dict | None:
    """One frame's glass-to-glass split into CHAIN parts (ms), or None if a time is missing.
    sent/left: the client handed the camera frame to its encoder / its packets were out;
    server: the server's report of that frame (its recv, done and sent times, stage ms)."""
    if left is None or not server or "sent" not in server or not server.get("stages"):
        return None
    ms = lambda a, b: (b - a) * 1e3  # noqa: E731
    chain = {"client_encode": ms(sent, left), "transit_server_decode": ms(left, server["recv"])}
    for stage in ("queue", *COMPUTE_STAGES):
        chain[stage] = server["stages"].get(stage, 0.0)
    # The server's queue is defined as its total minus compute, so its parts add up too.
    chain["server_encode_send"] = ms(server["done"], server["sent"])
    chain["transit_client_decode"] = ms(server["sent"], received)
    return chain


def analyse(label: str, index: int, client: AvatarClient, track: ClipTrack, t0: float,
            t1: float, same_clock: bool = True) -> SessionResult:
    """The session's frames sent from t0 (after warmup) to t1 (the end of the measured time);
    with same_clock (a local server), each frame's CHAIN too."""
    res = SessionResult(label, index)
    reports = client.server_reports() if same_clock else {}
    sent = {p: t for p, t in track.sent_at.items() if t0 <= t < t1}
    res.sent = len(sent)
    res.received = sum(1 for _, t, _ in client.received if t0 <= t < t1)
    matched = client.matched()
    sent_pts = nearest(list(sent), [p for p, _ in matched]) if sent else []
    for pts, (server_pts, recv_t) in zip(sent_pts, matched):
        if pts is not None:
            res.matched += 1
            res.latencies_ms.append((round(sent[pts] - t0, 3), round((recv_t - sent[pts]) * 1e3, 2)))
            res.arrivals.append(recv_t - t0)
            chain = frame_chain(sent[pts], track.left_at.get(pts), reports.get(server_pts), recv_t)
            if chain is not None:
                res.chain.append({**chain, "glass_to_glass": (recv_t - sent[pts]) * 1e3})
    for s in client.stats:
        if s.get("time", 0) >= t0:
            for stage in STAGES:
                value = (s.get("stages_ms", {}).get(stage) or {}).get("p50")
                if value is not None:
                    res.server_stages.setdefault(stage, []).append(value)
    return res


def latency_summary(ms) -> dict:
    """p50/p95/p99/max and the count of glass-to-glass milliseconds (None without any)."""
    p = percentiles(ms, (50, 95, 99))
    top = round(float(np.max(ms)), 2) if p["n"] else None
    return {"p50": p["p50"], "p95": p["p95"], "p99": p["p99"], "max": top, "n": p["n"]}


def summarize(results: list[SessionResult], duration: float) -> dict:
    """The sessions of one configuration taken together; fps per measured second."""
    lat = [ms for r in results for _, ms in r.latencies_ms]
    arrivals = [np.diff(sorted(r.arrivals)) * 1e3 for r in results if len(r.arrivals) > 2]
    gaps = np.concatenate(arrivals) if arrivals else np.array([])
    sent, matched = sum(r.sent for r in results), sum(r.matched for r in results)
    return {
        "sessions": len(results),
        "glass_to_glass_ms": latency_summary(lat),
        "fps_per_session": round(matched / max(len(results), 1) / duration, 2),
        "sent": sent,
        "matched": matched,
        "dropped": sent - matched,
        "matched_ratio": round(matched / sent, 4) if sent else 0.0,
        "jitter_ms": round(float(np.std(gaps)), 2) if gaps.size else None,
        "server_stages_p50_ms": {s: round(float(np.mean([v for r in results for v in r.server_stages.get(s, [])])), 2)
                                 for s in STAGES if any(r.server_stages.get(s) for r in results)},
        "chain_p50_ms": chain_summary([c for r in results for c in r.chain]),
        "chain_p95_ms": chain_summary([c for r in results for c in r.chain], 95),
        "client_cpu_percent_per_session": _mean([r.client_cpu_percent for r in results]),
        "server_cpu_percent_per_session": _mean([r.server_cpu_percent for r in results]),
        "placement": placement(results),
        # The whole machine while they ran (sessions of one run share one reading).
        "machine_cpu_percent": {k: _mean([r.machine_cpu_percent[k] for r in results if r.machine_cpu_percent])
                                for k in ("busy", "steal")},
    }


def placement(results: list[SessionResult]) -> dict:
    """Where the sessions landed (a cluster spreads them) and what reaching them cost: the
    setup time of sessions placed where they knocked against those redirected first."""
    landed: dict[str, int] = {}
    for r in results:
        landed[r.landed or "?"] = landed.get(r.landed or "?", 0) + 1
    setup = lambda redirected: percentiles([r.connect_ms for r in results  # noqa: E731
                                            if r.connect_ms is not None and (r.redirects > 0) == redirected])
    return {"landed": landed, "connect_ms_direct": setup(False), "connect_ms_redirected": setup(True)}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 1) if values else None


def chain_summary(chains: list[dict], q: int = 50) -> dict | None:
    """The q-th percentile ms of each CHAIN part over the frames, and their sum (for q=50
    close to the glass-to-glass median, though medians need not add up exactly; for q=95,
    where the tail comes from)."""
    if not chains:
        return None
    out = {part: percentiles([c[part] for c in chains], (q,))[f"p{q}"] for part in CHAIN}
    out["sum"] = round(sum(out[part] for part in CHAIN), 2)
    out["frames"] = len(chains)
    # Per frame the parts are the whole, but for the server's times rounded to 0.1 ms in
    # its stats: the largest difference says the split is complete.
    out["max_frame_residual"] = round(max(abs(sum(c[p] for p in CHAIN) - c["glass_to_glass"])
                                          for c in chains), 3)
    return out


def meets_target(summary: dict, p95_ms: float, fps: float) -> bool:
    """Whether a summary's glass-to-glass p95 and fps per session are within the target."""
    p95 = summary["glass_to_glass_ms"]["p95"]
    return bool(p95 is not None and p95 <= p95_ms and summary["fps_per_session"] >= fps)


def drift(results: list[SessionResult], duration: float) -> dict | None:
    """p95 of the first and the last minute (or fifth, for runs under five minutes), and of
    every window between: on a shared machine one noisy last minute can look like drift,
    and the windows between tell a trend from a burst."""
    window = 60.0 if duration >= 300 else duration / 5
    count = max(1, int(round(duration / window)))
    bins = [[] for _ in range(count)]
    for r in results:
        for t, ms in r.latencies_ms:
            bins[min(max(int(t // window), 0), count - 1)].append(ms)
    last = [ms for r in results for t, ms in r.latencies_ms if t >= duration - window]
    if not bins[0] or not last:
        return None
    # Unrounded p95s for the change, rounded ones for people. The first window is bins[0]; the
    # last is the run's final `window` seconds, which the last bin is not when they do not divide.
    windows = [percentiles(v, (95,), digits=9)["p95"] for v in bins]
    a, b = windows[0], percentiles(last, (95,), digits=9)["p95"]
    return {"window_s": window, "first_p95_ms": round(a, 2), "last_p95_ms": round(b, 2),
            "change": round(b / a - 1, 4), "trend": _trend(windows),
            "window_p95_ms": [None if v is None else round(v, 2) for v in windows]}


def _trend(values: list) -> float | None:
    """The relative change, first window to last, of a least-squares line through every
    window's p95: a steadier figure for growth than two windows of ~120 frames each, whose
    p95s hang on their six slowest frames."""
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(points) < 3:
        return None
    slope, start = np.polyfit(*zip(*points), 1)
    end = start + slope * (len(values) - 1)
    return round(float(end / start - 1), 4) if start > 0 else None


def ratios(a: dict, b: dict) -> dict:
    """B/A of glass-to-glass p50 and p95 and of fps per session, for two run summaries."""
    return {"p50": _ratio(b["glass_to_glass_ms"]["p50"], a["glass_to_glass_ms"]["p50"]),
            "p95": _ratio(b["glass_to_glass_ms"]["p95"], a["glass_to_glass_ms"]["p95"]),
            "fps": _ratio(b["fps_per_session"], a["fps_per_session"])}


def _ratio(b, a):
    return round(b / a, 3) if a and b is not None else None


def series(r: SessionResult) -> dict:
    """One session's raw figures, for the report's plots."""
    return {"session": r.session, "sent": r.sent, "received": r.received, "matched": r.matched,
            "latency_ms": r.latencies_ms, "server_stages_p50_ms": r.server_stages}
