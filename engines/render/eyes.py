"""Eyes for the warp engine: irises that look where the target's iris points say, and lids.

The mesh has no iris points: its eye holes are fans between the lids, so a warp moves the
iris only with the lids. IrisPainter takes the irises out of the reference (`white`: each
filled in from the white either side of it, row by row) for the warp to warp, and then
draws each iris (a disc from the reference, continued upwards and downwards where the lids
cover it) at the target's iris centre, inside the target's eye opening only, so never on
skin, and never stretched as the lids open or close.

Closing an eye by warping drags the lashes down over the eyeball: a dark smear, not a
lid. Where the target eye is more closed than the reference's, EyelidPainter paints lid
skin (sampled just above the reference's eye) between where the open lid would be and
the lower lid, with a lash line where the lids meet. An enrolled identity's own closing
eyes (EyeMemory, from its self-scan's blinks) are drawn instead: real lids and lashes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from . import geometry
from ..landmarks import EYE_CORNERS, IRISES, RIGID, eye_frames, iris_centres, iris_reach
from .memory import Memory, nearest
from .paint import TUNED_SIDE, kernel, paint_inside
from .mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER

EYES = ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER))


def _gap(points, upper, lower) -> float:
    return float(np.linalg.norm(points[upper[1:-1], :2] - points[lower[1:-1], :2], axis=1).mean())


EYE_MEMORY_SIZE = 8
EYE_MEMORY_HOLD = 0.04  # in openness (lid gap over eye width)


def eye_shape(points: np.ndarray) -> np.ndarray:
    """Each eye's openness (as in EYES): mean lid gap over the eye's width."""
    width = eye_frames(points)[2]
    return np.array([_gap(points, upper, lower) for upper, lower in EYES]) / width


class EyeMemory(Memory):
    """The identity's own closing and closed eyes (both eyes in one patch), chosen per eye."""

    PATCH = (64, 176)
    CENTRE = EYE_CORNERS.ravel().tolist()
    KIND = "eye memory"
    shape = staticmethod(eye_shape)

    @classmethod
    def worth_keeping(cls, shapes: np.ndarray) -> np.ndarray:
        return shapes.min(1) < 0.6 * np.median(shapes)  # a blink or a squint, not an open eye

    @classmethod
    def build(cls, frames: np.ndarray, points: np.ndarray, size: int = EYE_MEMORY_SIZE) -> "EyeMemory | None":
        return super().build(frames, points, size)

    def choose(self, eye: int, openness: float, previous: int | None = None, hold: float = EYE_MEMORY_HOLD) -> int:
        return nearest(np.abs(self.shapes[:, eye] - openness), previous, hold)


