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
from .metrics import REGION_PAD, REGIONS, engine_metrics, region_boxes

STRIP_FRAMES = 6  # evenly spaced frames shown in the HTML report
CLOSEUP_WIDTH = 256  # mouth close-ups are scaled to this width
SCORES = ("psnr", "ssim", "mouth_psnr", "mouth_ssim", "eyes_psnr", "eyes_ssim", "l1", "akd", "mouth_corr",
          "eye_corr", "flicker")
BOX_COLOUR = (255, 220, 0)


def _png64(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} image as PNG")
    return base64.b64encode(buf.tobytes()).decode()


def _gain(n, w):
    return None if n is None or w is None else n - w


def _round(v):
    return None if v is None else round(float(v), 4)


def evaluate_frames(warps, neurals, driving_pts, truth, consecutive, drivers=None, progress=False,
                    frame_ids=None) -> dict:
    """Metrics of both engines, frame by frame and in summary, plus a frame strip for the
    HTML (ground truth or driver / warp / neural, and mouth close-ups).

    With `truth` (self-reenactment) `driving_pts` are the ground-truth frames' own
    landmarks: the mouth and eye boxes come from them, the same boxes for both engines.
    `frame_ids` name the frames in the report (the video's frame numbers); by default 0..n-1.
    """
    n = len(warps)
    frame_ids = list(range(n)) if frame_ids is None else [int(i) for i in frame_ids]
    boxes = region_boxes(driving_pts, warps[0].shape)
    with FaceLandmarker(static=True) as lm:
        report = {
            "frames": n,
            "warp": engine_metrics(warps, driving_pts, truth, consecutive, lm, boxes),
            "neural": engine_metrics(neurals, driving_pts, truth, consecutive, lm, boxes),
        }
    w, nn = report["warp"], report["neural"]
    per = {"frame": frame_ids, **{f"{r}_box": [None if b is None else list(b) for b in boxes[r]] for r in REGIONS}}
    for name, m in (("warp", w), ("neural", nn)):
        if "per_frame" in m:
            per[name] = {k: [_round(v) for v in vals] for k, vals in m.pop("per_frame").items()}
    report["per_frame"] = per
    s = {"frames": n}
    for k in SCORES:
        if k in nn:
            s[f"neural_{k}"], s[f"warp_{k}"] = nn[k], w[k]
    if truth is not None:
        s["psnr_gain_db"] = nn["psnr"] - w["psnr"]
        for r in REGIONS:
            s[f"{r}_psnr_gain_db"] = _gain(nn[f"{r}_psnr"], w[f"{r}_psnr"])
            s[f"{r}_ssim_gain"] = _gain(nn[f"{r}_ssim"], w[f"{r}_ssim"])
        s["neural_beats_warp"] = {"psnr_by_2db": s["psnr_gain_db"] >= 2.0, "ssim": nn["ssim"] > w["ssim"],
                                  "akd": None if nn["akd"] is None or w["akd"] is None else nn["akd"] < w["akd"],
                                  "mouth_psnr_by_4db": None if s["mouth_psnr_gain_db"] is None
                                  else s["mouth_psnr_gain_db"] >= 4.0}
    report["summary"] = s
    report["strip"] = _strip(warps, neurals, truth, drivers, boxes["mouth"], frame_ids, per)
    return report


def _strip(warps, neurals, truth, drivers, mouth_boxes, frame_ids, per) -> dict:
    """STRIP_FRAMES evenly spaced frames: rows of base64 PNGs with a caption each.
    The ground truth shows its mouth box; the close-up rows are that box, enlarged."""
    picks = np.linspace(0, len(warps) - 1, min(STRIP_FRAMES, len(warps))).round().astype(int)
    size = warps[0].shape[1::-1]
    first = "ground truth" if truth is not None else "driver"
    rows = {first: [], "warp": [], "neural": []}
    close = {"ground truth mouth": []} if truth is not None else {}  # a driver is another video's geometry
    close.update({"warp mouth": [], "neural mouth": []})
    for i in picks:
        top = truth[i] if truth is not None else (np.zeros_like(warps[0]) if drivers is None
                                                  else cv2.resize(drivers[i], size, interpolation=cv2.INTER_AREA))
        box = mouth_boxes[i]
        marked = top.copy()
        if box is not None and truth is not None:
            cv2.rectangle(marked, box[:2], (box[2] - 1, box[3] - 1), BOX_COLOUR, 1)
        cap = f"frame {frame_ids[i]}"
        rows[first].append((_png64(marked), cap + (", mouth box" if box is not None and truth is not None else "")))
        for name, img in (("warp", warps[i]), ("neural", neurals[i])):
            rows[name].append((_png64(img), _caption(per, name, i)))
        for name, img in (("ground truth mouth", top), ("warp mouth", warps[i]), ("neural mouth", neurals[i])):
            if name not in close:
                continue
            if box is None:
                close[name].append(None)
                continue
            x0, y0, x1, y1 = box
            k = CLOSEUP_WIDTH / (x1 - x0)
            crop = cv2.resize(img[y0:y1, x0:x1], (CLOSEUP_WIDTH, max(1, round((y1 - y0) * k))),
                              interpolation=cv2.INTER_NEAREST)
            eng = name.split()[0]
            close[name].append((_png64(crop), cap if eng == "ground" else _caption(per, eng, i, "mouth_")))
    if not any(c is not None for r in close.values() for c in r):
        close = {}
    return {"frames": [frame_ids[i] for i in picks], "rows": {**rows, **close}}


