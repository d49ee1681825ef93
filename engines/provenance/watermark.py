"""Invisible watermark on every synthesized frame: a 64-bit code in the frame's luma.

Why not a library: invisible-watermark's schemes, measured at 256² on this CPU (`avatar
bench watermark` runs them as the baseline when the package is installed), cost 17 ms
(dwtDct), 48 ms (dwtDctSvd) and 380 ms (rivaGan) per frame against a 2 ms budget, and
the DWT-DCT pair stays under 40 dB PSNR at its default strength. So this is the textbook
scheme instead, small enough to read: improved spread spectrum (Malvar & Florêncio, 2003).

- 64 keyed, band-limited, orthonormal noise patterns live on a 128² grid that is
  stretched over the frame (periods of 4-12 px at 256²). Chosen by measurement (`avatar
  bench watermark`): lower bands survive codecs no better here, because faces and
  backgrounds carry far more energy there, which the mark must then outweigh.
- Bit i is the sign of the frame's luma projected onto pattern i. Embedding measures the
  frame's own projections and adds just enough of each pattern to push it to at least
  `strength` on the right side ("informed" embedding: the picture itself is no noise to
  the decoder, and bits it already carries cost nothing). The change is capped at
  MAX_RMS, so no frame falls under 40 dB PSNR. A frame that needs more gets every bit
  pushed to a lower common level instead, the ones its picture fights most first
  (Marker._pushes), and the segment average and the soft decoding below do the rest.
- The same delta goes to R, G and B, so only luma changes. Live sessions add it to the
  luma rows of the I420 planes they encode instead (Marker.mark_i420): the same mark.
- Decoding averages the projections over many frames (a 2-second segment), then checks
  an 8-bit sync word and a CRC-16 over the payload (2^-24 odds for a random picture),
  trying the 8 least reliable bits flipped when that fails (so 2^-16 per segment).

The patterns come from a public seed: anyone can check a mark, and anyone could forge
one. The mark says "synthesized by an avatar server", it does not prove who made a file;
signed C2PA manifests do that for files.

Payload: 16 bits of server id + 24 bits of use id (the first 6 hex digits of the session
or render id that `avatar audit --id` finds).
"""
from __future__ import annotations

import binascii
import hashlib
import socket
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .label import draw_label

GRID = 128
SYNC = 0xA5  # 8 bits
DATA_BITS = 40
NBITS = 8 + DATA_BITS + 16
BAND = (1 / 6, 1 / 2)  # cycles per grid pixel: periods of 4-12 px in a 256² frame
SEED = b"avatar-server watermark v1"
STRENGTH = 40.0  # target projection per bit (luma levels x unit-norm pattern)
MAX_RMS = 2.4  # luma change per pixel at most: PSNR >= 40.5 dB whatever the picture
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
STUDIO_RANGE = 219 / 255  # I420 luma levels (16-235) per full-range grey level


@dataclass(frozen=True)
class Payload:
    server: int  # 16 bits
    use: int  # 24 bits: the use id's first 6 hex digits

    @classmethod
    def for_use(cls, server_name: str, use_id: str) -> "Payload":
        digest = hashlib.sha256(server_name.encode()).digest()
        return cls(int.from_bytes(digest[:2], "big"), int(use_id[:6], 16))

    @classmethod
    def here(cls, use_id: str) -> "Payload":
        """The payload of use `use_id` on this machine (server id: its host name)."""
        return cls.for_use(socket.gethostname(), use_id)

    def __str__(self) -> str:
        return f"server {self.server:04x} use {self.use:06x}"

    def bits(self) -> np.ndarray:
        data = (self.server << 24 | self.use).to_bytes(5, "big")
        word = bytes([SYNC]) + data + _crc16(data).to_bytes(2, "big")
        return np.unpackbits(np.frombuffer(word, np.uint8))

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> "Payload | None":
        """The payload these 64 bits carry, or None if the sync word or the CRC is wrong."""
        word = np.packbits(bits.astype(np.uint8)).tobytes()
        data = word[1:6]
        if word[0] != SYNC or int.from_bytes(word[6:], "big") != _crc16(data):
            return None
        value = int.from_bytes(data, "big")
        return cls(value >> 24, value & 0xFFFFFF)


def _crc16(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)


