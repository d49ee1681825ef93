"""Neural engine against warp engine on the same frames: self-reenactment on an
enrollment's held-out frames (with ground truth), or cross-reenactment of another driving
video (without). A warp identity (the demo) is evaluated alone, on a driving video. The
metrics are metrics.py's; this module picks the frames, runs the engines and writes the
JSON + HTML report with a frame strip.
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
from .metrics import (IDENTITY_EVERY, POSE_THIRDS, REGION_PAD, REGIONS, engine_metrics, identity_distances,
                      pose_novelty, pose_thirds, region_boxes)

STRIP_FRAMES = 6  # evenly spaced frames shown in the HTML report
CLOSEUP_WIDTH = 256  # mouth close-ups are scaled to this width
SCORES = ("psnr", "ssim", "mouth_psnr", "mouth_ssim", "eyes_psnr", "eyes_ssim",
          *(f"psnr_{t}_pose" for t in POSE_THIRDS), "l1", "akd", "mouth_corr", "eye_corr", "flicker",
          "identity_distance", "driver_distance")
BOX_COLOUR = (255, 220, 0)
IDENTITY_GOAL, DRIVER_GOAL = 0.40, 0.6  # issue #13: the avatar is the identity, not the driver


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
                    frame_ids=None, reference=None, marker=None, train_points=None) -> dict:
    """Metrics of both engines (the warp alone when `neurals` is None), frame by frame and in
    summary, plus a frame strip for the HTML (ground truth or driver / warp / neural, and
    mouth close-ups).

    With `truth` (self-reenactment) `driving_pts` are the ground-truth frames' own
    landmarks: the mouth and eye boxes come from them, the same boxes for both engines.
    `frame_ids` name the frames in the report (the video's frame numbers); by default 0..n-1.
    With `reference` (the identity's image) the identity distances are measured too.
    `marker` (engines.watermark.Marker) marks the strip's rendered frames, as every
    synthesized frame that leaves this program is marked; the metrics use them unmarked.
    With `train_points` (the landmarks of the frames the generator was trained on) and
    `truth`, PSNR is also split by how far each frame's head pose is from every training
    pose (metrics.pose_novelty).
    """
    n = len(warps)
    frame_ids = list(range(n)) if frame_ids is None else [int(i) for i in frame_ids]
    engines = {"warp": warps} if neurals is None else {"warp": warps, "neural": neurals}
    boxes = region_boxes(driving_pts, warps[0].shape)
    with FaceLandmarker(static=True) as lm:
        report = {"frames": n, **{name: engine_metrics(out, driving_pts, truth, consecutive, lm, boxes)
                                  for name, out in engines.items()}}
    novelty = None
    if truth is not None and train_points is not None:
        novelty = pose_novelty(train_points, driving_pts)
        report["pose_novelty_thirds"] = _psnr_by_pose(report, engines, novelty)
    per = {"frame": frame_ids, **{f"{r}_box": [None if b is None else list(b) for b in boxes[r]] for r in REGIONS}}
    for name in engines:
        if "per_frame" in report[name]:
            per[name] = {k: [_round(v) for v in vals] for k, vals in report[name].pop("per_frame").items()}
    if novelty is not None:
        per["pose_novelty"] = [_round(v) for v in novelty]
    report["per_frame"] = per
    if reference is not None:
        report["identity_distances"] = _identity_figures(report, reference, engines, drivers, frame_ids)
    report["summary"] = _summary(report, engines, truth is not None)
    report["strip"] = _strip(engines, truth, drivers, boxes["mouth"], frame_ids, per, marker)
    return report


def _psnr_by_pose(report: dict, engines: dict, novelty: np.ndarray) -> list[list[float]]:
    """Each engine's psnr_near_pose, psnr_mid_pose and psnr_far_pose (the frames in thirds by
    pose novelty); returns each third's range of novelty. Far poses are what the self-scan
    never showed: a scan that covers them helps there, more training steps least."""
    thirds = [ix for ix in pose_thirds(novelty) if len(ix)]
    for name in engines:
        psnr = np.asarray(report[name]["per_frame"]["psnr"], float)
        report[name].update({f"psnr_{t}_pose": float(psnr[ix].mean()) for t, ix in zip(POSE_THIRDS, thirds)})
    return [[round(float(novelty[ix].min()), 4), round(float(novelty[ix].max()), 4)] for ix in thirds]


def _summary(report: dict, engines: dict, with_truth: bool) -> dict:
    """The figures side by side (neural_X, warp_X), neural's gains and the goals it meets."""
    s = {"frames": report["frames"]}
    for k in SCORES:
        for name in engines:
            if k in report[name]:
                s[f"{name}_{k}"] = report[name][k]
    if "pose_novelty_thirds" in report:
        s["pose_novelty_thirds"] = report["pose_novelty_thirds"]
    fig = report.get("identity_distances")
    if fig is not None:
        s["driver_to_identity_distance"] = fig.get("driver_to_identity")
        s["identity_distance_note"] = fig["note"]
    if with_truth and "neural" in engines:
        nn, w = report["neural"], report["warp"]
        s["psnr_gain_db"] = nn["psnr"] - w["psnr"]
        for r in REGIONS:
            s[f"{r}_psnr_gain_db"] = _gain(nn[f"{r}_psnr"], w[f"{r}_psnr"])
            s[f"{r}_ssim_gain"] = _gain(nn[f"{r}_ssim"], w[f"{r}_ssim"])
        s["neural_beats_warp"] = {"psnr_by_2db": s["psnr_gain_db"] >= 2.0, "ssim": nn["ssim"] > w["ssim"],
                                  "akd": None if nn["akd"] is None or w["akd"] is None else nn["akd"] < w["akd"],
                                  "mouth_psnr_by_4db": None if s["mouth_psnr_gain_db"] is None
                                  else s["mouth_psnr_gain_db"] >= 4.0}
    return s


def _identity_figures(report: dict, reference, engines: dict, drivers, frame_ids) -> dict:
    """metrics.identity_distances, its medians copied into each engine's figures, and a note
    saying what they mean here; without dlib, only the note."""
    from ..identity_distance import EXTRA_HINT, available

    if not available():
        return {"measured": False, "note": f"identity distance: not measured ({EXTRA_HINT})"}
    fig = identity_distances(reference, engines, drivers)
    fig["frames"] = [frame_ids[i] for i in fig.pop("picks")]
    for name in engines:
        report[name].update({k: fig[name][k] for k in ("identity_distance", "driver_distance")})
    return {"measured": True, **fig, "note": _identity_note(fig)}


def _identity_note(fig: dict) -> str:
    base = fig["driver_to_identity"]
    note = (f"dlib 128-D face descriptors, median over {len(fig['frames'])} frames (every {IDENTITY_EVERY}th); "
            f"goal: identity distance <= {IDENTITY_GOAL:.2f}, driver distance >= {DRIVER_GOAL}")
    if not fig["reference_found"]:
        return note + "; no face found in the identity's reference image: nothing to measure"
    if base is not None and base < DRIVER_GOAL:
        note += (f"; the driver and the identity are {base:.2f} apart, under dlib's same-person threshold "
                 f"{DRIVER_GOAL}: a driver distance >= {DRIVER_GOAL} cannot be expected here")
    return note


def _strip(engines, truth, drivers, mouth_boxes, frame_ids, per, marker=None) -> dict:
    """STRIP_FRAMES evenly spaced frames: rows of base64 PNGs with a caption each.
    The ground truth shows its mouth box; the close-up rows are that box, enlarged, of the
    rendered frames as shown (marked by `marker` if given)."""
    warps = engines["warp"]
    picks = np.linspace(0, len(warps) - 1, min(STRIP_FRAMES, len(warps))).round().astype(int)
    size = warps[0].shape[1::-1]
    first = "ground truth" if truth is not None else "driver"
    rows = {first: [], **{name: [] for name in engines}}
    close = {"ground truth mouth": []} if truth is not None else {}  # a driver is another video's geometry
    close.update({f"{name} mouth": [] for name in engines})
    for i in picks:
        top = truth[i] if truth is not None else (np.zeros_like(warps[0]) if drivers is None
                                                  else cv2.resize(drivers[i], size, interpolation=cv2.INTER_AREA))
        box = mouth_boxes[i]
        marked = top.copy()
        if box is not None and truth is not None:
            cv2.rectangle(marked, box[:2], (box[2] - 1, box[3] - 1), BOX_COLOUR, 1)
        cap = f"frame {frame_ids[i]}"
        rows[first].append((_png64(marked), cap + (", mouth box" if box is not None and truth is not None else "")))
        shown = {name: out[i] if marker is None else marker(out[i]) for name, out in engines.items()}
        for name, img in shown.items():
            rows[name].append((_png64(img), _caption(per, name, i)))
        images = {"ground truth mouth": top, **{f"{name} mouth": img for name, img in shown.items()}}
        for name, img in images.items():
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


def evaluate_holdout(builder, runtime, progress: bool = True, marker=None) -> dict:
    """Self-reenactment on the held-out frames of an enrollment (never trained on); `marker`
    marks the report's rendered frames (evaluate_frames)."""
    from tqdm import tqdm

    from .model import keep_warp_detail, to_image

    d = builder.data
    idx = list(range(d.n_train, len(d.crops)))
    neurals = [keep_warp_detail(to_image(runtime.run(builder.inputs(np.array([i])))), builder.warps[i], d.points[i])
               for i in tqdm(idx, desc="eval", unit="frame", disable=not progress)]
    warps = [builder.warps[i] for i in idx]
    truth = [d.crops[i] for i in idx]
    consecutive = [False] + [d.frame_index[i] == d.frame_index[i - 1] + 1 for i in idx[1:]]
    report = evaluate_frames(warps, neurals, [d.points[i] for i in idx], truth, consecutive,
                             drivers=truth, frame_ids=[d.frame_index[i] for i in idx], marker=marker,
                             train_points=d.points[:d.n_train])
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
    if "pose_novelty_thirds" in s:
        note += ("<p>psnr_near_pose / _mid_pose / _far_pose: the frames in thirds by how far the head's pose is "
                 "from the nearest training frame's (pose_novelty_thirds: mean distance of the rigid head points, "
                 "in eye distances). Far poses are ones the self-scan never showed.</p>")
    html_path.write_text(
        "<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>"
        "<style>body{font:14px sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left;vertical-align:top}"
        "table.scores td{text-align:right;font-variant-numeric:tabular-nums}table.scores td[colspan]{text-align:left}"
        "figure{margin:0}img{display:block;max-width:256px}figcaption{font-size:12px;color:#444}</style>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(data.get('kind', '')))}; "
        f"{data['frames']} frames; runtime {html.escape(str(data.get('runtime')))}</p>"
        f"{_scores_table(s)}"
        f"{note}"
        f"<h2>frames</h2><table class=strip><tr><th></th>{head}</tr>{body}</table>\n", encoding="utf-8")


def _scores_table(s: dict) -> str:
    """The summary as a table: one column per engine (and neural's gain over the warp when
    both ran), then the figures that belong to neither."""
    both = any(k.startswith("neural_") for k in s)
    head = ("warp", "neural", "neural − warp") if both else ("warp",)
    rows = ""
    for k in SCORES:
        if f"warp_{k}" in s:
            w, n = s[f"warp_{k}"], s.get(f"neural_{k}")
            cells = (w, n, _gain(n, w)) if both else (w,)
            rows += f"<tr><th>{html.escape(k)}</th>{''.join(f'<td>{_fmt(v)}</td>' for v in cells)}</tr>"
    rows += "".join(f"<tr><th>{html.escape(k)}</th><td colspan={len(head)}>{_fmt(v)}</td></tr>"
                    for k, v in s.items() if not k.startswith(("neural_", "warp_")) or k == "neural_beats_warp")
    return (f"<table class=scores><tr><th>metric</th>{''.join(f'<th>{h}</th>' for h in head)}</tr>"
            f"{rows}</table>")


def _cell(c, row: str) -> str:
    if c is None:
        return "<td>no face</td>"
    png, caption = c
    return (f'<td><figure><img src="data:image/png;base64,{png}" alt="{html.escape(row)}, '
            f'{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure></td>')


def _fmt(v) -> str:
    return html.escape(f"{v:.4f}" if isinstance(v, float) else v if isinstance(v, str) else json.dumps(v))


@dataclass
class Rendered:
    """Both engines' outputs for the same frames, with what drove them."""
    warps: list = field(default_factory=list)
    neurals: list | None = field(default_factory=list)  # None: a warp identity, no neural engine
    points: list = field(default_factory=list)  # the target landmarks of each frame
    truth: list | None = field(default_factory=list)  # None without ground truth
    consecutive: list = field(default_factory=list)  # frame follows the previous one without a gap
    drivers: list = field(default_factory=list)
    frame_ids: list = field(default_factory=list)  # the video's frame number of each frame
    kind: str = ""
    train_points: list | None = None  # the training frames' landmarks, with held-out frames only
    source_detail: list = field(default_factory=list)  # metrics.face_detail of the source, per frame or one


def evaluate_identity(identity, driving: Path | None = None, max_frames: int | None = None,
                      backend: str = "auto", progress: bool = True, identity_distance: bool = True,
                      marker=None) -> dict:
    """Evaluate a neural identity: on its enrollment video's held-out frames (self-reenactment,
    with ground truth), or reenacting another driving video (no ground truth). A warp
    identity has no held-out frames: it is evaluated alone, on a driving video.
    `identity_distance`: also measure how much the avatar looks like the identity and not
    like the driver (dlib, when installed). `marker` marks the report's rendered frames."""
    from ..identity import IdentityError
    from ..render.warp import WarpRenderer
    from .runtime import NeuralRenderer

    neural = identity.engine == "neural"
    if not neural and driving is None:
        raise IdentityError(f"identity {identity.name!r} uses the {identity.engine} engine and has no held-out "
                            "frames: evaluate it on a driving video (--driving VIDEO)")
    renderer = NeuralRenderer(identity, prefer=backend) if neural else WarpRenderer.for_identity(identity)
    if driving is None:
        r = _render_holdout(identity, renderer, max_frames, progress)
    else:
        r = _render_driven(identity, renderer, Path(driving), max_frames, progress)
    if len(r.warps) < 2:
        raise IdentityError("fewer than 2 frames with a face to evaluate")
    report = evaluate_frames(r.warps, r.neurals, r.points, r.truth, r.consecutive, drivers=r.drivers,
                             frame_ids=r.frame_ids, reference=identity.reference if identity_distance else None,
                             marker=marker, train_points=r.train_points)
    report["summary"].update(_resolution_figures(r, identity.size))
    report["kind"] = r.kind
    report["runtime"] = renderer.runtime.name if neural else "warp engine"
    report["identity"] = identity.name
    return report


def _resolution_figures(r: Rendered, size: int) -> dict:
    """Each engine's detail against the source (metrics: detail) and, for an output larger
    than the generator's, its PSNR at 256²."""
    from .config import SIZE
    from .metrics import DETAIL_DISPLAY, face_detail, psnr

    def small(rgb):
        return cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA)

    figures = {"output_size": size, "detail_display": DETAIL_DISPLAY}
    source = np.resize(np.asarray(r.source_detail, float), len(r.points))
    for name, outs in (("warp", r.warps), ("neural", r.neurals)):
        if outs is None:
            continue
        ratios = [face_detail(out, p) / max(src, 1e-6) for out, p, src in zip(outs, r.points, source)]
        figures[f"{name}_detail"] = round(float(np.median(ratios)), 3)
        if r.truth is not None and size != SIZE:
            figures[f"{name}_psnr_256"] = round(float(np.mean([psnr(small(o), small(t))
                                                               for o, t in zip(outs, r.truth)])), 3)
    return figures


