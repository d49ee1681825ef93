"""Build a TensorRT engine (FP16) from an identity's generator ONNX, for the GPU it runs on.

    python export_trt.py IDENTITY_DIR/generator.onnx      (or: avatar export-trt ...)
        -> IDENTITY_DIR/generator.<gpu-name>.sm<cc>.engine  (+ a reusable timing cache)

The engine only runs on the GPU model and TensorRT version that built it, so its file name
carries the GPU's name and compute capability (engine_path); runtime.py looks for exactly
that name and otherwise falls back to ONNX Runtime. Written against the TensorRT 10 Python
API; needs the `tensorrt` package and an NVIDIA GPU (it exits with status 2 without them).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DESCRIPTION = __doc__.split("\n\n")[0]
EXIT_UNAVAILABLE = 2


def sanitize(name: str) -> str:
    """'NVIDIA GeForce RTX 3090' -> 'nvidia-geforce-rtx-3090' (safe in any file system)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def engine_path(onnx: Path, gpu_name: str, capability: tuple[int, int], out_dir: Path | None = None) -> Path:
    """Where the engine for this ONNX file and GPU goes: <stem>.<gpu>.sm<major><minor>.engine."""
    major, minor = capability
    return (out_dir or onnx.parent) / f"{onnx.stem}.{sanitize(gpu_name)}.sm{major}{minor}.engine"


def build_parser(prog: str = "export_trt.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags, shared by `python export_trt.py` and `avatar export-trt`."""
    p.add_argument("onnx", type=Path, help="the generator's ONNX file (fixed shapes)")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write the engine (default: next to the ONNX)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file, read if present and updated (default: OUT_DIR/trt_timing.cache)")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit (default: %(default)s)")
    p.add_argument("--no-fp16", action="store_true", help="build in FP32")


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device 0, through torch or cuda-python, whichever exists."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00"), (props.major, props.minor)
    except ImportError:
        pass
    raise RuntimeError("no CUDA GPU found (TensorRT engines are built on, and for, the GPU that runs them)")


def build(onnx: Path, out: Path, cache_path: Path, workspace_mb: int, fp16: bool) -> Path:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx.read_bytes()):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx}: TensorRT cannot parse it:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):  # removed in TensorRT 11 (strong typing instead)
            raise RuntimeError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16; this script targets "
                               "TensorRT 10 (pip install 'tensorrt>=10,<11'), or pass --no-fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Build the engine the parsed flags ask for; 0, or EXIT_UNAVAILABLE with the reason on stderr."""
    if not args.onnx.is_file():
        print(f"error: {args.onnx}: no such file", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("error: the `tensorrt` Python package is not installed (pip install 'tensorrt>=10' on a "
              "machine with an NVIDIA GPU); the CPU runtime (ONNX Runtime) needs no engine",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        name, cc = gpu_identity()
        out = engine_path(args.onnx, name, cc, args.out_dir)
        cache = args.timing_cache or out.parent / "trt_timing.cache"
        build(args.onnx, out, cache, args.workspace_mb, not args.no_fp16)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(f"wrote {out} (timing cache {cache})")
    return 0
