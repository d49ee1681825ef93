"""Per-frame stage timings: rolling summaries for the client, Prometheus text for /metrics."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from engines.measure import percentiles

# The live stages, in the order a frame goes through them; the one list of their names:
# the stats messages, /metrics, the web client (sent in the session message) and the
# benchmark all read it. queue: waiting for a thread or the previous frame; total:
# camera frame received -> avatar frame handed to the sender.
COMPUTE_STAGES = ("convert", "landmarks", "retarget", "render")
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
    """Process-wide counters. Thread-safe: compute threads add stage samples."""

    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()
        self.sessions_active = 0
        self.sessions_total = 0
        self.rejected: dict[str, int] = {}
        self.frames_processed = 0
        self.frames_dropped = 0
        self._samples = {s: deque(maxlen=window) for s in STAGES}
        self._sums = {s: 0.0 for s in STAGES}

    def reject(self, code: str) -> None:
        with self._lock:
            self.rejected[code] = self.rejected.get(code, 0) + 1

    def frame(self, rec: FrameRecord) -> None:
        with self._lock:
            self.frames_processed += 1
            for s in STAGES:
                v = rec.stages.get(s, 0.0)
                self._samples[s].append(v)
                self._sums[s] += v

    def dropped(self, n: int = 1) -> None:
        with self._lock:
            self.frames_dropped += n

    def prometheus(self) -> str:
        with self._lock:
            lines = [
                "# HELP avatar_sessions_active Sessions currently open.",
                "# TYPE avatar_sessions_active gauge",
                f"avatar_sessions_active {self.sessions_active}",
                "# HELP avatar_sessions_total Sessions admitted since start.",
                "# TYPE avatar_sessions_total counter",
                f"avatar_sessions_total {self.sessions_total}",
                "# HELP avatar_errors_total Errors sent to clients, by code.",
                "# TYPE avatar_errors_total counter",
            ]
            lines += [f'avatar_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.rejected.items())]
            lines += [
                "# HELP avatar_frames_processed_total Avatar frames produced.",
                "# TYPE avatar_frames_processed_total counter",
                f"avatar_frames_processed_total {self.frames_processed}",
                "# HELP avatar_frames_dropped_total Stale camera frames skipped to bound latency.",
                "# TYPE avatar_frames_dropped_total counter",
                f"avatar_frames_dropped_total {self.frames_dropped}",
                "# HELP avatar_stage_seconds Per-frame stage latency (recent window quantiles).",
                "# TYPE avatar_stage_seconds summary",
            ]
            for s in STAGES:
                p50, p95 = _quantiles(self._samples[s])
                lines += [
                    f'avatar_stage_seconds{{stage="{s}",quantile="0.5"}} {p50 / 1e3:.6f}',
                    f'avatar_stage_seconds{{stage="{s}",quantile="0.95"}} {p95 / 1e3:.6f}',
                    f'avatar_stage_seconds_sum{{stage="{s}"}} {self._sums[s] / 1e3:.6f}',
                    f'avatar_stage_seconds_count{{stage="{s}"}} {self.frames_processed}',
                ]
        return "\n".join(lines) + "\n"