def _source(rgb: np.ndarray, x0: float, y0: float, side: float, points: np.ndarray | None = None,
            size: int | None = None) -> float:
    """metrics.face_detail of the face square (x0, y0, side) of rgb cut at its own resolution;
    `points` in rgb's pixels, or in `size`-square crop pixels."""
    from ..identity import crop_with_box, points_to_crop
    from .metrics import face_detail

    native = max(int(round(side)), 16)
    points = points * (native / size) if size else points_to_crop(points, x0, y0, side, native)
    return face_detail(crop_with_box(rgb, x0, y0, side, native), points)


def _render_holdout(identity, renderer, max_frames: int | None, progress: bool) -> Rendered:
    """The held-out frames of the enrollment video, cropped with the enrollment's box: the
    ground truth for each is the crop itself. The training frames' landmarks too (a few
    seconds more), for PSNR by pose novelty."""
    from tqdm import tqdm

    from ..identity import IdentityError, crop_with_box, points_to_crop
    from ..render.style import stylize
    from .data import read_frames

    neural_info = identity.manifest.get("neural") or {}
    source = Path(identity.manifest.get("provenance", {}).get("source_path", ""))
    style = identity.manifest.get("provenance", {}).get("style")  # a restyled scan's truth is restyled
    span = neural_info.get("holdout_frames")
    if not span:
        raise IdentityError(f"identity {identity.name!r} has no held-out frames recorded; use --driving")
    if not source.is_file():
        raise IdentityError(f"the enrollment video {source} is gone; use --driving VIDEO")
    x0, y0, side = neural_info["box"]
    start, end = span
    if max_frames:
        end = min(end, start + max_frames - 1)
    train_span = neural_info.get("train_frames")  # [first, last]
    r = Rendered(kind="self-reenactment, held-out frames of the enrollment video", train_points=[])
    prev_i = None
    with FaceLandmarker(static=False) as lm:
        for i, rgb in enumerate(tqdm(read_frames(source, end + 1), desc="eval", unit="frame",
                                     total=end + 1, disable=not progress)):
            if i < start:
                p = lm(rgb) if train_span and train_span[0] <= i <= train_span[1] else None
                if p is not None:
                    r.train_points.append(points_to_crop(p, x0, y0, side, identity.size))
                continue
            p = lm(rgb)
            if p is None:
                continue
            r.source_detail.append(_source(rgb, x0, y0, side, p))
            p = points_to_crop(p, x0, y0, side, identity.size)
            if prev_i != i - 1:
                renderer.reset()
            r.neurals.append(renderer.render(p))
            crop = crop_with_box(rgb, x0, y0, side, identity.size)
            if style:
                crop = stylize(crop, style, crop.shape[0])
            r.consecutive.append(prev_i == i - 1)
            r.warps.append(renderer.last_warp), r.points.append(p)
            r.truth.append(crop), r.drivers.append(crop), r.frame_ids.append(i)
            prev_i = i
    r.train_points = r.train_points or None  # none read: no split by pose novelty
    return r


