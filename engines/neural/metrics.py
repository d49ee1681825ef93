"""Quality metrics of rendered faces, one definition each (evaluation and the int8 check).

    psnr, ssim, l1     against the ground-truth crop (self-reenactment on held-out frames)
    mouth_psnr,        psnr and ssim inside the mouth box: the outer lip contour of the
    mouth_ssim         ground-truth frame's landmarks, padded by a quarter of the mouth width
                       on every side, clipped to the frame (the same box for every engine)
    eyes_psnr,         likewise inside one box around both eyes' lid contours, padded by a
    eyes_ssim          quarter of an eye's width
    akd                landmarks re-extracted from the output: mean 2-D distance to the
                       driving landmarks over the inter-ocular distance (lower is better)
    mouth_corr,        Pearson correlation of the output's mouth / eye openness with the
    eye_corr           driver's, over the frames
    flicker            mean |(out_t - out_t-1) - (gt_t - gt_t-1)| in 0..255 grey levels
                       (without ground truth: mean |out_t - out_t-1|)
    identity_distance  dlib face-descriptor distance of the output to the identity's reference
                       image, median over sampled frames (lower: more the identity; < 0.6 is
                       dlib's "same person")
    driver_distance    likewise to the driving frame's face (higher: less of the driver leaks in)
    psnr_near_pose,    psnr over the held-out frames whose head pose is nearest to a training
    psnr_mid_pose,     frame's (the third with the smallest pose_novelty), the middle third and
    psnr_far_pose      the farthest third: what the self-scan covered and what it never showed
    psnr_256           psnr with output and truth both scaled to 256² (an output larger than the
                       generator's, against the 256² output it grew from)
    detail             the face's fine detail shown at DETAIL_DISPLAY px (variance of the
                       Laplacian inside the face oval, face_detail) over the same measure of the
                       identity's source at that size (the held-out frame itself, cut from the
                       video at its own resolution; or the photo): median over the frames.
                       1.0 is as sharp as the source; a render upscaled from half the source's
                       resolution scores ~0.65
"""
from __future__ import annotations

import cv2
import numpy as np

from ..landmarks import (LEFT_EYE_INNER, LEFT_EYE_OUTER, RIGHT_EYE_INNER, RIGHT_EYE_OUTER, RIGID,
                         FaceLandmarker, eye_openness, inter_ocular, mouth_openness)
from ..render.mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER
from ..render.mouth import OUTER_LIPS

REGION_PAD = 0.25  # padding of a region box on every side, in widths of the feature (mouth, one eye)
EYES = sorted(set(RIGHT_EYE_UPPER + RIGHT_EYE_LOWER + LEFT_EYE_UPPER + LEFT_EYE_LOWER))
REGIONS = ("mouth", "eyes")

# Identity distances: every 5th frame, at most 60 (a dlib descriptor costs ~0.13 s on this CPU).
IDENTITY_EVERY, IDENTITY_FRAMES = 5, 60

DETAIL_DISPLAY = 720  # px: a call participant's height on screen (issue #35)
DETAIL_SHRINK = 0.8  # the face oval shrunk about its centre: the silhouette's edge is not detail

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Wang et al.'s SSIM (11x11 Gaussian, sigma 1.5) at every pixel and channel."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda t: cv2.GaussianBlur(t, (11, 11), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM, mean over pixels and RGB channels."""
    return float(ssim_map(a, b).mean())


def region_box(points: np.ndarray, indices, pad: float, shape: tuple) -> Box | None:
    """The bounding box of points[indices], `pad` pixels wider on every side, clipped to an
    image of `shape`; None if nothing of it is inside."""
    xy = np.asarray(points, np.float64)[indices, :2]
    lo, hi = xy.min(axis=0) - pad, xy.max(axis=0) + pad
    h, w = shape[:2]
    x0, y0 = max(0, int(np.floor(lo[0]))), max(0, int(np.floor(lo[1])))
    x1, y1 = min(w, int(np.ceil(hi[0]))), min(h, int(np.ceil(hi[1])))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def mouth_box(points: np.ndarray, shape: tuple, pad: float = REGION_PAD) -> Box | None:
    """The outer lip contour's box, padded by `pad` mouth widths, clipped to the frame."""
    xs = np.asarray(points)[OUTER_LIPS, 0]
    return region_box(points, OUTER_LIPS, pad * float(xs.max() - xs.min()), shape)


def eyes_box(points: np.ndarray, shape: tuple, pad: float = REGION_PAD) -> Box | None:
    """One box around both eyes' lid contours, padded by `pad` eye widths (corner to corner,
    the mean of both eyes), clipped to the frame."""
    p = np.asarray(points)[:, :2]
    eye_w = (np.linalg.norm(p[LEFT_EYE_OUTER] - p[LEFT_EYE_INNER])
             + np.linalg.norm(p[RIGHT_EYE_OUTER] - p[RIGHT_EYE_INNER])) / 2
    return region_box(points, EYES, pad * float(eye_w), shape)


def region_boxes(points: list[np.ndarray], shape: tuple) -> dict[str, list[Box | None]]:
    """Every region's box for each frame's landmarks: {"mouth": [...], "eyes": [...]}."""
    return {"mouth": [mouth_box(p, shape) for p in points], "eyes": [eyes_box(p, shape) for p in points]}


