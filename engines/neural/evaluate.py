"""Quality metrics for the neural engine against the warp engine on the same frames.

    psnr, ssim, l1     against the ground-truth crop (self-reenactment on held-out frames)
    akd                landmarks re-extracted from the output: mean 2-D distance to the
                       driving landmarks over the inter-ocular distance (lower is better)
    mouth_corr,        Pearson correlation of the output's mouth / eye openness with the
    eye_corr           driver's, over the frames
    flicker            mean |(out_t - out_t-1) - (gt_t - gt_t-1)| in 0..255 grey levels
                       (without ground truth: mean |out_t - out_t-1|)
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import cv2
import numpy as np

from ..landmarks import FaceLandmarker, eye_openness, inter_ocular, mouth_openness

STRIP_FRAMES = 4


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
    m: dict = {}
    if truth is not None:
        m["psnr"] = float(np.mean([psnr(o, t) for o, t in zip(outputs, truth)]))
        m["ssim"] = float(np.mean([ssim(o, t) for o, t in zip(outputs, truth)]))
        m["l1"] = float(np.mean([np.abs(o.astype(np.float32) - t).mean() / 255 for o, t in zip(outputs, truth)]))
    akd, mo, md, eo, ed = [], [], [], [], []
    for o, d in zip(outputs, driving):
        p = landmarker(o)
        if p is None:
            continue
        akd.append(np.linalg.norm(p[:, :2] - d[:, :2], axis=1).mean() / max(inter_ocular(d), 1e-6))
        mo.append(mouth_openness(p)), md.append(mouth_openness(d))
        eo.append(eye_openness(p)), ed.append(eye_openness(d))
    m["akd"] = float(np.mean(akd)) if akd else None
    m["face_detected"] = len(akd) / max(len(outputs), 1)
    m["mouth_corr"], m["eye_corr"] = _corr(mo, md), _corr(eo, ed)
    flick = []
    for t in range(1, len(outputs)):
        if not consecutive[t]:
            continue
        do = outputs[t].astype(np.float32) - outputs[t - 1]
        if truth is not None:
            do -= truth[t].astype(np.float32) - truth[t - 1]
        flick.append(np.abs(do).mean())
    m["flicker"] = float(np.mean(flick)) if flick else None
    return m


def _png64(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return base64.b64encode(buf.tobytes()).decode()


def _strip(rows: list[list[np.ndarray]]) -> list[str]:
    return [_png64(np.concatenate(r, axis=1)) for r in rows]


def evaluate_frames(warps, neurals, driving_pts, truth, consecutive, drivers=None, progress=False) -> dict:
    """Metrics of both engines plus a frame strip (driver | warp | neural | ground truth)."""
    with FaceLandmarker(static=True) as lm:
        report = {
            "frames": len(warps),
            "warp": engine_metrics(warps, driving_pts, truth, consecutive, lm),
            "neural": engine_metrics(neurals, driving_pts, truth, consecutive, lm),
        }
    w, n = report["warp"], report["neural"]
    s = {"frames": len(warps)}
    for k in ("psnr", "ssim", "l1", "akd", "mouth_corr", "eye_corr", "flicker"):
        if k in n:
            s[f"neural_{k}"], s[f"warp_{k}"] = n[k], w[k]
    if truth is not None:
        s["psnr_gain_db"] = n["psnr"] - w["psnr"]
        s["neural_beats_warp"] = {"psnr_by_2db": s["psnr_gain_db"] >= 2.0, "ssim": n["ssim"] > w["ssim"],
                                  "akd": None if n["akd"] is None or w["akd"] is None else n["akd"] < w["akd"]}
    report["summary"] = s
    picks = np.linspace(0, len(warps) - 1, min(STRIP_FRAMES, len(warps))).round().astype(int)
    blank = np.zeros_like(warps[0])
    rows = []
    for i in picks:
        drv = blank if drivers is None else cv2.resize(drivers[i], warps[0].shape[1::-1])
        rows.append([drv, warps[i], neurals[i], truth[i] if truth is not None else blank])
    report["strip"] = _strip(rows)
    return report


def evaluate_holdout(builder, runtime, progress: bool = True) -> dict:
    """Self-reenactment on the held-out frames of an enrollment (never trained on)."""
    from tqdm import tqdm

    from .model import to_image

    d = builder.data
    idx = list(range(d.n_train, len(d.crops)))
    neurals = [to_image(runtime.run(builder.inputs(np.array([i]))))
               for i in tqdm(idx, desc="eval", unit="frame", disable=not progress)]
    warps = [builder.warps[i] for i in idx]
    truth = [d.crops[i] for i in idx]
    consecutive = [False] + [d.frame_index[i] == d.frame_index[i - 1] + 1 for i in idx[1:]]
    report = evaluate_frames(warps, neurals, [d.points[i] for i in idx], truth, consecutive,
                             drivers=truth)
    report["kind"] = "self-reenactment, held-out frames"
    report["frame_range"] = [int(d.frame_index[idx[0]]), int(d.frame_index[idx[-1]])]
    report["runtime"] = runtime.name
    strip = report.pop("strip")
    report["strip_png_base64"] = strip
    return report


def write_report(report: dict, json_path: Path, html_path: Path, title: str) -> None:
    strip = report.get("strip_png_base64", [])
    data = {k: v for k, v in report.items() if k != "strip_png_base64"}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in data["summary"].items())
    imgs = "".join(f'<img src="data:image/png;base64,{s}" alt="frame strip">' for s in strip)
    html_path.write_text(
        "<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>"
        "<style>body{font:14px sans-serif;margin:2em}td{padding:2px 12px}img{display:block;margin:4px 0}</style>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(data.get('kind', '')))}; "
        f"{data['frames']} frames; runtime {html.escape(str(data.get('runtime')))}</p>"
        f"<table>{rows}</table><h2>driver | warp | neural | ground truth</h2>{imgs}\n")


def _fmt(v) -> str:
    return html.escape(f"{v:.4f}" if isinstance(v, float) else json.dumps(v))


def evaluate_identity(identity, driving: Path | None = None, max_frames: int | None = None,
                      backend: str = "auto", progress: bool = True) -> dict:
    """Evaluate a neural identity: on its enrollment video's held-out frames (self-reenactment,
    with ground truth), or reenacting another driving video (no ground truth)."""
    from tqdm import tqdm

    from ..identity import IdentityError, crop_matrix, crop_with_box
    from ..retarget import Retargeter
    from .enroll import read_video
    from .runtime import NeuralRenderer

    if identity.engine != "neural":
        raise IdentityError(f"identity {identity.name!r} uses the {identity.engine} engine; "
                            "eval compares a neural identity against the warp")
    neural_info = identity.manifest.get("neural") or {}
    renderer = NeuralRenderer(identity, prefer=backend)
    warps, neurals, pts_list, truth, consecutive, drivers = [], [], [], [], [], []
    if driving is None:
        source = Path(identity.manifest.get("provenance", {}).get("source_path", ""))
        span = neural_info.get("holdout_frames")
        if not span:
            raise IdentityError(f"identity {identity.name!r} has no held-out frames recorded; use --driving")
        if not source.is_file():
            raise IdentityError(f"the enrollment video {source} is gone; use --driving VIDEO")
        x0, y0, side = neural_info["box"]
        m = crop_matrix(x0, y0, side)
        start, end = span
        if max_frames:
            end = min(end, start + max_frames - 1)
        prev_i = None
        with FaceLandmarker(static=False) as lm:
            for i, rgb in enumerate(tqdm(read_video(source, end + 1), desc="eval", unit="frame",
                                         total=end + 1, disable=not progress)):
                if i < start:
                    continue
                p = lm(rgb)
                if p is None:
                    continue
                p = p.astype(np.float64)
                p[:, :2] = p[:, :2] * m[0, 0] + m[:, 2]
                p[:, 2] *= m[0, 0]
                p = p.astype(np.float32)
                if prev_i != i - 1:
                    renderer.reset()
                neurals.append(renderer.render(p))
                crop = crop_with_box(rgb, x0, y0, side)
                consecutive.append(prev_i == i - 1)
                warps.append(renderer.last_warp), pts_list.append(p)
                truth.append(crop), drivers.append(crop)
                prev_i = i
        kind = "self-reenactment, held-out frames of the enrollment video"
    else:
        retarget = Retargeter(identity.neutral)
        last_ok = False
        with FaceLandmarker(static=False) as lm:
            for i, rgb in enumerate(tqdm(read_video(Path(driving), max_frames or 300), desc="eval",
                                         unit="frame", disable=not progress)):
                p = lm(rgb)
                target = retarget.update(p, i / 30.0)
                if p is None:
                    renderer.reset()
                    last_ok = False
                    continue
                consecutive.append(last_ok)
                last_ok = True
                neurals.append(renderer.render(target)), warps.append(renderer.last_warp)
                pts_list.append(target), drivers.append(rgb)
        truth = None
        kind = f"cross-reenactment driven by {Path(driving).name} (no ground truth)"
    if len(warps) < 2:
        raise IdentityError("fewer than 2 frames with a face to evaluate")
    report = evaluate_frames(warps, neurals, pts_list, truth, consecutive, drivers=drivers)
    report["kind"] = kind
    report["runtime"] = renderer.runtime.name
    report["identity"] = identity.name
    report["strip_png_base64"] = report.pop("strip")
    return report
