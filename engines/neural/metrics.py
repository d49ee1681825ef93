"""Quality metrics of rendered faces, one definition each (evaluation and the int8 check).

    psnr, ssim, l1     against the ground-truth crop (self-reenactment on held-out frames)
    akd                landmarks re-extracted from the output: mean 2-D distance to the
                       driving landmarks over the inter-ocular distance (lower is better)
    mouth_corr,        Pearson correlation of the output's mouth / eye openness with the
    eye_corr           driver's, over the frames
    flicker            mean |(out_t - out_t-1) - (gt_t - gt_t-1)| in 0..255 grey levels
                       (without ground truth: mean |out_t - out_t-1|)
"""
from __future__ import annotations

import cv2
import numpy as np

from ..landmarks import FaceLandmarker, eye_openness, inter_ocular, mouth_openness


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM (11x11 Gaussian, sigma 1.5), mean over pixels and RGB channels."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda t: cv2.GaussianBlur(t, (11, 11), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(m.mean())


def _corr(a: list, b: list) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def engine_metrics(outputs: list[np.ndarray], driving: list[np.ndarray], truth: list[np.ndarray] | None,
                   consecutive: list[bool], landmarker: FaceLandmarker) -> dict:
    """Every metric above for one engine's outputs; psnr, ssim and l1 only with `truth`."""
    m: dict = {}
    if truth is not None:
        m["psnr"] = float(np.mean([psnr(o, t) for o, t in zip(outputs, truth)]))
        m["ssim"] = float(np.mean([ssim(o, t) for o, t in zip(outputs, truth)]))
        m["l1"] = float(np.mean([np.abs(o.astype(np.float32) - t).mean() / 255 for o, t in zip(outputs, truth)]))
    m.update(_landmark_metrics(outputs, driving, landmarker))
    m["flicker"] = flicker(outputs, truth, consecutive)
    return m


def _landmark_metrics(outputs: list[np.ndarray], driving: list[np.ndarray], landmarker: FaceLandmarker) -> dict:
    """AKD, the share of outputs with a face, and mouth/eye openness correlation."""
    akd, mo, md, eo, ed = [], [], [], [], []
    for o, d in zip(outputs, driving):
        p = landmarker(o)
        if p is None:
            continue
        akd.append(np.linalg.norm(p[:, :2] - d[:, :2], axis=1).mean() / max(inter_ocular(d), 1e-6))
        mo.append(mouth_openness(p)), md.append(mouth_openness(d))
        eo.append(eye_openness(p)), ed.append(eye_openness(d))
    return {"akd": float(np.mean(akd)) if akd else None, "face_detected": len(akd) / max(len(outputs), 1),
            "mouth_corr": _corr(mo, md), "eye_corr": _corr(eo, ed)}


def flicker(outputs: list[np.ndarray], truth: list[np.ndarray] | None, consecutive: list[bool]) -> float | None:
    """Frame-to-frame change the ground truth does not have (all change without it), over
    consecutive frames only: a jump across lost frames is not flicker."""
    flick = []
    for t in range(1, len(outputs)):
        if not consecutive[t]:
            continue
        do = outputs[t].astype(np.float32) - outputs[t - 1]
        if truth is not None:
            do -= truth[t].astype(np.float32) - truth[t - 1]
        flick.append(np.abs(do).mean())
    return float(np.mean(flick)) if flick else None
