"""Generator runtimes behind one interface: run((1, C, 256, 256) float32) -> (1, 3, 256, 256).

    tensorrt  a native TensorRT engine built by tensorrt_build.py (export_trt.py) for this GPU
    ort-trt   ONNX Runtime with the TensorRT execution provider
    ort-cuda  ONNX Runtime with the CUDA execution provider
    ort-int8-cpu  ONNX Runtime on the CPU, the bundle's int8 model (quantize.py), if it has one
    ort-cpu   ONNX Runtime on the CPU (the default on machines without a GPU)
    torch     PyTorch eager, from the bundle's weights (the reference implementation)

select_runtime() tries them in that order (or the one asked for), falls back on any
failure, and logs one line saying which one runs and why.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from .tensorrt_build import engine_path

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "ort-trt", "ort-cuda", "ort-int8-cpu", "ort-cpu", "torch")
PREFERENCES = ("auto",) + BACKENDS + ("torch-bf16",)  # what a user may ask select_runtime for
ORT_PROVIDERS = {"ort-trt": "TensorrtExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-int8-cpu": "CPUExecutionProvider", "ort-cpu": "CPUExecutionProvider"}


class RuntimeUnavailable(RuntimeError):
    pass


class OrtRuntime:
    def __init__(self, onnx_path: str | os.PathLike, backend: str = "ort-cpu", threads: int | None = None):
        import onnxruntime as ort

        provider = ORT_PROVIDERS[backend]
        if provider not in ort.get_available_providers():
            raise RuntimeUnavailable(f"onnxruntime has no {provider}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Idle pool threads spin by default, taking cores from the landmarks thread and the
        # codecs beside them: live sessions ran 10-15% more fps with spinning off.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = threads
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        if backend == "ort-trt":
            cache = str(Path(onnx_path).parent / "trt_cache")
            providers[0] = (provider, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": cache})
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise RuntimeUnavailable(f"cannot load {onnx_path}: {e}")
        if provider not in self.session.get_providers():
            raise RuntimeUnavailable(f"{provider} did not initialise")
        self.name = backend
        self.input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x, np.float32)})[0]


class TorchRuntime:
    def __init__(self, model, bf16: bool = False):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.bf16 = bf16
        self.name = "torch-bf16" if bf16 else "torch"

    @classmethod
    def from_weights(cls, path: str | os.PathLike, bf16: bool = False) -> "TorchRuntime":
        import torch

        from .model import Generator

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = Generator(**state["model_config"])
            model.load_state_dict(state["model"])
        except Exception as e:  # noqa: BLE001
            raise RuntimeUnavailable(f"cannot load torch weights {path}: {e}")
        return cls(model, bf16)

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float().numpy()


class TensorRTRuntime:
    """A serialized TensorRT 10 engine, run with torch CUDA tensors as device buffers."""

    def __init__(self, engine_path: str | os.PathLike):
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise RuntimeUnavailable(f"tensorrt is not installed ({e})")
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("no CUDA device for torch buffers")
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeUnavailable(f"cannot deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        self.torch = torch
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.x = torch.empty(tuple(self.engine.get_tensor_shape(self.inp)), device="cuda")
        self.y = torch.empty(tuple(self.engine.get_tensor_shape(self.out)), device="cuda")
        self.context.set_tensor_address(self.inp, self.x.data_ptr())
        self.context.set_tensor_address(self.out, self.y.data_ptr())
        self.stream = torch.cuda.Stream()
        self.name = "tensorrt"

    def run(self, x: np.ndarray) -> np.ndarray:
        self.x.copy_(self.torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return self.y.cpu().numpy()


def gpu_device() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of CUDA device 0 as torch sees it, or None: TensorRTRuntime
    needs torch's CUDA for its buffers, so a GPU torch cannot use does not count."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    except Exception:  # noqa: BLE001
        return None


def plan(prefer: str, providers: list[str], engine_file: Path | None, has_weights: bool,
         has_int8: bool = False) -> list[tuple[str, str]]:
    """Backends to try, in order, each with the reason it is considered."""
    if prefer not in PREFERENCES:
        raise ValueError(f"unknown backend {prefer!r} (use {', '.join(PREFERENCES)})")
    out = []
    if prefer in ("auto", "tensorrt") and engine_file is not None:
        out.append(("tensorrt", f"TensorRT engine {engine_file.name} built for this GPU"))
    for b in ("ort-trt", "ort-cuda"):
        if prefer in ("auto", b) and ORT_PROVIDERS[b] in providers:
            out.append((b, f"onnxruntime offers {ORT_PROVIDERS[b]}"))
    if has_int8 and prefer in ("auto", "ort-int8-cpu"):
        out.append(("ort-int8-cpu", "requested" if prefer != "auto" else
                    "the bundle's int8 model, within its quality check of fp32 on held-out frames"))
    if prefer == "ort-cpu" or prefer == "auto" or not out:
        out.append(("ort-cpu", "requested" if prefer == "ort-cpu" else
                    "no GPU runtime available" if prefer == "auto" else f"{prefer} unavailable"))
    if prefer in ("torch", "torch-bf16"):
        out.insert(0, (prefer, "requested"))
    elif has_weights:
        out.append(("torch", "fallback: onnxruntime could not run the model"))
    return out


def select_runtime(onnx_path: str | os.PathLike, weights_path: str | os.PathLike | None = None,
                   prefer: str = "auto", providers: list[str] | None = None,
                   int8_path: str | os.PathLike | None = None):
    """The first backend of plan() that loads; logs one line with the choice and the reason."""
    onnx_path = Path(onnx_path)
    if providers is None:
        try:
            import onnxruntime as ort
            providers = ort.get_available_providers()
        except ImportError:
            providers = []
    gpu = gpu_device()
    engine = engine_path(onnx_path, *gpu) if gpu else None  # the name tensorrt_build gives it
    engine = engine if engine is not None and engine.is_file() else None
    has_weights = weights_path is not None and Path(weights_path).is_file()
    has_int8 = int8_path is not None and Path(int8_path).is_file()
    failures = []
    for backend, why in plan(prefer, providers, engine, has_weights, has_int8):
        try:
            if backend == "tensorrt":
                rt = TensorRTRuntime(engine)
            elif backend == "ort-int8-cpu":
                rt = OrtRuntime(int8_path, backend)
            elif backend.startswith("ort-"):
                rt = OrtRuntime(onnx_path, backend)
            else:
                if not has_weights:
                    raise RuntimeUnavailable("no torch weights in the bundle")
                rt = TorchRuntime.from_weights(weights_path, bf16=backend == "torch-bf16")
        except (RuntimeUnavailable, ImportError, OSError) as e:
            failures.append(f"{backend}: {e}")
            continue
        note = f" (skipped {'; '.join(failures)})" if failures else ""
        log.info("neural runtime: %s - %s%s", backend, why, note)
        return rt
    raise RuntimeUnavailable("no runtime can run the generator: " + "; ".join(failures))


def bundle_file(identity, name) -> Path | None:
    """The path of a file the manifest lists (and so hash-checked), else None."""
    return identity.path / name if isinstance(name, str) and name in identity.manifest["files"] else None


class GeneratorInput(NamedTuple):
    """NeuralRenderer.prepare's work, which finish completes (maybe on another thread)."""
    x: np.ndarray  # the generator's input
    warp: np.ndarray  # the warp render in it (SIZE), uint8
    target: np.ndarray  # the target landmarks, in SIZE pixels
    detail: np.ndarray | None  # the warp at the identity's own size, when that is larger


