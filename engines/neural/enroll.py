"""Enrollment: train a person's generator from a self-scan video and write a neural bundle.

    frames + landmarks (tracking mode)  ->  one fixed crop box, from the reference frame
    (the most frontal, mouth-closed training frame)  ->  pairs
    (warp(reference, landmarks_i), contours_i, contours_{i-1}, rigid_head(reference, landmarks_i))
    -> ground-truth crop_i
    ->  train (the last HOLDOUT of the frames are never trained on)  ->  ONNX + eval report.

Progress is checkpointed to <root>/.<name>.enroll/ about once a minute; rerunning the same
command resumes from the checkpoint (a larger --steps continues training).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..identity import (RENDER_SIZE, SCHEMA_VERSION, Consent, IdentityError, IdentityStore, check_name,
                        crop_matrix, crop_with_box, face_box)
from ..landmarks import (FACE_LEFT, FACE_RIGHT, LEFT_EYE_OUTER, RIGHT_EYE_OUTER, FaceLandmarker,
                         eye_openness, inter_ocular, mouth_openness)
from ..video import VideoError, open_video

log = logging.getLogger(__name__)

HOLDOUT = 0.2  # the last fifth of the frames: evaluation only
AUG_ROLL, AUG_SHIFT, AUG_SCALE = 8.0, 30.0, 0.06  # pose augmentation: degrees, 256² pixels, fraction
CHECKPOINT_SECONDS = 60.0
GRAD_CLIP = 1.0
MODEL_FILE, WEIGHTS_FILE, EVAL_FILE = "generator.onnx", "generator.pt", "eval.json"


@dataclass
class Preset:
    steps: int
    batch: int
    lr: float
    max_minutes: float  # wall-clock cap on training, so a preset keeps its time promise
    crop: int = 160  # train on random crops (the net is fully convolutional): ~2.5x more samples/s
    augment: float = 0.5  # share of samples moved by a random head pose (PairBuilder.batch)


# lr 2e-3 spiked around step 100 in most runs (bf16, no normalisation layers) and lost
# hundreds of steps of progress; 1e-3 trains smoothly.
PRESETS = {
    "quick": Preset(steps=800, batch=6, lr=1e-3, max_minutes=7.0),
    "default": Preset(steps=6000, batch=6, lr=1e-3, max_minutes=52.0),
    "quality": Preset(steps=12000, batch=6, lr=7e-4, max_minutes=180.0, crop=256),
}
MODEL_CONFIG = {"width": 32, "deep": 96, "blocks": 4, "in_channels": 8}  # = model.IN_CHANNELS


# ----------------------------------------------------------------------------- data

@dataclass
class ScanData:
    """A self-scan, cropped with one fixed box: crops (N, 256, 256, 3) uint8, points (N, 478, 3)
    in crop pixels, the video frame index of each, and which one is the reference."""
    crops: np.ndarray
    points: np.ndarray
    frame_index: np.ndarray
    n_train: int
    reference: int  # index into crops (always < n_train)
    box: tuple[float, float, float]  # x0, y0, side in video pixels
    n_decoded: int


def read_video(path: Path, limit: int | None = None):
    """Yield RGB frames of a video; IdentityError if it cannot be read."""
    try:
        container = open_video(path)
    except VideoError as e:
        raise IdentityError(str(e)) from None
    with container:
        n = 0
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
            n += 1
            if limit and n >= limit:
                break


def frontal_score(p: np.ndarray) -> float:
    """Lower is better: head turned (cheek asymmetry, eye depth difference), mouth open, eyes shut."""
    io = max(inter_ocular(p), 1e-6)
    nose = p[1, :2]
    yaw = abs(np.linalg.norm(p[FACE_LEFT, :2] - nose) - np.linalg.norm(p[FACE_RIGHT, :2] - nose)) / io
    depth = abs(p[LEFT_EYE_OUTER, 2] - p[RIGHT_EYE_OUTER, 2]) / io
    roll = abs(math.atan2(p[LEFT_EYE_OUTER, 1] - p[RIGHT_EYE_OUTER, 1],
                          p[LEFT_EYE_OUTER, 0] - p[RIGHT_EYE_OUTER, 0]))
    return yaw + depth + roll + 3.0 * mouth_openness(p) + max(0.0, 0.25 - eye_openness(p)) * 4.0


def extract(video: Path, max_frames: int | None = None, progress: bool = True) -> ScanData:
    from tqdm import tqdm

    frames, points, index = [], [], []
    n = 0
    with FaceLandmarker(static=False) as lm:
        for i, rgb in enumerate(tqdm(read_video(video, max_frames), desc="landmarks", unit="frame",
                                     disable=not progress, total=max_frames)):
            n += 1
            p = lm(rgb)
            if p is not None:
                frames.append(rgb)
                points.append(p)
                index.append(i)
    if n == 0:
        raise IdentityError(f"{video}: no frames could be decoded")
    if len(frames) < 10:
        raise IdentityError(f"{video}: a face was found in only {len(frames)} of {n} frames; "
                            "record a well-lit video of one person facing the camera")
    if len(frames) < 0.5 * n:
        log.warning("a face was found in only %d of %d frames", len(frames), n)
    # Hold out the last frames in video order: what comes after is never seen in training.
    n_train = int(round(len(frames) * (1 - HOLDOUT)))
    ref = int(np.argmin([frontal_score(p) for p in points[:n_train]]))
    x0, y0, side = face_box(points[ref])
    m = crop_matrix(x0, y0, side)
    k = m[0, 0]
    crops = np.stack([crop_with_box(f, x0, y0, side) for f in frames])
    pts = np.stack(points).astype(np.float64)
    pts[..., :2] = pts[..., :2] * k + m[:, 2]
    pts[..., 2] *= k
    return ScanData(crops, pts.astype(np.float32), np.array(index), n_train, ref, (x0, y0, side), n)


def region_weights(points: np.ndarray) -> np.ndarray:
    """(256, 256) float32 mask, 1 on mouth and eyes (dilated), 0 elsewhere."""
    from ..mouth import OUTER_LIPS
    from ..mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER

    mask = np.zeros((RENDER_SIZE, RENDER_SIZE), np.uint8)
    io = inter_ocular(points)
    for upper, lower in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
        ring = np.concatenate([points[upper, :2], points[lower[-2:0:-1], :2]])
        cv2.fillPoly(mask, [np.round(ring).astype(np.int32)], 1)
    cv2.fillPoly(mask, [np.round(points[OUTER_LIPS, :2]).astype(np.int32)], 1)
    r = max(1, int(round(0.12 * io)))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return mask.astype(np.float32)


class PairBuilder:
    """Network inputs and targets for scan frames (warps computed once and cached)."""

    def __init__(self, data: ScanData):
        from ..warp import WarpRenderer
        from .model import contour_map

        self.data = data
        ref = data.reference
        self.reference = data.crops[ref]
        self.neutral = data.points[ref]
        self.warp = warp = WarpRenderer(self.reference, self.neutral)
        self.warps = np.stack([warp.render(p) for p in data.points])
        self.rigids = np.stack([warp.render_rigid(p) for p in data.points])
        self.maps = np.stack([(contour_map(p) * 255).astype(np.uint8) for p in data.points])
        self.weights = np.stack([region_weights(p).astype(np.uint8) for p in data.points])

    def inputs(self, idx: np.ndarray) -> np.ndarray:
        """The batch's network inputs, laid out as model.make_input does for one frame."""
        from .model import IN_CHANNELS

        d = self.data
        prev = np.array([i - 1 if i > 0 and d.frame_index[i - 1] == d.frame_index[i] - 1 else i for i in idx])
        x = np.empty((len(idx), IN_CHANNELS, RENDER_SIZE, RENDER_SIZE), np.float32)
        x[:, :3] = self.warps[idx].transpose(0, 3, 1, 2) / 127.5 - 1.0
        x[:, 3] = self.maps[idx] / 255.0
        x[:, 4] = self.maps[prev] / 255.0
        x[:, 5:] = self.rigids[idx].transpose(0, 3, 1, 2) / 127.5 - 1.0
        return x

    def targets(self, idx: np.ndarray) -> np.ndarray:
        return self.data.crops[idx].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0

    def batch(self, idx: np.ndarray, rng: np.random.Generator, augment: float = 0.0):
        """Training inputs, targets and region weights; with probability `augment` a sample
        is moved by a random similarity (frame and landmarks alike) and its warps re-rendered.

        Why: a self-scan covers few head positions, and held-out frames leave them (in
        selfscan_a the head moves 30 px further and rolls 7° more than in any training
        frame). The warp of a moved head stretches its surroundings differently; without
        examples of that the generator's corrections do not carry over.
        """
        from .model import contour_map, make_input

        x, y = self.inputs(idx), self.targets(idx)
        w = self.weights[idx].astype(np.float32)
        size = (RENDER_SIZE, RENDER_SIZE)
        for k, i in enumerate(idx):
            if rng.random() >= augment:
                continue
            m = cv2.getRotationMatrix2D((RENDER_SIZE / 2, RENDER_SIZE / 2), rng.uniform(-AUG_ROLL, AUG_ROLL),
                                        1 + rng.uniform(-AUG_SCALE, AUG_SCALE))
            m[:, 2] += rng.uniform(-AUG_SHIFT, AUG_SHIFT, 2)
            p = self.data.points[i].copy()
            p[:, :2] = p[:, :2] @ m[:, :2].T + m[:, 2]
            p[:, 2] *= np.hypot(m[0, 0], m[0, 1])
            truth = cv2.warpAffine(self.data.crops[i], m, size, flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
            prev_map = cv2.warpAffine(x[k, 4], m, size, flags=cv2.INTER_LINEAR)
            x[k] = make_input(self.warp.render(p), self.warp.render_rigid(p), contour_map(p), prev_map)[0]
            y[k] = truth.transpose(2, 0, 1) / 127.5 - 1.0
            w[k] = region_weights(p)
        return x, y, w[:, None]


# ----------------------------------------------------------------------------- loss

def ssim_map(a, b):
    """Per-pixel SSIM of (N, C, H, W) tensors in [-1, 1], 7x7 box windows."""
    import torch.nn.functional as F

    a, b = (a + 1) / 2, (b + 1) / 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    pool = lambda t: F.avg_pool2d(t, 7, 1, 3, count_include_pad=False)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a ** 2
    var_b = pool(b * b) - mu_b ** 2
    cov = pool(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def enrollment_loss(pred, target, weights, region_gain: float = 4.0):
    """L1 + (1 - SSIM), each weighted per pixel by 1 + region_gain * (mouth/eye mask).

    No pretrained networks (no VGG/LPIPS, no discriminator), so the loss must carry the
    sharpness by itself: L1 for colour, 1-SSIM for local structure and contrast (L1 alone
    averages to blur). The mouth and eyes are under 5% of the pixels but carry nearly all
    of the expression (teeth, tongue, lids, gaze), and they are exactly what the warp gets
    wrong; without the extra weight the average loss is dominated by the cheeks, hair and
    background that the warp already renders well.
    """
    w = 1.0 + region_gain * weights
    l1 = ((pred - target).abs().mean(1, keepdim=True) * w).sum() / w.sum()
    ss = ((1 - ssim_map(pred, target)).mean(1, keepdim=True) * w).sum() / w.sum()
    return l1 + ss


# ----------------------------------------------------------------------------- training

def bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_device(device: str) -> None:
    """IdentityError unless torch can train on `device` here."""
    import torch

    if device == "cpu":
        return
    if device != "cuda":
        raise IdentityError(f"unknown device {device!r} (use cpu or cuda)")
    if not torch.cuda.is_available():
        raise IdentityError(f"--device cuda: no CUDA device is usable by this torch ({torch.__version__}); "
                            "train with --device cpu, or install a CUDA build of torch on a GPU machine")


def staging_dir(store: IdentityStore, name: str) -> Path:
    return store.root / f".{check_name(name)}.enroll"


def _video_key(video: Path, max_frames: int | None) -> str:
    st = video.stat()
    h = hashlib.sha256()
    with open(video, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"{st.st_size}:{max_frames}".encode())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, model, opt, step: int, key: str, elapsed: float) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "key": key,
                "model_config": MODEL_CONFIG, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)


