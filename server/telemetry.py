"""Per-frame stage timings: rolling summaries for the client; counters and histograms for /metrics."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engines.measure import percentiles

# The live stages, in the order a frame goes through them; the one list of their names:
# the stats messages, /metrics, the web client (sent in the session message) and the
# benchmark all read it. queue: waiting for a thread or the previous frame; total:
# camera frame received -> avatar frame handed to the sender.
# compose: into a 16:9 call frame (the identity's scene), when the client asked for one; mark: the watermark
COMPUTE_STAGES = ("convert", "landmarks", "retarget", "render", "compose", "mark")
STAGES = ("queue", *COMPUTE_STAGES, "total")


@dataclass
class FrameRecord:
    """One processed frame. Times in ms; `queue` is receive -> start of compute."""
    in_pts: int
    recv_time: float  # server wall clock (time.time()) when the frame arrived
    done_time: float  # wall clock when the output frame was handed to the sender
    face: bool
    stages: dict[str, float] = field(default_factory=dict)


def _quantiles(values) -> tuple[float, float]:
    """(p50, p95) of a window of ms values; zeros before the first frame."""
    p = percentiles(values)
    return p["p50"] or 0.0, p["p95"] or 0.0


class SessionStats:
    """The last few seconds of one session, summarised about once a second."""

    def __init__(self, window: int = 90):
        self.records: deque[FrameRecord] = deque(maxlen=window)
        self.frames = 0
        self.dropped = 0  # stale input frames replaced by newer ones before compute
        self.rejected = 0  # frames too small or otherwise unusable
        self._reported = 0  # frames already listed in a summary's "frames"
        self._sent: deque[tuple[int, float]] = deque(maxlen=4 * window)  # (pts, time) not yet reported

    def add(self, rec: FrameRecord) -> None:
        self.records.append(rec)
        self.frames += 1

    def mark_sent(self, pts: int, when: float) -> None:
        """The avatar frame of camera frame `pts` was encoded and its packets sent at `when`."""
        self._sent.append((pts, when))

    def summary(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        recent = [r for r in self.records if now - r.done_time <= 1.0]
        stages = {s: dict(zip(("p50", "p95"), _quantiles([r.stages.get(s, 0.0) for r in self.records])))
                  for s in STAGES}
        last = self.records[-1] if self.records else None
        new = min(self.frames - self._reported, len(self.records))
        self._reported = self.frames
        return {
            "fps": len(recent),
            "frames": self.frames,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "face": bool(last and last.face),
            "stages_ms": stages,
            "latency_ms": dict(stages["total"]),  # receive -> output, server side
            "last": {"in_pts": last.in_pts, "recv_time": last.recv_time} if last else None,
            # Every output frame since the last summary: lets a client match each avatar
            # frame to its camera frame whatever RTP timestamp origin the sender picked.
            "recent": [[r.in_pts, round(r.recv_time, 4), round(r.done_time, 4),
                        [round(r.stages.get(s, 0.0), 2) for s in STAGES]]
                       for r in list(self.records)[len(self.records) - new:]],
            # When each avatar frame's packets went out (encode + send done), by in_pts.
            "sent": [[pts, round(t, 4)] for pts, t in self._drain_sent()],
        }

    def _drain_sent(self) -> list[tuple[int, float]]:
        sent = list(self._sent)
        self._sent.clear()
        return sent


class Metrics:
    """Process-wide counters and stage latencies, exposed in the Prometheus format by
    prometheus_client (one registry per server, so servers in one process stay apart).
    The admission counts are plain attributes (admission reads and writes them with no await
    in between); a collector reads them at scrape time. Thread-safe: compute threads add samples."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sessions_active = 0
        self.sessions_total = 0
        self.rejected: dict[str, int] = {}
        self.frames_processed = 0
        self.frames_dropped = 0
        self._state = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Counts(self))
        self._stages = Histogram("avatar_stage_seconds", "Per-frame stage latency.", ["stage"],
                                 buckets=STAGE_BUCKETS, registry=self.registry)
        for s in STAGES:  # every stage listed from the first scrape, not after its first frame
            self._stages.labels(s)

    def watch(self, state) -> None:
        """Also report the server's rooms and viewers."""
        self._state = state

    def reject(self, code: str) -> None:
        with self._lock:
            self.rejected[code] = self.rejected.get(code, 0) + 1

    def frame(self, rec: FrameRecord) -> None:
        with self._lock:
            self.frames_processed += 1
        for s in STAGES:
            self._stages.labels(s).observe(rec.stages.get(s, 0.0) / 1e3)

    def dropped(self, n: int = 1) -> None:
        with self._lock:
            self.frames_dropped += n

    def exposition(self, node: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type; with `node` (a cluster node's advertised URL),
        every sample carries it as the label `node`, so one query sees the whole cluster."""
        if node is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        labelled = CollectorRegistry(auto_describe=False)
        labelled.register(_Labelled(self.registry, node))
        return generate_latest(labelled), CONTENT_TYPE_LATEST


class _Labelled:
    """Another registry's metrics, each sample with one more label."""

    def __init__(self, registry: CollectorRegistry, node: str):
        self.registry, self.node = registry, node

    def collect(self):
        for metric in self.registry.collect():
            metric.samples = [s._replace(labels={**s.labels, "node": self.node}) for s in metric.samples]
            yield metric


STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.045, 0.06, 0.1, 0.2, 0.5, 1.0)


class _Counts:
    """A prometheus_client collector over Metrics' plain counters and the live rooms."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        m = self.m
        with m._lock:
            rejected = dict(m.rejected)
            processed, dropped = m.frames_processed, m.frames_dropped
        yield GaugeMetricFamily("avatar_sessions_active", "Presenter sessions currently open.", m.sessions_active)
        yield CounterMetricFamily("avatar_sessions", "Presenter sessions admitted since start.", m.sessions_total)
        errors = CounterMetricFamily("avatar_errors", "Errors sent to clients, by code.", labels=["code"])
        for code, n in sorted(rejected.items()):
            errors.add_metric([code], n)
        yield errors
        yield CounterMetricFamily("avatar_frames_processed", "Avatar frames produced.", processed)
        yield CounterMetricFamily("avatar_frames_dropped", "Stale camera frames skipped to bound latency.", dropped)
        state = m._state
        if state is not None:
            yield GaugeMetricFamily("avatar_viewers_active", "Viewers watching, all rooms.", len(state.viewers))
            live = sum(1 for r in state.rooms.rooms.values() if r.presenter is not None)
            yield GaugeMetricFamily("avatar_rooms_live", "Rooms with a presenter.", live)
