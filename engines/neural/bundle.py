"""A neural identity's bundle: the generator as ONNX and torch weights, an int8 copy if it
keeps quality, the evaluation report, and the manifest's "neural" section, written through
the identity store's one writer (IdentityStore.write)."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from ..identity import (PHOTO_SIZE, RENDER_SIZE, Consent, Identity, IdentityStore, crop_corners, output_side,
                        write_scene)
from .config import (EVAL_FILE, EVAL_HTML, EYE_MEMORY_FILE, IN_CHANNELS, INT8_FILE, MODEL_CONFIG, MODEL_FILE,
                     MOUTH_MEMORY_FILE, WEIGHTS_FILE)
from .data import PairBuilder

log = logging.getLogger(__name__)


def add_int8_model(staging: Path, builder: PairBuilder) -> dict:
    """Quantize the exported generator in `staging`; keep the int8 file only if its quality
    check passes. Returns the check (with "model" set if kept). Never fails the enrollment:
    the int8 model is an optimisation, and fp32 still runs without it."""
    from .quantize import CALIBRATION_FRAMES, CHECK_FRAMES, quality_check, quantize
    from .runtime import OrtRuntime

    d = builder.data
    calibration = np.random.default_rng(0).choice(d.n_train, min(CALIBRATION_FRAMES, d.n_train), replace=False)
    held_out = d.n_train < len(d.crops)
    check = np.arange(d.n_train, len(d.crops)) if held_out else calibration
    check = check[np.linspace(0, len(check) - 1, min(CHECK_FRAMES, len(check))).astype(int)]
    dst = staging / INT8_FILE
    log.info("quantizing the generator to int8 and checking it on %d %s frames", len(check),
             "held-out" if held_out else "training")
    try:
        quantize(staging / MODEL_FILE, dst, [builder.inputs(np.array([i])) for i in calibration])
        result = quality_check(OrtRuntime(staging / MODEL_FILE), OrtRuntime(dst, "ort-int8-cpu"),
                               [builder.inputs(np.array([i])) for i in check],
                               [builder.targets(np.array([i]))[0] for i in check])
    except Exception as e:  # noqa: BLE001 - onnx/ORT raise many types; training must not be lost
        log.warning("no int8 model: quantization failed (%s); the fp32 model serves", e)
        dst.unlink(missing_ok=True)
        return {"model": None, "error": str(e)}
    result["checked_on"] = "held-out frames" if held_out else "training frames (nothing held out)"
    if not result["kept"]:
        log.warning("no int8 model: it loses %.2f dB PSNR against fp32 (limit %.2f)", result["loss_db"],
                    result["max_loss_db"])
        dst.unlink()
    return {"model": INT8_FILE if result["kept"] else None, **result}


def write_bundle(store: IdentityStore, name: str, display_name: str, consent: Consent, builder: PairBuilder,
                 model, info: dict, source: Path, preset_name: str, eval_report: dict | None,
                 overwrite: bool = False, largest: int = PHOTO_SIZE, origin: dict | None = None,
                 visemes: dict | None = None) -> Identity:
    """Publish the enrolled identity: reference and neutral from the scan's reference frame
    (at its own size in the video, up to `largest`: the output's side), the generator files,
    the "neural" manifest section (what was trained on what), and that frame's surroundings
    as the identity's scene. `origin` ({"derived_from", "style"}) goes into its provenance:
    a restyled identity (enroll.restyle), revoked with the one it came from. `visemes`: the
    mouth shapes learned from the scan's speech (engines/voice/learn.py), if any."""

    def neural_files(staging: Path) -> tuple[list[str], dict]:
        files = write_generator(staging, model)
        int8 = add_int8_model(staging, builder)
        if int8.get("model"):
            files.append(int8["model"])
        if eval_report is not None:
            from .evaluate import write_report

            write_report(eval_report, staging / EVAL_FILE, staging / EVAL_HTML, f"{name}: enrollment evaluation")
            files += [EVAL_FILE, EVAL_HTML]
        fields = {"neural": neural_manifest(builder, info, preset_name, eval_report is not None, int8)}
        if visemes is not None:
            fields["visemes"] = visemes
        if builder.data.scene is not None:  # the scan's room around the face, for call frames
            scene_files, scene_field = write_scene(staging, *builder.data.scene)
            files += scene_files
            fields.update(scene_field)
        for kind, memory in builder.memories.items():  # its own mouths and eyes, which its warp input drew on
            if memory is not None:
                memory.save(staging / MEMORY_FILES[kind])
                files.append(MEMORY_FILES[kind])
                fields[kind] = MEMORY_FILES[kind]
        return files, fields

    reference, neutral = output_reference(builder, largest)
    return store.write(name, display_name, "neural", consent, reference, neutral, crop_corners(*builder.data.box),
                       {"source": source.name, "source_path": str(source.resolve()), **(origin or {})},
                       tool="avatar enroll", extra=neural_files, overwrite=overwrite)


def output_reference(builder: PairBuilder, largest: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference (and its landmarks) the identity renders at: the scan's reference frame
    cut at its own side in the video, at most `largest`. The generator still trains and runs
    at RENDER_SIZE (NeuralRenderer scales between the two)."""
    large = builder.data.large
    side = RENDER_SIZE if large is None else output_side(large.shape[0], largest)
    if side == RENDER_SIZE:
        return builder.reference, builder.neutral
    if side != large.shape[0]:
        large = cv2.resize(large, (side, side), interpolation=cv2.INTER_AREA)
    return large, (builder.neutral * (side / RENDER_SIZE)).astype(np.float32)


MEMORY_FILES = {"mouth_memory": MOUTH_MEMORY_FILE, "eye_memory": EYE_MEMORY_FILE}


def write_generator(staging: Path, model) -> list[str]:
    """The generator as fixed-shape ONNX (what the runtimes run) and as torch weights with
    the config that rebuilds it (the reference runtime, and a start for retraining)."""
    import torch

    from .model import export_onnx

    export_onnx(model, staging / MODEL_FILE)
    torch.save({"model": model.state_dict(), "model_config": MODEL_CONFIG}, staging / WEIGHTS_FILE)
    return [MODEL_FILE, WEIGHTS_FILE]


def neural_manifest(builder: PairBuilder, info: dict, preset_name: str, evaluated: bool, int8: dict) -> dict:
    """The manifest's "neural" section: the model files and shapes, how long it trained, and
    which video frames were trained on, held out and used as the reference."""
    d = builder.data
    x0, y0, side = d.box
    return {
        "model": MODEL_FILE, "weights": WEIGHTS_FILE, "model_config": MODEL_CONFIG,
        "input": [1, IN_CHANNELS, RENDER_SIZE, RENDER_SIZE], "output": [1, 3, RENDER_SIZE, RENDER_SIZE],
        "preset": preset_name, "steps": info["steps"], "stopped": info["stopped"],
        "train_seconds": info["total_train_seconds"], "final_loss": info["final_loss"],
        "box": [float(x0), float(y0), float(side)],
        "frames_decoded": d.n_decoded, "frames_with_face": len(d.crops),
        "train_frames": [int(d.frame_index[0]), int(d.frame_index[d.n_train - 1])],
        "holdout_frames": [int(d.frame_index[d.n_train]), int(d.frame_index[-1])]
        if d.n_train < len(d.crops) else None,
        "reference_frame": int(d.frame_index[d.reference]),
        "eval": EVAL_FILE if evaluated else None,
        "int8": int8,
    }
