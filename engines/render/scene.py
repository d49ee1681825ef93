"""Call frames composed into the identity's own scene (issue #35, LivePortrait's paste-back).

A photo identity's bundle keeps the photo around the face (`Identity.scene()`: the scene and
the face square's place in it). `SceneComposer` makes frames of a requested size from it:

  window  chosen once: a window of the frame's aspect in the scene, the face square centred
          horizontally and its eyes EYES_AT from the top, as large as the scene allows (at
          most MAX_WINDOW square sides tall); where the scene is too small it is shifted,
          never padded: a tight scene gives a tighter window, scaled up to the frame
  frame   the window scaled to the frame once (cached); per frame, only the square's region
          is computed: the avatar scaled to the square's place and blended over the still
          scene with a feathered mask, 1 over the face and head, falling to 0 towards the
          square's border (BAND of its side), so the warp's moved hair and background fade
          into the still scene instead of ending in a seam

`composer(identity, width, height)` is the composer of an identity with a scene (else None);
`framer` falls back to engines.render.frame.fit_to_frame (pillarboxed). Arrays in, arrays out.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from ..landmarks import EYE_CORNERS
from .frame import fit_to_frame

EYES_AT = 0.40  # the eyes' height in the frame, from the top
MAX_WINDOW = 3.0  # the window's height at most, in face-square sides (the face not lost in a big photo)
BAND = (0.03, 0.24)  # the mask: 0 in the square's outer BAND[0], 1 inside BAND[1], of its side


def choose_window(scene_w: int, scene_h: int, box: tuple[float, float, float], eye_y: float,
                  aspect: float) -> tuple[float, float, float, float]:
    """(left, top, width, height) in scene pixels: the window of `aspect` (width/height) inside
    the scene, as large as it allows up to MAX_WINDOW sides of the face square `box` (x0, y0,
    side), centred on the square and with the eyes at EYES_AT, shifted to stay inside."""
    x0, y0, side = box
    height = min(scene_h, scene_w / aspect, MAX_WINDOW * side)
    width = height * aspect
    cx = x0 + side / 2
    left = min(max(cx - width / 2, 0.0), scene_w - width)
    top = min(max(eye_y - EYES_AT * height, 0.0), scene_h - height)
    return left, top, width, height


def feather(side: int) -> np.ndarray:
    """(side, side) float32 mask: 1 over the face and head, smoothly 0 at the square's border."""
    d = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32) / max(side, 1)
    t = np.clip((d - BAND[0]) / (BAND[1] - BAND[0]), 0.0, 1.0)
    ramp = t * t * (3 - 2 * t)  # smoothstep
    return np.ascontiguousarray(ramp[:, None] * ramp[None, :])


class SceneComposer:
    """__call__(avatar square) -> (height, width, 3) frame of the scene with the avatar pasted back."""

    def __init__(self, scene: np.ndarray, box: tuple[float, float, float], eye_y: float, width: int, height: int):
        sh, sw = scene.shape[:2]
        self.width, self.height = width, height
        self.window = choose_window(sw, sh, box, eye_y, width / height)
        left, top, ww, wh = self.window
        k = width / ww  # frame pixels per scene pixel
        m = np.array([[k, 0, -left * k], [0, k, -top * k]])
        interpolation = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
        if k < 1:  # AREA only shrinks through resize: crop, then resize
            part = scene[max(0, math.floor(top)):math.ceil(top + wh), max(0, math.floor(left)):math.ceil(left + ww)]
            self.background = cv2.resize(part, (width, height), interpolation=cv2.INTER_AREA)
        else:
            self.background = cv2.warpAffine(scene, m[:2], (width, height), flags=interpolation,
                                             borderMode=cv2.BORDER_REPLICATE)
        x0, y0, side = box
        # The square in frame pixels, whole ones (the avatar is scaled to it), and its part in the frame.
        self.sx, self.sy = round((x0 - left) * k), round((y0 - top) * k)
        self.side = max(2, round(side * k))
        fx0, fy0 = max(self.sx, 0), max(self.sy, 0)
        fx1, fy1 = min(self.sx + self.side, width), min(self.sy + self.side, height)
        self.frame_roi = (slice(fy0, fy1), slice(fx0, fx1))
        self.square_roi = (slice(fy0 - self.sy, fy1 - self.sy), slice(fx0 - self.sx, fx1 - self.sx))
        mask = feather(self.side)[self.square_roi]
        self.mask = cv2.merge([mask] * 3)
        self.scene_part = self.background[self.frame_roi].astype(np.float32)
        self.inverse = 1.0 - self.mask

    def __call__(self, avatar: np.ndarray) -> np.ndarray:
        out = self.background.copy()
        if self.frame_roi[0].stop <= self.frame_roi[0].start or self.frame_roi[1].stop <= self.frame_roi[1].start:
            return out
        # Enlarged bicubically: bilinear left a 1280x720 frame's face 0.74 of its photo's detail
        # (metrics.face_detail), bicubic 0.93, at the same cost (0.25 ms at 505 px).
        interpolation = cv2.INTER_AREA if self.side < avatar.shape[0] else cv2.INTER_CUBIC
        scaled = cv2.resize(avatar, (self.side, self.side), interpolation=interpolation)[self.square_roi]
        blended = cv2.multiply(scaled, self.mask, dtype=cv2.CV_32F)
        blended = cv2.add(blended, cv2.multiply(self.scene_part, self.inverse))
        out[self.frame_roi] = cv2.convertScaleAbs(blended)
        return out


def eye_height(identity, box: tuple[float, float, float]) -> float:
    """The identity's eyes' height in scene pixels (its neutral landmarks, in its reference's)."""
    eyes = identity.neutral[EYE_CORNERS.ravel(), 1].mean()
    return box[1] + float(eyes) * box[2] / identity.size


def composer(identity, width: int, height: int) -> SceneComposer | None:
    """The composer of the identity's scene at width x height, or None (no scene in its bundle)."""
    scene = identity.scene()
    if scene is None:
        return None
    image, box = scene
    return SceneComposer(image, box, eye_height(identity, box), width, height)


def framer(identity, width: int, height: int):
    """frame(avatar square) -> (height, width, 3): composed into the identity's scene, or
    fitted (pillarboxed) for an identity without one."""
    return composer(identity, width, height) or (lambda avatar: fit_to_frame(avatar, width, height))
