"""The generator: warp images + landmark contour maps -> the identity's 256² face.

Inputs (N, 11, 256, 256) float32:
    0-2  the warp engine's render for the target landmarks, RGB in [-1, 1]
    3    the target's face-mesh contours (lips, eyes, brows, irises, oval) in [0, 1]
    4    the previous frame's contour map (temporal context; = channel 3 on a first frame)
    5-7  the reference moved rigidly with the head, RGB in [-1, 1]: hair and ears move
         with the skull, which the mesh warp's skirt stretches instead
    8-10 the reference standing still with its head blanked (still_input), RGB in [-1, 1]:
         background, shoulders and chest stay put while the head moves, and the warp's
         skirt drags them along with it
(Bundles from before the still reference take channels 0-7 only: config.LEGACY_CHANNELS.)
Output (N, 3, 256, 256): warp + tanh(residual), clamped to [-1, 1] (in eval mode).

CPU design: PixelUnshuffle(4) takes 256² straight to 64² (no full-resolution convs), the
body works at 64² and 32², PixelShuffle brings it back. Depthwise-free plain 3x3 convs
are what oneDNN / ONNX Runtime's CPU kernels run fastest.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from .config import IN_CHANNELS, LEGACY_CHANNELS, MODEL_CONFIG, SIZE

# head_region: the skirt's ring widened this much about its centre. At 1.05 the demo's bob and
# selfscan_a's loose strands of hair stuck out of it (and could be copied as a ghost).
HEAD_MARGIN = 1.2
# keep_warp_detail, in inter-ocular distances (~70 px in an enrollment's crop): the
# correction's smoothing (~2 px), and the soft edges of the face and of the mouth and eyes,
# where the generator's own detail is kept.
DETAIL_SIGMA = 0.03
FACE_FEATHER = 0.08
FEATURE_FEATHER = 0.07
# The face outline shrunk about its centre: its edge (the head's silhouette against hair and
# background; glasses' side frames) needs the generator's detail. The whole outline cost
# selfscan_b 0.18 dB on its held-out frames, shrunk 0.03, at the same identity distance.
FACE_SHRINK = 0.8
# add_warp_detail: where the generator's output is within these levels of the warp (0-255,
# the larger channel), the warp's finer detail is kept (all of it below the first, none
# above the second); the weight is smoothed over KEPT_FEATHER pixels of SIZE.
KEPT_LEVELS = (12.0, 40.0)
KEPT_FEATHER = 1.5


def _contour_edges() -> np.ndarray:
    from mediapipe.python.solutions.face_mesh_connections import (FACEMESH_CONTOURS,
                                                                  FACEMESH_IRISES, FACEMESH_NOSE)
    return np.array(sorted(FACEMESH_CONTOURS | FACEMESH_IRISES | FACEMESH_NOSE), np.int32)


_EDGES: np.ndarray | None = None


def contour_map(points: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the face-mesh contours of points, antialiased lines."""
    global _EDGES
    if _EDGES is None:
        _EDGES = _contour_edges()
    img = np.zeros((size, size), np.uint8)
    p = np.round(points[:, :2] * 16).astype(np.int32)  # 4 fractional bits
    segs = p[_EDGES]  # (E, 2, 2)
    cv2.polylines(img, list(segs), False, 255, 1, cv2.LINE_AA, shift=4)
    return img.astype(np.float32) / 255.0