def train(builder: PairBuilder, preset: Preset, steps: int, ckpt: Path, key: str,
          bf16: bool, progress: bool = True, seed: int = 0, device: str = "cpu") -> dict:
    """Train (or resume) to `steps`; returns what happened, with the model on the CPU.
    Checkpoints every minute. bf16 autocast applies on the CPU only."""
    import torch
    from tqdm import tqdm

    from .model import Generator

    torch.manual_seed(seed)
    model = Generator(**MODEL_CONFIG).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=1e-4)
    start, elapsed_before = 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("key") == key and state.get("model_config") == MODEL_CONFIG:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
            log.info("resuming enrollment from step %d (checkpoint %s)", start, ckpt)
        else:
            log.info("checkpoint %s is for another video or model: starting afresh", ckpt)
    rng = np.random.default_rng(seed + start)
    n_train = builder.data.n_train
    model.train()
    t0 = last_save = time.monotonic()
    budget = preset.max_minutes * 60
    step, loss_avg, stopped = start, None, "steps"
    bar = tqdm(total=steps, initial=start, desc="training", unit="step", disable=not progress)
    try:
        while step < steps:
            if time.monotonic() - t0 > budget:
                stopped = "time budget"
                break
            lr = preset.lr * (0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0))) * 0.95 + 0.05)
            lr *= min(1.0, (step + 1) / 50)  # warm-up
            for g in opt.param_groups:
                g["lr"] = lr
            idx = rng.integers(0, n_train, preset.batch)
            x, y, w = (torch.from_numpy(t).to(device) for t in builder.batch(idx, rng, preset.augment))
            if preset.crop < RENDER_SIZE:  # offsets on the 8-pixel grid of the net's downsampling
                c = preset.crop
                oy, ox = rng.integers(0, (RENDER_SIZE - c) // 8 + 1, 2) * 8
                x, y, w = (t[..., oy:oy + c, ox:ox + c] for t in (x, y, w))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device == "cpu"):
                pred = model(x)
            loss = enrollment_loss(pred.float(), y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # one bad batch must not wreck the run
            opt.step()
            step += 1
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                _save_checkpoint(ckpt, model, opt, step, key, elapsed_before + time.monotonic() - t0)
                last_save = time.monotonic()
    finally:  # interrupted or not: keep what was learnt
        bar.close()
        if step > start:
            _save_checkpoint(ckpt, model, opt, step, key, elapsed_before + time.monotonic() - t0)
    model = model.cpu().eval()
    return {"model": model, "start_step": start, "steps": step, "target_steps": steps, "stopped": stopped,
            "train_seconds": round(time.monotonic() - t0, 1),
            "total_train_seconds": round(elapsed_before + time.monotonic() - t0, 1),
            "final_loss": None if loss_avg is None else round(loss_avg, 5)}


# ----------------------------------------------------------------------------- bundle

def add_int8_model(staging: Path, builder: PairBuilder) -> dict:
    """Quantize the exported generator in `staging`; keep the int8 file only if its quality
    check passes. Returns the check (with "model" set if kept). Never fails the enrollment:
    the int8 model is an optimisation, and fp32 still runs without it."""
    from .quantize import CALIBRATION_FRAMES, CHECK_FRAMES, INT8_FILE, quality_check, quantize
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
                 model, info: dict, source: Path, preset_name: str, eval_report: dict | None):
    import torch

    from .model import IN_CHANNELS, export_onnx

    with store.new_bundle(name) as staging:
        cv2.imwrite(str(staging / "reference.png"), cv2.cvtColor(builder.reference, cv2.COLOR_RGB2BGR))
        np.save(staging / "neutral.npy", builder.neutral.astype(np.float32))
        export_onnx(model, staging / MODEL_FILE)
        torch.save({"model": model.state_dict(), "model_config": MODEL_CONFIG}, staging / WEIGHTS_FILE)
        files = ["reference.png", "neutral.npy", MODEL_FILE, WEIGHTS_FILE]
        int8 = add_int8_model(staging, builder)
        if int8.get("model"):
            files.append(int8["model"])
        if eval_report is not None:
            from .evaluate import write_report

            write_report(eval_report, staging / EVAL_FILE, staging / "eval.html", f"{name}: enrollment evaluation")
            files += [EVAL_FILE, "eval.html"]
        d = builder.data
        x0, y0, side = d.box
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "display_name": display_name,
            "engine": "neural",
            "reference_image": "reference.png",
            "neutral_landmarks": "neutral.npy",
            "crop": [round(x0), round(y0), round(x0 + side), round(y0 + side)],
            "consent": consent.__dict__,
            "provenance": {"source": source.name, "source_path": str(source.resolve()),
                           "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "tool": "avatar enroll"},
            "neural": {
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
                "eval": EVAL_FILE if eval_report is not None else None,
                "int8": int8,
            },
        }
        store.publish(staging, manifest, files)
    return store.load(name)


