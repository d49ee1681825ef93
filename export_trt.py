#!/usr/bin/env python3
"""Build a TensorRT engine (FP16) from an identity's generator ONNX, for the GPU it runs on.

    python export_trt.py IDENTITY_DIR/generator.onnx
        -> IDENTITY_DIR/generator.<gpu-name>.sm<cc>.engine  (+ a reusable timing cache)

A thin entry point kept where users know it; the code is engines/neural/tensorrt_build.py,
also reachable as `avatar export-trt`. Needs the `tensorrt` package and an NVIDIA GPU (it
exits with status 2 without them).
"""
import sys

from engines.neural.tensorrt_build import main

if __name__ == "__main__":
    sys.exit(main())