def still_input(reference_rgb: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """(3, 256, 256) float32 in [-1, 1]: the reference standing still with its head blanked
    (0): background, shoulders and chest stay put while the head moves, but a still head
    would be copied beside the moved one as a ghost. Made once per identity."""
    x = reference_rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    x[:, head_region(neutral, reference_rgb.shape[:2])] = 0.0
    return x


def warp_detail_weight(points: np.ndarray) -> np.ndarray:
    """(SIZE, SIZE) float32: 1 inside the face, away from its outline, mouth and eyes, fading
    to 0 towards them: where keep_warp_detail keeps the warp's detail.
    Made at a quarter of the side (it is smooth) and scaled up: ~0.2 ms instead of 2.8."""
    from ..landmarks import FACE_OVAL, inter_ocular
    from .regions import region_weights

    small, io = SIZE // 4, inter_ocular(points) / 4
    face = np.zeros((small, small), np.float32)
    outline = points[FACE_OVAL, :2]
    outline = outline.mean(0) + (outline - outline.mean(0)) * FACE_SHRINK
    outline = cv2.convexHull(np.round(outline * 4).astype(np.int32))  # /4, 4 fraction bits
    cv2.fillConvexPoly(face, outline, 1.0, cv2.LINE_AA, shift=4)
    face = cv2.GaussianBlur(face, (0, 0), FACE_FEATHER * io)
    features = cv2.GaussianBlur(region_weights(points, small), (0, 0), FEATURE_FEATHER * io)
    return cv2.resize(face * (1.0 - features), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def keep_warp_detail(out: np.ndarray, warp: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The generator's output (uint8) with its correction smoothed inside the face, away from
    mouth and eyes: there it fixes shading and colour, and the fine detail (skin, brows, the
    nose's shape) stays the warp's, the identity's own. Driven by another person, the
    generator's fine corrections there belonged to no one (a smudged nose): a quick
    identity's dlib distance to itself fell from 0.43 to 0.37 with this, while on its own
    held-out frames they had been worth 0.02-0.03 dB."""
    from ..landmarks import inter_ocular

    weight = warp_detail_weight(points)
    rows, cols = np.flatnonzero(weight.max(1) > 1e-3), np.flatnonzero(weight.max(0) > 1e-3)
    if not len(rows):
        return out
    # Only the face's box (and the blur's reach round it): half the time of the whole image.
    sigma = DETAIL_SIGMA * inter_ocular(points)
    m = int(3 * sigma) + 1
    box = np.s_[max(rows[0] - m, 0):rows[-1] + m + 1, max(cols[0] - m, 0):cols[-1] + m + 1]
    smooth = cv2.GaussianBlur(cv2.subtract(out[box], warp[box], dtype=cv2.CV_16S), (0, 0), sigma)
    kept, w = out.copy(), weight[box]
    kept[box] = cv2.blendLinear(cv2.add(warp[box], smooth, dtype=cv2.CV_8U), out[box], w, 1.0 - w)
    return kept


def add_warp_detail(out: np.ndarray, warp: np.ndarray, detail: np.ndarray) -> np.ndarray:
    """The generator's output at SIZE scaled up to the size of `detail` (the same warp as
    `warp`, rendered at the identity's larger size), with the detail the large warp has
    beyond SIZE added back where the generator kept the warp (they differ by less than
    KEPT_LEVELS[0] levels, fading out by KEPT_LEVELS[1]). Where it painted something the
    warp lacks (teeth, lids, the hair's outline), the warp's detail belongs to something
    else, and the scaled-up output is left alone."""
    size = detail.shape[1], detail.shape[0]
    grown, scaled_warp = (cv2.resize(im, size, interpolation=cv2.INTER_CUBIC) for im in (out, warp))
    lo, hi = KEPT_LEVELS
    b, g, r = cv2.split(cv2.absdiff(out, warp))
    kept = np.clip((hi - cv2.max(cv2.max(b, g), r).astype(np.float32)) / (hi - lo), 0.0, 1.0)
    kept = cv2.resize(cv2.GaussianBlur(kept, (0, 0), KEPT_FEATHER), size, interpolation=cv2.INTER_LINEAR)
    # Uint8 and int16 arithmetic and one blend: half the time of float32 (3.7 -> 1.9 ms at 512²).
    detailed = cv2.add(cv2.subtract(detail, scaled_warp, dtype=cv2.CV_16S), grown, dtype=cv2.CV_8U)
    return cv2.blendLinear(detailed, grown, kept, 1.0 - kept)


def still_for(identity, channels: int) -> np.ndarray | None:
    """The still reference a generator with `channels` inputs takes: None for bundles from
    before it (LEGACY_CHANNELS), which run on channels 0-7 only."""
    return still_input(identity.reference, identity.neutral) if channels == IN_CHANNELS else None


def head_region(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Where the head may be: the skirt's ring widened by HEAD_MARGIN, and straight above it
    to the top of the image (hair)."""
    from ..render.mesh import ring_points

    ring = ring_points(points[:, :2].astype(np.float64))
    centre = ring.mean(0)
    wide = centre + (ring - centre) * HEAD_MARGIN
    up = wide[wide[:, 1] < centre[1]] * (1, 0)
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(np.concatenate([wide, up])).astype(np.int32)), 1)
    return mask.astype(bool)


def make_input(warp_rgb: np.ndarray, rigid_rgb: np.ndarray, cmap: np.ndarray,
               prev_cmap: np.ndarray | None, still: np.ndarray | None) -> np.ndarray:
    """(1, 11, 256, 256) float32 network input from uint8 warp renders, contour maps and the
    still reference (still_input); without `still`, the (1, 8, 256, 256) of older bundles."""
    x = np.empty((1, LEGACY_CHANNELS if still is None else IN_CHANNELS, SIZE, SIZE), np.float32)
    x[0, :3] = warp_rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    x[0, 3] = cmap
    x[0, 4] = cmap if prev_cmap is None else prev_cmap
    x[0, 5:8] = rigid_rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    if still is not None:
        x[0, 8:] = still
    return x


def to_image(y: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8 RGB."""
    return np.clip((y[0].transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x):
        return x + self.c2(self.act(self.c1(x)))


class Generator(nn.Module):
    """Defaults are config.MODEL_CONFIG, the size every enrollment trains; a bundle's own
    model_config (stored with its weights) rebuilds it as it was trained."""

    def __init__(self, width: int = MODEL_CONFIG["width"], deep: int = MODEL_CONFIG["deep"],
                 blocks: int = MODEL_CONFIG["blocks"], in_channels: int = MODEL_CONFIG["in_channels"]):
        super().__init__()
        self.down = nn.PixelUnshuffle(4)  # 256² x 8 -> 64² x 128
        self.stem = nn.Sequential(nn.Conv2d(in_channels * 16, width, 3, padding=1), nn.LeakyReLU(0.1, True))
        self.block64 = ResBlock(width)
        self.enc = nn.Sequential(nn.Conv2d(width, deep, 3, stride=2, padding=1), nn.LeakyReLU(0.1, True))
        self.body = nn.Sequential(*[ResBlock(deep) for _ in range(blocks)])
        self.up = nn.Sequential(nn.Conv2d(deep, width * 4, 3, padding=1), nn.PixelShuffle(2),
                                nn.LeakyReLU(0.1, True))  # 32² -> 64²
        self.fuse = nn.Sequential(nn.Conv2d(width * 2, width, 3, padding=1), nn.LeakyReLU(0.1, True),
                                  ResBlock(width))
        self.head = nn.Conv2d(width, 3 * 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(4)  # 64² x 48 -> 256² x 3
        nn.init.zeros_(self.head.weight)  # start as the identity map on the warp image
        nn.init.zeros_(self.head.bias)

    @property
    def input_channels(self) -> int:
        return self.stem[0].in_channels // 16

    def forward(self, x):
        warp = x[:, :3]
        f64 = self.block64(self.stem(self.down(x)))
        f32 = self.body(self.enc(f64))
        f = self.fuse(torch.cat([f64, self.up(f32)], 1))
        res = torch.tanh(self.shuffle(self.head(f)).float())  # fp32 under bf16 autocast too
        out = warp + res
        # Clamp at inference only: a clamp passes no gradient outside [-1, 1], so one training
        # step that pushed the output there could never be undone (seen as a stuck loss).
        return out if self.training else torch.clamp(out, -1.0, 1.0)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_onnx(model: nn.Module, path, opset: int = 17) -> None:
    """Fixed-shape (1, C, 256, 256) -> (1, 3, 256, 256) ONNX, C the model's input channels;
    legacy exporter (dynamo if that fails)."""
    model = model.eval().float()
    dummy = torch.zeros(1, model.input_channels, SIZE, SIZE)
    with torch.no_grad():
        try:
            torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=["output"],
                              opset_version=opset, dynamo=False)
        except Exception:  # noqa: BLE001 - legacy exporter unavailable: fall back to dynamo
            torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=["output"],
                              opset_version=max(opset, 18), dynamo=True, external_data=False)
