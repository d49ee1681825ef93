"""Enrollment training: the loss, the loop, checkpoints, and whether bf16 or a device can
be used here.

Progress is checkpointed to the store's work folder for the identity (<root>/.<name>.enroll/)
about once a minute; rerunning an interrupted enrollment (same video, same consent) resumes
from the checkpoint. Publishing the identity removes the folder: a finished enrollment is
an identity, and is replaced only on request (--overwrite), by training afresh.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from ..identity import RENDER_SIZE, Consent, IdentityError
from .config import MODEL_CONFIG, Preset
from .data import PairBuilder

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 60.0
GRAD_CLIP = 1.0


def ssim_map(a, b):
    """Per-pixel SSIM of (N, C, H, W) tensors in [-1, 1], 7x7 windows (cut at the border)."""
    import torch

    a, b = (a + 1) / 2, (b + 1) / 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b, aa, bb, ab = box_mean(torch.cat([a, b, a * a, b * b, a * b], 1)).chunk(5, 1)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def box_mean(x, k: int = 7):
    """The mean of each k x k window of (N, C, H, W) x, over the pixels inside the image: what
    avg_pool2d(x, k, 1, k // 2, count_include_pad=False) gives, as one depthwise convolution.
    avg_pool2d's CPU kernel took 29% of a training step's time; this takes a tenth of that."""
    import torch.nn.functional as F

    c = x.shape[1]
    box = x.new_ones(1, 1, k, k) / (k * k)
    count = F.conv2d(x.new_ones(1, 1, *x.shape[2:]), box, padding=k // 2)  # share of the window inside
    return F.conv2d(x, box.expand(c, 1, k, k), padding=k // 2, groups=c) / count


def enrollment_loss(pred, target, weights, region_gain: float = 4.0, mse_gain: float = 2.0):
    """L1 + (1 - SSIM) + mse_gain * squared error, each weighted per pixel by
    1 + region_gain * (mouth/eye mask).

    No pretrained networks (no VGG/LPIPS, no discriminator), so the loss must carry the
    sharpness by itself: L1 for colour, 1-SSIM for local structure and contrast (L1 alone
    averages to blur). The squared error is for what no frame of the scan can settle: where
    a hair outline or jaw edge falls in a pose the scan never showed, L1 settles on one
    guess and the squared error on the mean of the guesses, which is what PSNR scores. At
    mse_gain 2 held-out PSNR rose 24.37 -> 24.64 and 25.58 -> 25.86 dB on two self-scans at
    equal steps, with the mouth region unchanged and no visible blur; 5 gave 24.66 / 25.92
    with the mouth 0.1-0.2 dB lower.

    The mouth and eyes are under 5% of the pixels but carry nearly all of the expression
    (teeth, tongue, lids, gaze), and they are exactly what the warp gets wrong; without the
    extra weight the average loss is dominated by the cheeks, hair and background that the
    warp already renders well.
    """
    w = 1.0 + region_gain * weights
    err = pred - target
    l1 = (err.abs().mean(1, keepdim=True) * w).sum() / w.sum()
    l2 = ((err * err).mean(1, keepdim=True) * w).sum() / w.sum()
    ss = ((1 - ssim_map(pred, target)).mean(1, keepdim=True) * w).sum() / w.sum()
    return l1 + ss + mse_gain * l2


def bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU; emulated bf16 would be slower than fp32."""
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


def enrollment_key(video: Path, max_frames: int | None, consent: Consent) -> dict:
    """What a checkpoint belongs to: the frames trained on and the consent they were given
    under. Only the same enrollment resumes; another video or another consent under the
    same name starts afresh. The consent's granted_at is left out: the CLI stamps every run
    with its own time."""
    return {"source": _video_key(video, max_frames),
            "consent": {k: v for k, v in consent.__dict__.items() if k != "granted_at"}}


def _video_key(video: Path, max_frames: int | None) -> str:
    st = video.stat()
    h = hashlib.sha256()
    with open(video, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"{st.st_size}:{max_frames}".encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, model, opt, step: int, key: dict, elapsed: float) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "key": key,
                "model_config": MODEL_CONFIG, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)