@lru_cache(maxsize=1)
def patterns() -> np.ndarray:
    """(NBITS, GRID*GRID) float32: orthonormal rows, band-limited, from the public seed."""
    rng = np.random.default_rng(np.frombuffer(hashlib.sha256(SEED).digest(), np.uint32))
    fy = np.fft.fftfreq(GRID)[:, None]
    fx = np.fft.rfftfreq(GRID)[None, :]
    radius = np.hypot(fy, fx)
    band = (radius >= BAND[0]) & (radius <= BAND[1])
    noise = rng.standard_normal((NBITS, GRID, GRID))
    limited = np.fft.irfft2(np.fft.rfft2(noise) * band, s=(GRID, GRID))
    q, _ = np.linalg.qr(limited.reshape(NBITS, -1).T)
    return np.ascontiguousarray(q.T, np.float32)


@lru_cache(maxsize=8)
def _gain(height: int, width: int) -> float:
    """How much of a pattern survives being stretched to the frame and shrunk back."""
    p = patterns()
    up = cv2.resize(p[0].reshape(GRID, GRID), (width, height), interpolation=cv2.INTER_LINEAR)
    back = cv2.resize(up, (GRID, GRID), interpolation=cv2.INTER_AREA).ravel()
    return float(back @ p[0])


def luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def project(y: np.ndarray) -> np.ndarray:
    """The NBITS pattern projections of a luma image of any size."""
    small = cv2.resize(y, (GRID, GRID), interpolation=cv2.INTER_AREA).astype(np.float32)
    return patterns() @ small.ravel()


# From this short side on, the mask is worked out at half size: the mark's periods there are
# 20 px and more, so a 10 px contrast neighbourhood shapes it as well, at a quarter of the
# pixels (3.3 -> 0.8 ms at 1280x720 on this CPU).
HALF_MASK_FROM = 512