def _caption(per: dict, engine: str, i: int, region: str = "") -> str:
    """"PSNR 22.1 dB, SSIM 0.845" of one engine on one frame (the whole frame, or a region)."""
    m = per.get(engine)
    if not m or m.get(f"{region}psnr", [None])[i] is None:
        return engine
    return f"{engine}: PSNR {m[f'{region}psnr'][i]:.1f} dB, SSIM {m[f'{region}ssim'][i]:.3f}"


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
                             drivers=truth, frame_ids=[d.frame_index[i] for i in idx])
    report["kind"] = "self-reenactment, held-out frames"
    report["frame_range"] = [int(d.frame_index[idx[0]]), int(d.frame_index[idx[-1]])]
    report["runtime"] = runtime.name
    return report


def write_report(report: dict, json_path: Path, html_path: Path, title: str) -> None:
    """The report as JSON (without images) and as one self-contained HTML page (no scripts,
    images inline): the scores side by side, then the frame strip."""
    strip = report.get("strip") or {}
    data = {k: v for k, v in report.items() if k not in ("strip", "strip_png_base64")}
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    s = data["summary"]
    scores = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(s.get(f'warp_{k}'))}</td><td>{_fmt(s.get(f'neural_{k}'))}</td>"
        f"<td>{_fmt(_gain(s.get(f'neural_{k}'), s.get(f'warp_{k}')))}</td></tr>"
        for k in SCORES if f"neural_{k}" in s)
    rest = "".join(f"<tr><th>{html.escape(k)}</th><td colspan=3>{_fmt(v)}</td></tr>" for k, v in s.items()
                   if not k.startswith(("neural_", "warp_")) or k == "neural_beats_warp")
    pad = f"{REGION_PAD:.0%}"
    head = "".join(f"<th>frame {f}</th>" for f in strip.get("frames", []))
    body = "".join(f"<tr><th>{html.escape(name)}</th>{''.join(_cell(c, name) for c in cells)}</tr>"
                   for name, cells in strip.get("rows", {}).items())
    if "neural_mouth_psnr" in s:
        note = (f"<p>mouth: the box around the ground truth's outer lip contour, {pad} of the mouth width wider "
                f"on every side; eyes: one box around both eyes' lids, {pad} of an eye's width wider. Both "
                "engines are scored in the same boxes; means over the frames.</p>")
    else:
        note = f"<p>mouth close-ups: the box around the target's outer lips, {pad} of the mouth width wider.</p>"
    html_path.write_text(
        "<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>"
        "<style>body{font:14px sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left;vertical-align:top}"
        "table.scores td{text-align:right;font-variant-numeric:tabular-nums}"
        "figure{margin:0}img{display:block;max-width:256px}figcaption{font-size:12px;color:#444}</style>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(data.get('kind', '')))}; "
        f"{data['frames']} frames; runtime {html.escape(str(data.get('runtime')))}</p>"
        "<table class=scores><tr><th>metric</th><th>warp</th><th>neural</th><th>neural − warp</th></tr>"
        f"{scores}{rest}</table>"
        f"{note}"
        f"<h2>frames</h2><table class=strip><tr><th></th>{head}</tr>{body}</table>\n", encoding="utf-8")


def _cell(c, row: str) -> str:
    if c is None:
        return "<td>no face</td>"
    png, caption = c
    return (f'<td><figure><img src="data:image/png;base64,{png}" alt="{html.escape(row)}, '
            f'{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure></td>')


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
    frame_ids: list = field(default_factory=list)  # the video's frame number of each frame
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
    report = evaluate_frames(r.warps, r.neurals, r.points, r.truth, r.consecutive, drivers=r.drivers,
                             frame_ids=r.frame_ids)
    report["kind"] = r.kind
    report["runtime"] = renderer.runtime.name
    report["identity"] = identity.name
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
            r.truth.append(crop), r.drivers.append(crop), r.frame_ids.append(i)
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
            r.points.append(target), r.drivers.append(rgb), r.frame_ids.append(i)
    return r
