"""Measuring: percentiles, per-stage stopwatches and the machine a number was taken on.

One definition each, shared by live telemetry, the offline render's timings and both
benchmarks (`avatar bench engines`, `avatar bench live`), so their figures mean the same.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np


def percentiles(values, qs=(50, 95), digits: int = 2) -> dict:
    """{"p50": .., "p95": .., "n": count} for qs=(50, 95); each None when there are no values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    out = {f"p{q:g}": None for q in qs}
    if v.size:
        out = {f"p{q:g}": round(float(x), digits) for q, x in zip(qs, np.percentile(v, qs))}
    out["n"] = int(v.size)
    return out


def timing_summary(values_ms, count_key: str = "n", digits: int = 2) -> dict:
    """{"median_ms", "p95_ms", count_key} of a list of millisecond timings."""
    p = percentiles(values_ms, (50, 95), digits)
    return {"median_ms": p["p50"], "p95_ms": p["p95"], count_key: p["n"]}


class StageTimer:
    """Milliseconds spent per named stage of one frame; a stage run twice adds up."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    def run(self, stage: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t) * 1e3


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def machine_info(backend: str | None = None) -> dict:
    """What a benchmark ran on: CPU, cores, library versions, accelerators, and the backend
    that produced the numbers (the caller knows which one that was)."""
    import av
    import cv2
    import onnxruntime as ort
    import torch

    cpu = _cpuinfo()
    info = {"cpu": cpu.get("model name") or platform.processor() or "unknown", "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "opencv": cv2.__version__,
            "av": av.__version__, "ort_providers": ort.get_available_providers(),
            "torch_threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in cpu.get("flags", ""),
            "cuda": torch.cuda.is_available()}
    try:
        import aiortc
        info["aiortc"] = aiortc.__version__
    except ImportError:
        pass
    if backend is not None:
        info["backend"] = backend
    return info