def mask_input(y: np.ndarray) -> np.ndarray:
    h, w = y.shape
    if min(h, w) < HALF_MASK_FROM:
        return y
    return cv2.resize(y, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def texture_mask(y: np.ndarray) -> np.ndarray:
    """Where the mark may be stronger: local contrast (5x5 px) relative to the frame's, in
    [0.5, 2]. Grain shows on smooth skin and walls and hides in hair and fabric; the floor
    keeps enough of it everywhere to survive codecs (measured: a floor of 0.25 loses VP8).
    Frames from HALF_MASK_FROM px on the short side get it at half size (see mask_input)."""
    # Box filters straight from the 8-bit luma and its 16-bit squares: a third of the time
    # of blurring float copies (OpenCV's float box filter is its slow path).
    mean = cv2.boxFilter(y, cv2.CV_32F, (5, 5))
    variance = cv2.boxFilter(cv2.multiply(y, y, dtype=cv2.CV_16U), cv2.CV_32F, (5, 5))
    variance -= mean * mean
    contrast = cv2.sqrt(np.maximum(variance, 0.0, out=variance))
    contrast += 4.0
    contrast *= np.sqrt(contrast.size) / cv2.norm(contrast)  # over its root mean square
    return np.clip(contrast, 0.5, 2.0, out=contrast)


# The rms of the change per unit of the pushes' length, over their scale (_gain x mask mean),
# before a frame of that size has been marked: 0.0046-0.0048 on the demo, at
# 256² to 1280x720. Each frame's own then says it for the next.
FIRST_RMS_PER_PUSH = 0.0046


class Marker:
    """Marks frames with one payload (one per session or render)."""

    def __init__(self, payload: Payload, strength: float = STRENGTH, max_rms: float = MAX_RMS):
        self.payload = payload
        self.signs = np.where(payload.bits() == 1, 1.0, -1.0).astype(np.float32)
        self.strength = strength
        self.max_rms = max_rms
        self._rms_per_push: dict[tuple[int, int], float] = {}  # per frame size, from the last frame

    def __call__(self, rgb: np.ndarray, badge: bool = False) -> np.ndarray:
        """A marked copy of an RGB uint8 frame; with `badge`, the visible "AI avatar" badge
        is drawn first (a badge drawn over the mark would erase some of its bits)."""
        if badge:
            rgb = draw_label(rgb)
        delta = self.luma_change(luma(rgb))
        return cv2.add(rgb, cv2.merge([delta] * 3), dtype=cv2.CV_8U)

    def mark_i420(self, planes: np.ndarray) -> np.ndarray:
        """Mark I420 planes as OpenCV's RGB2YUV_I420 lays them out, in place: the same mark
        as on the RGB frame (its change is luma only), added to the luma rows alone, which
        costs a tenth of adding it to three channels (0.2 against 1.9 ms at 1280x720).
        Their luma is studio range (16-235), so the change is measured and made in its units."""
        y = planes[:planes.shape[0] * 2 // 3]
        cv2.add(y, self.luma_change(y, STUDIO_RANGE), dst=y, dtype=cv2.CV_8U)
        return planes

    def luma_change(self, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """The float32 change to luma `y` that marks it; `scale`: y's levels per full-range
        grey level (the projections of a picture scale with it, patterns having no DC)."""
        h, w = y.shape
        current = project(y) * self.signs / scale
        mask = texture_mask(mask_input(y))
        unit = _gain(h, w) * float(mask.mean())
        push = self._pushes(current, self._rms_per_push.get((w, h), FIRST_RMS_PER_PUSH / unit))
        delta = self._delta(push / unit, mask, (w, h))
        rms = cv2.norm(delta) / np.sqrt(delta.size)
        if np.any(push):  # the change is linear in the pushes: what this frame cost tells the next
            self._rms_per_push[(w, h)] = rms / float(np.linalg.norm(push))
        if rms > self.max_rms:  # the estimate from the frame before fell short: scale to the cap
            delta *= self.max_rms / rms
        if scale != 1.0:
            delta *= scale
        return delta

    def _pushes(self, current: np.ndarray, rms_per_push: float) -> np.ndarray:
        """How much of each bit's pattern to add: up to `strength` where the picture has less;
        when that costs more than max_rms (rms_per_push: the change's rms per unit of push's
        length, estimated), up to a lower common level instead, the weakest bits first
        (water-filling). Scaling every push alike had left the bits the picture fights near
        zero: on the demo's 640x360 call frame the weakest at 0.13-0.30 of `strength`, now
        0.36-0.51, at the same PSNR. Over driven frames through VP8, 2-s segments found: 14/16
        at 300 kbps and 16/16 at 500 kbps, against 11/16 and 14/16 (docs/BENCHMARKS.md).
        (Giving up the costly bits instead left them strongly wrong.)"""
        push = np.maximum(self.strength - current, 0.0)
        budget = self.max_rms / max(rms_per_push, 1e-12)
        if np.linalg.norm(push) <= budget:
            return push
        lo, hi = float(current.min()), self.strength
        for _ in range(30):  # bisection on the level: the pushes' length grows with it
            t = (lo + hi) / 2
            lo, hi = (t, hi) if np.linalg.norm(np.maximum(t - current, 0.0)) <= budget else (lo, t)
        return np.maximum(lo - current, 0.0)

    def _delta(self, push: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The luma change of a frame of `size` (w, h) that adds `push` of each bit's
        pattern, shaped by the mask (at that size or half of it)."""
        h, w = mask.shape
        delta = (patterns().T @ (push * self.signs)).reshape(GRID, GRID)
        delta = cv2.resize(delta, (w, h), interpolation=cv2.INTER_LINEAR) * mask
        return delta if (w, h) == size else cv2.resize(delta, size, interpolation=cv2.INTER_LINEAR)


@dataclass
class Detection:
    payload: Payload | None
    frames: int
    margin: float  # mean projection on the decoded side over STRENGTH: ~1 fresh, less after lossy coding

    @property
    def found(self) -> bool:
        return self.payload is not None


# The least reliable bits tried flipped when the check fails: 2^8 more chances of a false
# match, 1.5e-5 per segment; `avatar verify` also wants two segments to agree on a payload.
CHASE_BITS = 8


def detect(projections: np.ndarray) -> Detection:
    """Decode from the projections of one or more frames of the same segment ((n, NBITS)).

    Soft decoding: when the hard decision fails its check, the CHASE_BITS least reliable
    bits are flipped in every combination (Chase, 1972), still checked by sync + CRC."""
    projections = np.atleast_2d(projections)
    mean = projections.mean(0)
    bits = (mean > 0).astype(np.uint8)
    margin = float(np.abs(mean).mean() / STRENGTH)
    weakest = np.argsort(np.abs(mean))[:CHASE_BITS]
    for flips in range(1 << CHASE_BITS):
        trial = bits.copy()
        for k, i in enumerate(weakest):
            if flips >> k & 1:
                trial[i] ^= 1
        payload = Payload.from_bits(trial)
        if payload is not None:
            return Detection(payload, len(projections), margin)
    return Detection(None, len(projections), margin)