class EyelidPainter:
    def __init__(self, reference: np.ndarray, neutral: np.ndarray, memory: EyeMemory | None = None):
        self.memory = memory
        self._drawn: list[int | None] = [None, None]  # per eye, the remembered eye drawn last
        self.neutral = neutral.astype(np.float64)
        h, w = reference.shape[:2]
        self.skin, self.lash = [], []
        for upper, lower in EYES:
            lid = neutral[upper[2:-2], :2].astype(np.float64)
            height = _gap(neutral, upper, lower)
            above = np.clip(np.round(lid - [0, 1.2 * height]).astype(int), 0, [w - 1, h - 1])
            self.skin.append(np.median(reference[above[:, 1], above[:, 0]].astype(np.float32), axis=0))
            self.lash.append(self.skin[-1] * 0.35)

    def paint(self, image: np.ndarray, target: np.ndarray, head: np.ndarray | None = None) -> None:
        if head is None:
            head = geometry.fit_similarity(self.neutral[RIGID, :2], target[RIGID, :2].astype(np.float64))
        scale = float(np.sqrt(abs(np.linalg.det(head[:2, :2]))))
        openness = eye_shape(target) if self.memory is not None else None
        for k, ((upper, lower), skin, lash) in enumerate(zip(EYES, self.skin, self.lash)):
            open_gap = _gap(self.neutral, upper, lower) * scale
            closure = 1.0 - _gap(target, upper, lower) / max(open_gap, 1e-6)
            strength = float(np.clip((closure - 0.25) / 0.4, 0.0, 1.0))
            if strength <= 0:
                self._drawn[k] = None
                continue
            if self.memory is not None:
                self._drawn[k] = self.memory.choose(k, float(openness[k]), self._drawn[k])
                layer = self._remembered(target, upper, lower, self._drawn[k])
            else:
                layer = self._painted(target[upper, :2].astype(np.float64), skin, lash, image.shape[0] / TUNED_SIDE)
            paint_inside(image, self._lid_outline(target, upper, lower, open_gap), layer, strength,
                         feather=kernel(5, image.shape[0]))

    @staticmethod
    def _lid_outline(target, upper, lower, open_gap) -> np.ndarray:
        """Where the open eye would be: the upper lid raised to the open gap, down to the lower lid."""
        lid = target[upper, :2].astype(np.float64)
        bottom = target[lower, :2].astype(np.float64)
        raised = lid.copy()
        raised[1:-1, 1] = np.minimum(lid[1:-1, 1], bottom[1:-1, 1] - open_gap * 1.15)
        return np.concatenate([raised, bottom[-2:0:-1]])

    @staticmethod
    def _painted(lid, skin, lash, scale: float = 1.0):
        """Lid skin with a lash line along a smooth curve through the lid: a closed lid's
        landmarks zig-zag, and OpenCV draws anti-aliased lines on 8-bit images only, so the
        line is drawn as an 8-bit coverage mask with a soft shadow, then blended. `scale`:
        the frame's side over TUNED_SIDE (the line and its shadow grow with it)."""
        curve = _smooth_lid(lid)

        def lid_layer(x0, y0, x1, y1):
            cover = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.polylines(cover, [np.round((curve - (x0, y0)) * 16).astype(np.int32)], False, 255,
                          max(1, round(scale)), cv2.LINE_AA, shift=4)
            shadow = cv2.GaussianBlur(cover, (0, 0), 1.2 * scale).astype(np.float32) / 255 * 0.5
            a = np.maximum(cover.astype(np.float32) / 255, shadow)[..., None]
            return skin * (1 - a) + lash * a
        return lid_layer

    def _remembered(self, target, upper, lower, entry: int):
        """The remembered eye, moved by the similarity that best lays its lids on the target's."""
        lids = upper + lower[1:-1]
        to_patch = geometry.fit_similarity(target[lids, :2].astype(np.float64),
                                           self.memory.points[entry][lids, :2].astype(np.float64))
        patch = self.memory.patches[entry]

        def eye_layer(x0, y0, x1, y1):
            m = to_patch[:2].copy()
            m[:, 2] += m[:, :2] @ (x0, y0)  # box pixel -> target pixel -> patch pixel
            return cv2.warpAffine(patch, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        return eye_layer


def _smooth_lid(lid: np.ndarray, n: int = 24) -> np.ndarray:
    """A quadratic through the lid points in the frame of its corners, sampled at n points
    from corner to corner."""
    a, b = lid[0], lid[-1]
    axis = (b - a) / max(np.linalg.norm(b - a), 1e-6)
    normal = np.array([-axis[1], axis[0]])
    u, v = (lid - a) @ axis, (lid - a) @ normal
    coef = np.polyfit(u, v, 2) if np.ptp(u) > 1e-6 else np.zeros(3)
    us = np.linspace(u[0], u[-1], n)
    return a + us[:, None] * axis + np.polyval(coef, us)[:, None] * normal


IRIS_DISC = 1.2  # the iris disc moved, in iris radii: a little white around it goes along


class IrisPainter:
    """paint(image, target): each target eye opening, with its iris at the target's iris centre."""

    def __init__(self, reference: np.ndarray, neutral: np.ndarray):
        self.neutral = neutral.astype(np.float64)
        h, w = reference.shape[:2]
        mid, axis, width = eye_frames(self.neutral)
        centres = iris_centres(self.neutral)
        ring = self.neutral[IRISES[:, 1:], :2] - centres[:, None]
        radius = np.hypot(ring[..., 0], ring[..., 1]).mean(1)
        reach = iris_reach(self.neutral) * width
        # Per eye: its two corners (image-left first) and iris points, gathered at once.
        self._gather = np.concatenate([EYE_CORNERS, IRISES], 1)
        self._outline = np.array([upper + lower[-2:0:-1] for upper, lower in EYES])
        self.white = reference.copy()  # the reference with its irises taken out of its eyes
        self.eyes = []
        for k in range(2):
            outline = self.neutral[self._outline[k], :2]
            pad = int(np.ceil(2 * radius[k])) + 2
            x0, y0 = np.maximum(np.floor(outline.min(0)).astype(int) - pad, 0)
            x1, y1 = np.minimum(np.ceil(outline.max(0)).astype(int) + pad, [w, h])
            origin = np.array([x0, y0], np.float64)
            white, *iris = self._build(reference[y0:y1, x0:x1], outline - origin,
                                       centres[k] - origin, IRIS_DISC * radius[k])
            box = self.white[y0:y1, x0:x1]
            np.copyto(box, white, where=white != box)  # only what changed: boxes may overlap
            frame = np.stack([axis[k], (-axis[k, 1], axis[k, 0])])  # rows: along, across
            rest = frame @ (centres[k] - mid[k])  # where the iris rests, in the eye's frame
            low = (-reach[k], rest[1] - radius[k])
            high = (reach[k], rest[1] + radius[k])
            gap = float(np.linalg.norm(outline[1:8] - outline[15:8:-1], axis=1).mean())
            self.eyes.append(_Eye(*iris, tuple(axis[k].tolist()), tuple((mid[k] - origin).tolist()),
                                  float(width[k]), gap, tuple(rest.tolist()), low, high))

    @staticmethod
    def _build(crop, outline, centre, disc_r):
        """In the crop's pixels: the eye's white with the iris filled in (uint8 RGB), the iris
        as a sprite (uint8 RGB) and its alpha (float32), and the same sprite and alpha as the
        reference shows them at rest, lash lines over the iris included."""
        bh, bw = crop.shape[:2]
        opening = np.zeros((bh, bw), np.uint8)
        cv2.fillPoly(opening, [np.round(outline * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
        inner = cv2.erode(opening, np.ones((3, 3), np.uint8)).astype(bool)  # no lash pixels
        ys, xs = np.mgrid[0:bh, 0:bw]
        dist = np.hypot(xs - centre[0], ys - centre[1])
        disc = dist <= disc_r
        soft = np.clip(disc_r + 0.5 - dist, 0, 1)[..., None]
        # The white: inside the disc and the lash lines, each row carried across from the white
        # either side of it, so its shading under the lid continues; rows with nothing either
        # side copy the nearest row that has.
        white = crop.astype(np.float32)
        side = inner & ~disc
        done = np.zeros(bh, bool)
        for y in range(bh):
            known, holes = np.flatnonzero(side[y]), np.flatnonzero(disc[y])
            if known.size and holes.size:
                for c in range(3):
                    white[y, holes, c] = np.interp(holes, known, white[y, known, c])
                done[y] = True
        rows = np.flatnonzero(done)
        for y in np.flatnonzero(~done & disc.any(1)):
            if rows.size:
                white[y, disc[y]] = white[rows[np.argmin(np.abs(rows - y))], disc[y]]
        white = white * (1 - soft) + cv2.GaussianBlur(white, (3, 5), 0) * soft  # no row streaks
        white = crop.astype(np.float32) * (1 - soft * inner[..., None]) + white * soft * inner[..., None]
        # The lash lines over the iris: filled in from the lids, the lash lines either side
        # and the white, so no trace of the iris stays on them when it moves.
        lash = (opening.astype(bool) & ~inner & disc).astype(np.uint8)
        white = cv2.inpaint(np.round(white).astype(np.uint8), lash, 2, cv2.INPAINT_TELEA)
        # The iris: what shows of it; under the lids, the median of what shows at the same
        # distance from its centre: pupil, iris and rim are rings, and a column's colour
        # would drag the pupil or a catchlight into a streak.
        sprite = crop.copy()
        seen = inner & disc  # clean samples of the iris
        shown = opening.astype(bool) & disc  # what the reference shows, with its lash lines
        ring = np.round(dist * 2).astype(int)  # half-pixel rings
        profile = np.zeros((ring[disc].max() + 1, 3), np.float32)
        have = np.zeros(len(profile), bool)
        for r in np.unique(ring[seen]):
            profile[r] = np.median(crop[seen & (ring == r)], axis=0)
            have[r] = True
        if have.any():
            known = np.flatnonzero(have)
            nearest = known[np.abs(np.arange(len(profile))[:, None] - known[None, :]).argmin(1)]
            hidden = disc & ~seen
            sprite[hidden] = np.round(profile[nearest[ring[hidden]]]).astype(np.uint8)
        # Under the lids only the iris proper, not the white around it that moves along.
        proper = np.clip(disc_r / IRIS_DISC + 0.5 - dist, 0, 1)
        alpha = np.where(seen, soft[..., 0], proper).astype(np.float32)
        # At rest the lash lines stay on the iris as the photo has them; once the iris moves
        # or the lids open wider, they would be a dark band carried along with it.
        at_rest = np.where(shown[..., None], crop, sprite)
        alpha_at_rest = np.where(shown, soft[..., 0], proper).astype(np.float32)
        return white, sprite, alpha, at_rest, alpha_at_rest

    def paint(self, image: np.ndarray, target: np.ndarray, head: np.ndarray | None = None) -> None:
        """Draw the irises into `image` (in place), a warp of `white`, at the target's iris
        centres, inside the target's eye openings. `head`: the 2-D similarity from the
        reference's RIGID points to the target's, if the caller has it."""
        if head is None:
            head = geometry.fit_similarity(self.neutral[RIGID, :2], target[RIGID, :2].astype(np.float64))
        inv_scale = 1.0 / max(math.sqrt(abs(head[0, 0] * head[1, 1] - head[0, 1] * head[1, 0])), 1e-6)
        g = target[self._gather, :2]  # (2 eyes, 2 corners + 5 iris points, 2)
        corners, irises = g[:, :2].tolist(), (g[:, 2:].sum(1) * 0.2).tolist()
        outlines = target[self._outline, :2]
        los, his = outlines.min(1).tolist(), outlines.max(1).tolist()
        gaps = np.sqrt(((outlines[:, 1:8] - outlines[:, 15:8:-1]) ** 2).sum(-1)).mean(1).tolist()
        h, w = image.shape[:2]
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        for k, eye in enumerate(self.eyes):
            # 2x2 algebra in plain floats: numpy costs more per call than these few products.
            (ax, ay), (bx, by) = corners[k]
            mx, my = (ax + bx) * 0.5, (ay + by) * 0.5
            ux, uy = bx - ax, by - ay
            width = max(math.hypot(ux, uy), 1e-6)
            ux, uy = ux / width, uy / width
            # The iris's map, target pixel -> crop pixel: along the eye by eye widths (a turned
            # head narrows it), across it by the head's scale (the eyeball does not stretch as
            # the lids open wider than in the reference: more of the iris shows).
            sa, sb = eye.width / width, inv_scale
            fx, fy = eye.axis
            l00, l01 = fx * sa * ux + fy * sb * uy, fx * sa * uy - fy * sb * ux
            l10, l11 = fy * sa * ux - fx * sb * uy, fy * sa * uy + fx * sb * ux
            tx, ty = eye.mid[0] - l00 * mx - l01 * my, eye.mid[1] - l10 * mx - l11 * my
            # Where the iris goes, in the reference eye's frame, kept short of the corners
            # and within a radius of where it rests across the eye.
            cx, cy = irises[k][0] - mx, irises[k][1] - my
            along = min(max(sa * (cx * ux + cy * uy), eye.low[0]), eye.high[0]) - eye.rest[0]
            across = min(max(sb * (cy * ux - cx * uy), eye.low[1]), eye.high[1]) - eye.rest[1]
            dx, dy = fx * along - fy * across, fy * along + fx * across
            # How far from the reference's own eye: 0 shows the photo's lash lines over the iris.
            wider = (gaps[k] * inv_scale / max(eye.gap, 1e-6) - 1.05) / 0.15
            away = min(max(math.hypot(along, across), wider, 0.0), 1.0)
            if away >= 1.0:
                sprite, alpha = eye.sprite, eye.alpha
            elif away <= 0.0:
                sprite, alpha = eye.at_rest, eye.alpha_at_rest
            else:
                sprite = cv2.addWeighted(eye.sprite, away, eye.at_rest, 1.0 - away, 0.0)
                alpha = cv2.addWeighted(eye.alpha, away, eye.alpha_at_rest, 1.0 - away, 0.0)

            (lx, ly), (hx, hy) = los[k], his[k]
            x0, y0 = max(int(lx) - 2, 0), max(int(ly) - 2, 0)
            x1, y1 = min(int(hx) + 3, w), min(int(hy) + 3, h)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            size = (x1 - x0, y1 - y0)
            mask = np.zeros((size[1], size[0]), np.float32)
            cv2.fillPoly(mask, [((outlines[k] - (x0, y0)) * 16 + 0.5).astype(np.int32)], 1.0, cv2.LINE_AA, shift=4)
            mask = cv2.GaussianBlur(mask, (3, 3), 0)
            m = np.array([[l00, l01, tx + l00 * x0 + l01 * y0 - dx], [l10, l11, ty + l10 * x0 + l11 * y0 - dy]])
            iris = cv2.warpAffine(sprite, m, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
            alpha = cv2.warpAffine(alpha, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT)
            alpha *= mask
            image[y0:y1, x0:x1] = cv2.blendLinear(iris, image[y0:y1, x0:x1], alpha, 1.0 - alpha)


class _Eye(NamedTuple):
    """One reference eye, in its crop's pixels: its iris, frame, and where the iris may go."""
    sprite: np.ndarray  # the iris, continued under the lids and lash lines, uint8 RGB
    alpha: np.ndarray  # the iris disc, float32
    at_rest: np.ndarray  # the same with the lash lines as the photo has them over the iris
    alpha_at_rest: np.ndarray
    axis: tuple  # the unit vector along the eye, towards image right (across it: (-y, x))
    mid: tuple  # the corners' midpoint
    width: float
    gap: float  # the mean gap between the lids
    rest: tuple  # the iris centre in the eye's frame (along, across), from mid, in pixels
    low: tuple  # and how far it may go (along, across)
    high: tuple