def _render_driven(identity, renderer, driving: Path, max_frames: int | None, progress: bool) -> Rendered:
    """Another video's motion retargeted onto the identity, as a live session does (no ground
    truth). A WarpRenderer renders the warp alone (no neural frames)."""
    from tqdm import tqdm

    from ..retarget import Retargeter
    from ..render.warp import WarpRenderer
    from .data import read_frames

    warp_only = isinstance(renderer, WarpRenderer)
    r = Rendered(truth=None, neurals=None if warp_only else [],
                 kind=f"cross-reenactment driven by {driving.name} (no ground truth)")
    retarget = Retargeter(identity.neutral)
    scene = identity.scene()  # the source photo or scan frame, at its own resolution
    source, box = (identity.reference, (0, 0, identity.size)) if scene is None else scene
    r.source_detail.append(_source(source, *box, identity.neutral, identity.size))
    last_ok = False
    with FaceLandmarker(static=False) as lm:
        for i, rgb in enumerate(tqdm(read_frames(driving, max_frames or 300), desc="eval",
                                     unit="frame", disable=not progress)):
            p = lm(rgb)
            target = retarget.update(p, i / 30.0)
            if p is None:
                if not warp_only:
                    renderer.reset()  # the generator sees its previous frame: not across a gap
                last_ok = False
                continue
            r.consecutive.append(last_ok)
            last_ok = True
            out = renderer.render(target)
            if warp_only:
                r.warps.append(out)
            else:
                r.neurals.append(out), r.warps.append(renderer.last_warp)
            r.points.append(target), r.drivers.append(rgb), r.frame_ids.append(i)
    return r
