"""Per-stage timings of the avatar pipeline: landmarks, retarget, warp, and the generator on
every backend that runs here (torch fp32, torch bf16 autocast, ONNX Runtime, GPU ones).
Statistics and machine facts come from measure.py, as for every other figure."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import machine_info, timing_summary

BASELINE = "torch-fp32"


def _time(fn, n: int, warmup: int = 3) -> dict:
    """median_ms, p95_ms, n of `n` calls of fn, after `warmup` untimed ones (first calls
    allocate and pick kernels)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return timing_summary(ts)


def bench_engines(identity, frames: list[np.ndarray], n: int = 30, progress: bool = True) -> dict:
    """Time each stage on real driver frames (or whatever frames are given) for an identity.
    With a neural identity its trained generator is timed, else a randomly initialised one."""
    import onnxruntime as ort

    from .landmarks import FaceLandmarker
    from .neural.config import MODEL_FILE, SIZE
    from .neural.model import (Generator, add_warp_detail, contour_map, export_onnx, keep_warp_detail, make_input,
                               param_count, still_for)
    from .neural.runtime import ORT_PROVIDERS, OrtRuntime, TorchRuntime, bundle_file
    from .neural.train import bf16_supported
    from .retarget import Retargeter
    from .provenance.label import draw_label
    from .render.warp import WarpRenderer
    from .provenance.watermark import Marker, Payload

    stages: dict = {}
    with FaceLandmarker(static=False) as lm:
        it = iter(range(10 ** 9))
        stages["landmarks"] = _time(lambda: lm(frames[next(it) % len(frames)]), n)
        pts = [lm(f) for f in frames[: min(len(frames), 30)]]
    pts = [p for p in pts if p is not None] or [identity.neutral]
    rt = Retargeter(identity.neutral)
    k = iter(range(10 ** 9))
    stages["retarget"] = _time(lambda: rt.update(pts[(i := next(k)) % len(pts)], i / 30), n)
    targets = [rt.update(p, 100 + i / 30) for i, p in enumerate(pts)]
    warp = WarpRenderer.for_identity(identity)
    stages["warp"] = _time(lambda: warp.render(targets[next(k) % len(targets)]), n)
    stages["contour_map"] = _time(lambda: contour_map(targets[next(k) % len(targets)]), n)
    stages["rigid_warp"] = _time(lambda: warp.render_rigid(targets[next(k) % len(targets)]), n)
    rendered = [warp.render(t) for t in targets[:10]]
    # The generator's stages run at its SIZE; an identity kept larger is scaled down for them.
    small = identity.scaled(SIZE)
    small_warp = warp if small is identity else WarpRenderer.for_identity(small)
    small_targets = [(t * (SIZE / identity.size)).astype(np.float32) for t in targets]
    small_rendered = [small_warp.render(t) for t in small_targets[:10]]
    # A neighbouring frame stands in for the generator's output: the work does not depend on it.
    stages["keep_warp_detail"] = _time(lambda: keep_warp_detail(small_rendered[(i := next(k) % len(small_rendered)) - 1],
                                                                small_rendered[i], small_targets[i]), n)
    if small is not identity:
        stages["add_warp_detail"] = _time(lambda: add_warp_detail(
            small_rendered[(i := next(k) % len(small_rendered)) - 1], small_rendered[i], rendered[i]), n)
    marker = Marker(Payload(0, 0))
    stages["watermark"] = _time(lambda: marker(rendered[next(k) % len(rendered)]), n)  # budget: 2 ms
    stages["badge"] = _time(lambda: draw_label(rendered[next(k) % len(rendered)]), n)
    neural = identity.manifest.get("neural") or {}
    int8_path = None
    if identity.engine == "neural" and neural.get("weights"):
        model = TorchRuntime.from_weights(identity.path / neural["weights"]).model
        onnx_path, source = identity.path / neural["model"], "trained"
        int8_path = bundle_file(identity, (neural.get("int8") or {}).get("model"))
    else:
        model = Generator().eval()  # config.MODEL_CONFIG, the size enrollments train
        onnx_path, source = Path(tempfile.mkdtemp()) / MODEL_FILE, "random init"
        export_onnx(model, onnx_path)
    still = still_for(small, model.input_channels)  # the model's own: a random-init one has no manifest
    t0 = small_targets[0]
    x = make_input(small_warp.render(t0), small_warp.render_rigid(t0), contour_map(t0), None, still)
    gen = {}
    gen["torch-fp32"] = _time(lambda: TorchRuntime(model).run(x), n)
    if bf16_supported():
        gen["torch-bf16"] = _time(lambda: TorchRuntime(model, bf16=True).run(x), n)
    else:  # emulated: measured 143x slower than fp32 on an AMD EPYC without AVX-512
        gen["torch-bf16"] = {"error": "this CPU has no native bf16 (oneDNN would emulate it); not timed"}
    for backend, provider in ORT_PROVIDERS.items():
        path = int8_path if backend == "ort-int8-cpu" else onnx_path
        if path is not None and provider in ort.get_available_providers():
            try:
                r = OrtRuntime(path, backend)
            except Exception as e:  # noqa: BLE001
                gen[backend] = {"error": str(e)}
                continue
            gen[backend.replace("ort-cpu", "ort-fp32-cpu")] = _time(lambda: r.run(x), n)
    for name, t in gen.items():
        stages[f"generator[{name}]"] = t
    # Absolute times drift from run to run on a shared machine; ratios to the torch fp32
    # reference, measured in this same process, are the numbers to compare.
    base = stages.get(f"generator[{BASELINE}]", {}).get("median_ms")
    for name, t in stages.items():
        if name.startswith("generator[") and base and "median_ms" in t:
            t["vs_baseline"] = round(t["median_ms"] / base, 3)
    backends = ", ".join(name for name, t in gen.items() if "error" not in t)
    return {"machine": machine_info(backend=backends), "identity": identity.name, "engine": identity.engine,
            "generator": {"source": source, "params": param_count(model), "input": list(x.shape)},
            "baseline": BASELINE, "stages": stages}


def format_table(report: dict) -> str:
    lines = [f"{'stage':<28}{'median ms':>10}{'p95 ms':>10}{'vs ' + report.get('baseline', ''):>18}"]
    for name, t in report["stages"].items():
        if "error" in t:
            lines.append(f"{name:<28}  error: {t['error']}")
        else:
            ratio = f"{t['vs_baseline']:>17.2f}x" if "vs_baseline" in t else ""
            lines.append(f"{name:<28}{t['median_ms']:>10.2f}{t['p95_ms']:>10.2f}{ratio}")
    m = report["machine"]
    lines.append(f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
                 f"generator: {report['generator']['source']}, {report['generator']['params']:,} params")
    return "\n".join(lines)
