"""Neural engine against warp engine on the same frames: self-reenactment on an
enrollment's held-out frames (with ground truth), or cross-reenactment of another driving
video (without). The metrics are metrics.py's; this module picks the frames, runs both
engines and writes the JSON + HTML report with a frame strip.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..landmarks import FaceLandmarker
from .metrics import engine_metrics

STRIP_FRAMES = 4


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


@dataclass
class Rendered:
    """Both engines' outputs for the same frames, with what drove them."""
    warps: list = field(default_factory=list)
    neurals: list = field(default_factory=list)
    points: list = field(default_factory=list)  # the target landmarks of each frame
    truth: list | None = field(default_factory=list)  # None without ground truth
    consecutive: list = field(default_factory=list)  # frame follows the previous one without a gap
    drivers: list = field(default_factory=list)
    kind: str = ""


def evaluate_identity(identity, driving: Path | None = None, max_frames: int | None = None,
                      backend: str = "auto", progress: bool = True) -> dict:
    """Evaluate a neural identity: on its enrollment video's held-out frames (self-reenactment,
    with ground truth), or reenacting another driving video (no ground truth)."""
    from ..identity import IdentityError
    from .runtime import NeuralRenderer

    if identity.engine != "neural":
        raise IdentityError(f"identity {identity.name!r} uses the {identity.engine} engine; "
                            "eval compares a neural identity against the warp")
    renderer = NeuralRenderer(identity, prefer=backend)
    if driving is None:
        r = _render_holdout(identity, renderer, max_frames, progress)
    else:
        r = _render_driven(identity, renderer, Path(driving), max_frames, progress)
    if len(r.warps) < 2:
        raise IdentityError("fewer than 2 frames with a face to evaluate")
    report = evaluate_frames(r.warps, r.neurals, r.points, r.truth, r.consecutive, drivers=r.drivers)
    report["kind"] = r.kind
    report["runtime"] = renderer.runtime.name
    report["identity"] = identity.name
    report["strip_png_base64"] = report.pop("strip")
    return report


def _render_holdout(identity, renderer, max_frames: int | None, progress: bool) -> Rendered:
    """The held-out frames of the enrollment video, cropped with the enrollment's box: the
    ground truth for each is the crop itself."""
    from tqdm import tqdm

    from ..identity import IdentityError, crop_with_box, points_to_crop
    from .data import read_frames

    neural_info = identity.manifest.get("neural") or {}
    source = Path(identity.manifest.get("provenance", {}).get("source_path", ""))
    span = neural_info.get("holdout_frames")
    if not span:
        raise IdentityError(f"identity {identity.name!r} has no held-out frames recorded; use --driving")
    if not source.is_file():
        raise IdentityError(f"the enrollment video {source} is gone; use --driving VIDEO")
    x0, y0, side = neural_info["box"]
    start, end = span
    if max_frames:
        end = min(end, start + max_frames - 1)
    r = Rendered(kind="self-reenactment, held-out frames of the enrollment video")
    prev_i = None
    with FaceLandmarker(static=False) as lm:
        for i, rgb in enumerate(tqdm(read_frames(source, end + 1), desc="eval", unit="frame",
                                     total=end + 1, disable=not progress)):
            if i < start:
                continue
            p = lm(rgb)
            if p is None:
                continue
            p = points_to_crop(p, x0, y0, side)
            if prev_i != i - 1:
                renderer.reset()
            r.neurals.append(renderer.render(p))
            crop = crop_with_box(rgb, x0, y0, side)
            r.consecutive.append(prev_i == i - 1)
            r.warps.append(renderer.last_warp), r.points.append(p)
            r.truth.append(crop), r.drivers.append(crop)
            prev_i = i
    return r


def _render_driven(identity, renderer, driving: Path, max_frames: int | None, progress: bool) -> Rendered:
    """Another video's motion retargeted onto the identity, as a live session does (no ground truth)."""
    from tqdm import tqdm

    from ..retarget import Retargeter
    from .data import read_frames

    r = Rendered(truth=None, kind=f"cross-reenactment driven by {driving.name} (no ground truth)")
    retarget = Retargeter(identity.neutral)
    last_ok = False
    with FaceLandmarker(static=False) as lm:
        for i, rgb in enumerate(tqdm(read_frames(driving, max_frames or 300), desc="eval",
                                     unit="frame", disable=not progress)):
            p = lm(rgb)
            target = retarget.update(p, i / 30.0)
            if p is None:
                renderer.reset()
                last_ok = False
                continue
            r.consecutive.append(last_ok)
            last_ok = True
            r.neurals.append(renderer.render(target)), r.warps.append(renderer.last_warp)
            r.points.append(target), r.drivers.append(rgb)
    return r