class NeuralRenderer:
    """Same interface as WarpRenderer: render(target_points) -> RGB uint8 at the identity's size.

    The generator runs at SIZE (256). An identity kept larger (512² output) is warped at its
    own size; the generator sees that warp scaled down, and its output is scaled up with the
    large warp's finer detail added back where the generator left the warp alone
    (add_warp_detail)."""

    def __init__(self, identity, prefer: str = "auto"):
        from ..render.warp import WarpRenderer

        from .config import IN_CHANNELS, LEGACY_CHANNELS, SIZE
        from .model import still_for

        neural = identity.manifest.get("neural") or {}
        if not isinstance(neural.get("model"), str) or neural["model"] not in identity.manifest["files"]:
            raise RuntimeUnavailable(f"identity {identity.name!r} has no generator model listed in its bundle")
        if neural.get("input") not in ([1, IN_CHANNELS, SIZE, SIZE], [1, LEGACY_CHANNELS, SIZE, SIZE]):
            raise RuntimeUnavailable(f"identity {identity.name!r} was enrolled by an older version "
                                     f"(generator input {neural.get('input')}); enroll it again")
        self.runtime = select_runtime(identity.path / neural["model"], bundle_file(identity, neural.get("weights")),
                                      prefer, int8_path=bundle_file(identity, (neural.get("int8") or {}).get("model")))
        self.size, self._k = identity.size, SIZE / identity.size
        small = identity.scaled(SIZE)
        self.warp = WarpRenderer.for_identity(identity)
        self._rigid = self.warp if small is identity else WarpRenderer(small.reference, small.neutral)
        self._still = still_for(small, neural["input"][1])
        self.last_warp: np.ndarray | None = None  # the warp render under the last output, for comparisons
        self._prev = None

    def reset(self) -> None:
        """Forget the previous frame (a new session, or frames were lost)."""
        self._prev = None

    def render(self, target: np.ndarray) -> np.ndarray:
        return self.finish(self.prepare(target))

    def prepare(self, target: np.ndarray) -> GeneratorInput:
        """The generator's input for `target` (landmarks in the identity's pixels): the warp,
        the rigid head, the contour maps and the still reference."""
        from .config import SIZE
        from .model import contour_map, make_input

        self.last_warp = warp = self.warp.render(target)
        detail = None
        if self.size != SIZE:
            detail, warp = warp, cv2.resize(warp, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            target = (target * self._k).astype(np.float32)
        cmap = contour_map(target)
        x = make_input(warp, self._rigid.render_rigid(target), cmap, self._prev, self._still)
        self._prev = cmap
        return GeneratorInput(x, warp, target, detail)

    def finish(self, prepared: GeneratorInput) -> np.ndarray:
        """The generator on a prepared input: the face."""
        from .model import add_warp_detail, keep_warp_detail, to_image

        out = keep_warp_detail(to_image(self.runtime.run(prepared.x)), prepared.warp, prepared.target)
        return out if prepared.detail is None else add_warp_detail(out, prepared.warp, prepared.detail)