def enroll(store: IdentityStore, video: str | os.PathLike, name: str, consent: Consent,
           display_name: str | None = None, preset: str = "quick", steps: int | None = None,
           max_frames: int | None = None, overwrite: bool = False, fresh: bool = False,
           bf16: bool | None = None, evaluate: bool = True, progress: bool = True,
           device: str = "cpu", resolution: int = RENDER_SIZE) -> tuple:
    """Enroll `name` from a self-scan video. Returns (Identity, summary dict)."""
    check_name(name)
    Consent.from_dict(consent.__dict__)
    if preset not in PRESETS:
        raise IdentityError(f"unknown preset {preset!r} (use {', '.join(PRESETS)})")
    check_device(device)
    if resolution != RENDER_SIZE:
        raise IdentityError(f"--resolution {resolution}: only {RENDER_SIZE}² output is built so far "
                            "(the warp engine, bundles and server all work at that size)")
    if steps is not None and steps < 1:
        raise IdentityError("--steps must be at least 1")
    video = Path(video)
    if not video.is_file():
        raise IdentityError(f"{video}: no such file")
    stage = staging_dir(store, name)
    ckpt = stage / "checkpoint.pt"
    if store.exists(name) and not overwrite:
        prev = json.loads((store.path(name) / "manifest.json").read_text())
        if not (prev.get("engine") == "neural" and ckpt.is_file()):
            raise IdentityError(f"identity {name!r} already exists (use --overwrite to replace it)")
    if fresh and stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    n_steps = steps if steps is not None else p.steps
    use_bf16 = bf16_supported() if bf16 is None else bf16
    t_start = time.monotonic()
    key = _video_key(video, max_frames)
    data = extract(video, max_frames, progress)
    t_extract = time.monotonic() - t_start
    builder = PairBuilder(data)
    log.info("enrolling %r: %d frames with a face (%d train, %d held out), reference frame %d, device %s, "
             "bf16=%s", name, len(data.crops), data.n_train, len(data.crops) - data.n_train,
             int(data.frame_index[data.reference]), device, use_bf16 and device == "cpu")
    info = train(builder, p, n_steps, ckpt, key, use_bf16, progress, device=device)
    report = None
    if evaluate and data.n_train < len(data.crops):
        from .evaluate import evaluate_holdout
        from .runtime import TorchRuntime

        report = evaluate_holdout(builder, TorchRuntime(info["model"]), progress=progress)
    identity = write_bundle(store, name, display_name or name, consent, builder, info["model"], info,
                            video, preset, report)
    summary = {k: v for k, v in info.items() if k != "model"}
    summary.update(extract_seconds=round(t_extract, 1), total_seconds=round(time.monotonic() - t_start, 1),
                   bf16=use_bf16, preset=preset, eval=report["summary"] if report else None,
                   int8=identity.manifest["neural"]["int8"], checkpoint=str(ckpt))
    return identity, summary