def train(builder: PairBuilder, preset: Preset, steps: int, ckpt: Path, key: dict,
          bf16: bool, progress: bool = True, seed: int = 0, device: str = "cpu", report=None) -> dict:
    """Train (or resume the checkpoint of the same enrollment `key`) to `steps`; returns
    what happened, with the model on the CPU. Checkpoints every minute. bf16 autocast
    applies on the CPU only. report("training", step, steps), if given, at the start and
    after each step."""
    import torch
    from tqdm import tqdm

    from .model import Generator

    torch.manual_seed(seed)
    model = Generator(**MODEL_CONFIG).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=1e-4)
    start, elapsed_before = resume(ckpt, key, model, opt)
    rng = np.random.default_rng(seed + start)
    model.train()
    t0 = last_save = time.monotonic()
    budget = preset.max_minutes * 60
    step, loss_avg, stopped = start, None, "steps"
    bar = tqdm(total=steps, initial=start, desc="training", unit="step", disable=not progress)
    report = report or (lambda stage, done, total: None)
    report("training", step, steps)
    try:
        while step < steps:
            if time.monotonic() - t0 > budget:
                stopped = "time budget"
                break
            progress = max(step / steps, (time.monotonic() - t0) / budget)
            for g in opt.param_groups:
                g["lr"] = learning_rate(preset.lr, progress, step)
            x, y, w = _batch(builder, preset, rng, device)
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
            report("training", step, steps)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save_checkpoint(ckpt, model, opt, step, key, elapsed_before + time.monotonic() - t0)
                last_save = time.monotonic()
    finally:  # interrupted or not: keep what was learnt
        bar.close()
        if step > start:
            save_checkpoint(ckpt, model, opt, step, key, elapsed_before + time.monotonic() - t0)
    model = model.cpu().eval()
    return {"model": model, "start_step": start, "steps": step, "target_steps": steps, "stopped": stopped,
            "train_seconds": round(time.monotonic() - t0, 1),
            "total_train_seconds": round(elapsed_before + time.monotonic() - t0, 1),
            "final_loss": None if loss_avg is None else round(loss_avg, 5)}


def _batch(builder: PairBuilder, preset: Preset, rng: np.random.Generator, device: str):
    """A random batch of training frames as tensors on `device`: inputs, targets, region weights,
    cut to the preset's crop."""
    import torch

    idx = rng.integers(0, builder.data.n_train, preset.batch)
    x, y, w = (torch.from_numpy(t).to(device) for t in builder.batch(idx, rng, preset.augment))
    if preset.crop < RENDER_SIZE:  # offsets on the 8-pixel grid of the net's downsampling
        c = preset.crop
        oy, ox = rng.integers(0, (RENDER_SIZE - c) // 8 + 1, 2) * 8
        x, y, w = (t[..., oy:oy + c, ox:ox + c] for t in (x, y, w))
    return x, y, w


def resume(ckpt: Path, key: dict, model, opt) -> tuple[int, float]:
    """Load a checkpoint of this same enrollment (enrollment_key) into model and opt: (its
    step, its training seconds), or (0, 0.0) to start afresh when there is none or it is
    for other frames, another consent or another model size."""
    import torch

    if not ckpt.is_file():
        return 0, 0.0
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("key") != key or state.get("model_config") != MODEL_CONFIG:
        log.info("checkpoint %s is for another video, consent or model: starting afresh", ckpt)
        return 0, 0.0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    log.info("resuming enrollment from step %d (checkpoint %s)", int(state["step"]), ckpt)
    return int(state["step"]), float(state.get("elapsed", 0.0))


def learning_rate(base: float, progress: float, step: int) -> float:
    """Cosine decay from `base` to 5% of it as `progress` goes from 0 to 1, after a 50-step
    linear warm-up. train() passes the larger of the share of steps done and the share of
    the time budget spent, so a run the time cap will stop (one thread, a busy machine)
    still anneals to the small rate by then, instead of being cut off mid-schedule."""
    lr = base * (0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) * 0.95 + 0.05)
    return lr * min(1.0, (step + 1) / 50)