def frame_scores(out: np.ndarray, truth: np.ndarray, boxes: dict[str, Box | None] | None = None) -> dict:
    """psnr, ssim, l1 of one output against its ground truth, and <region>_psnr and
    <region>_ssim inside each box (None where the box is None). SSIM inside a box is the
    whole frame's SSIM map averaged over the box, so windows at its edge see their
    surroundings as they do in the whole-frame figure."""
    smap = ssim_map(out, truth)
    s = {"psnr": psnr(out, truth), "ssim": float(smap.mean()),
         "l1": float(np.abs(out.astype(np.float32) - truth).mean() / 255)}
    for name, box in (boxes or {}).items():
        if box is None:
            s[f"{name}_psnr"] = s[f"{name}_ssim"] = None
            continue
        x0, y0, x1, y1 = box
        s[f"{name}_psnr"] = psnr(out[y0:y1, x0:x1], truth[y0:y1, x0:x1])
        s[f"{name}_ssim"] = float(smap[y0:y1, x0:x1].mean())
    return s


def pose_novelty(train_points, points) -> np.ndarray:
    """Per frame of `points`: how far its head pose is from the nearest training frame's, as
    the mean distance of the RIGID points (forehead, nose, temples: they move with the skull,
    not with the expression), in the frame's inter-ocular distances. The crop is fixed, so a
    head moved or turned away from every training pose counts alike. On both shared
    self-scans a quick identity's held-out PSNR correlated with it at -0.65 and -0.73."""
    train = np.asarray(train_points, np.float64)[:, RIGID, :2]
    return np.array([np.linalg.norm(train - np.asarray(p, np.float64)[RIGID, :2], axis=2).mean(1).min()
                     / max(inter_ocular(p), 1e-6) for p in points])


POSE_THIRDS = ("near", "mid", "far")


def pose_thirds(novelty: np.ndarray) -> list[np.ndarray]:
    """The frames' positions split into thirds by pose_novelty, nearest first."""
    return np.array_split(np.argsort(novelty, kind="stable"), len(POSE_THIRDS))


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _corr(a: list, b: list) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def engine_metrics(outputs: list[np.ndarray], driving: list[np.ndarray], truth: list[np.ndarray] | None,
                   consecutive: list[bool], landmarker: FaceLandmarker,
                   boxes: dict[str, list[Box | None]] | None = None) -> dict:
    """Every metric above for one engine's outputs, as means over the frames; the scores
    against `truth` (psnr, ssim, l1 and the regions') only with it, frame by frame as well
    under "per_frame". `boxes` are the regions' boxes per frame (region_boxes), by default
    those of the driving landmarks: in self-reenactment, the ground-truth frame's own."""
    m: dict = {}
    if truth is not None:
        if boxes is None:
            boxes = region_boxes(driving, truth[0].shape)
        per = [frame_scores(o, t, {k: b[i] for k, b in boxes.items()})
               for i, (o, t) in enumerate(zip(outputs, truth))]
        keys = list(per[0]) if per else ["psnr", "ssim", "l1"]
        m.update({k: _mean([f[k] for f in per]) for k in keys})
        m["per_frame"] = {k: [f[k] for f in per] for k in keys}
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


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def identity_distances(reference: np.ndarray, outputs: dict[str, list[np.ndarray]],
                       drivers: list[np.ndarray] | None) -> dict:
    """identity_distance and driver_distance of each engine's outputs (see above), on every
    IDENTITY_EVERY-th frame; `driver_to_identity`: the same distance between the driving
    frames and the reference, the baseline a driver distance can be judged by. `picks` are
    the positions of the sampled frames, `faces` the share where dlib found the face."""
    from ..identity_distance import descriptor, distance

    n = len(next(iter(outputs.values())))
    picks = list(range(0, n, IDENTITY_EVERY))[:IDENTITY_FRAMES]
    ref = descriptor(reference)
    drv = [descriptor(drivers[i]) if drivers is not None else None for i in picks]
    fig = {"picks": picks, "reference_found": ref is not None,
           "driver_to_identity": _median(distance(d, ref) for d in drv)}
    for name, frames in outputs.items():
        out = [descriptor(frames[i]) for i in picks]
        fig[name] = {"identity_distance": _median(distance(o, ref) for o in out),
                     "driver_distance": _median(distance(o, d) for o, d in zip(out, drv)),
                     "faces": sum(o is not None for o in out) / max(len(picks), 1)}
    return fig


def face_detail(rgb: np.ndarray, points: np.ndarray, display: int = DETAIL_DISPLAY) -> float:
    """Variance of the Laplacian of the face (inside its oval, shrunk by DETAIL_SHRINK) with
    the square image `rgb` shown `display` px tall; `points` in rgb's pixels."""
    from ..landmarks import FACE_OVAL

    k = display / rgb.shape[0]
    shown = cv2.resize(rgb, (display, display), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    lap = cv2.Laplacian(cv2.cvtColor(shown, cv2.COLOR_RGB2GRAY), cv2.CV_32F)
    oval = points[FACE_OVAL, :2].astype(np.float64) * k
    oval = oval.mean(0) + (oval - oval.mean(0)) * DETAIL_SHRINK
    mask = np.zeros((display, display), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(oval).astype(np.int32)), 1)
    return float(lap[mask.astype(bool)].var())
