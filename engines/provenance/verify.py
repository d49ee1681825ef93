"""`avatar verify`: does a video or image carry the avatar watermark, and with what payload?

A video is cut into 2-second segments; each segment is decoded on its own (the projections
of its frames averaged, engines/provenance/watermark.py), so a clip that was cut, or whose avatar
appears only in part of it, still shows where the mark is. A frame is read whole when it
is about square (the avatar as sent), else as squares along its long side (a side-by-side
render: driver left, avatar right)."""
from __future__ import annotations

import collections
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from . import watermark
from ..video import VideoError, open_video

SEGMENT_SECONDS = 2.0
MAX_PIXELS = 7680 * 4320  # 8K: a larger image or frame is refused before it is decoded
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class Segment:
    start_s: float
    frames: int
    region: str | None  # where the mark was found: "whole", "left", "right", ...
    payload: str | None
    margin: float


@dataclass
class Verdict:
    path: str
    kind: str  # "video" or "image"
    frames: int
    found: bool
    payload: str | None  # the payload most segments agree on
    confidence: float  # share of segments carrying that payload
    segments: list[Segment] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def regions(height: int, width: int) -> dict[str, tuple[slice, slice]]:
    """The squares of a frame the avatar may fill."""
    if max(height, width) <= 1.25 * min(height, width):
        return {"whole": (slice(None), slice(None))}
    side = min(height, width)
    if width > height:  # "whole": a frame marked whole (composed into the identity's scene, issue #35)
        return {"whole": (slice(None), slice(None)), "left": (slice(None), slice(0, side)), "right": (slice(None), slice(width - side, width)),
                "centre": (slice(None), slice((width - side) // 2, (width + side) // 2))}
    return {"top": (slice(0, side), slice(None)), "bottom": (slice(height - side, height), slice(None)),
            "middle": (slice((height - side) // 2, (height + side) // 2), slice(None))}


def verify_file(path: str | os.PathLike) -> Verdict:
    """Raises VideoError when the file is neither a readable image nor video, or its frames
    are over MAX_PIXELS."""
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        segment = SegmentSum(0.0)
        segment.add(read_gray(p))
        return _verdict(p, "image", [segment.result()])
    with open_video(p) as container:
        stream = container.streams.video[0]
        check_pixels(p, stream.codec_context.width, stream.codec_context.height)
        fps = float(stream.average_rate or 30)
        per_segment = max(1, round(fps * SEGMENT_SECONDS))
        segments, current = [], SegmentSum(0.0)
        try:
            for frame in container.decode(stream):
                check_pixels(p, frame.width, frame.height)  # a stream may grow after its header
                current.add(frame.to_ndarray(format="gray"))
                if current.frames == per_segment:
                    segments.append(current.result())
                    current = SegmentSum(len(segments) * SEGMENT_SECONDS)
        except av.error.FFmpegError as e:
            raise VideoError(f"{p}: cannot decode ({e})")
        if current.frames:
            segments.append(current.result())
    if not segments:
        raise VideoError(f"{p}: has no decodable frames")
    return _verdict(p, "video", segments)


def check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise VideoError(f"{path}: {width}x{height} is over the limit of {MAX_PIXELS} pixels (7680x4320)")


def read_gray(path: Path) -> np.ndarray:
    """The image's luma, its size read from its header first: a few bytes can claim a size
    that takes gigabytes to decode."""
    from PIL import Image

    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise VideoError(f"{path}: the image is over the limit of {MAX_PIXELS} pixels (7680x4320)") from None
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: how some of Pillow's parsers say "broken"
        raise VideoError(f"{path}: not a readable image ({e})") from None
    check_pixels(path, width, height)
    try:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    except cv2.error as e:
        raise VideoError(f"{path}: not a readable image ({str(e).strip()[:200]})") from None
    if gray is None:
        raise VideoError(f"{path}: not a readable image")
    return gray


class SegmentSum:
    """A segment's frames as they are read: per region, the sum of their projections (the
    detector averages them). Nothing of a frame is kept, so memory does not grow with the
    frames a segment has (a 42 KB video declaring 240 fps made segments of 480 1080p frames:
    1.2 GB held)."""

    def __init__(self, start: float):
        self.start, self.frames = start, 0
        self.regions: dict[str, tuple[slice, slice]] = {}
        self.sums: dict[str, np.ndarray] = {}

    def add(self, gray: np.ndarray) -> None:
        if not self.frames:  # the first frame says where the avatar may be
            self.regions = regions(*gray.shape[:2])
            self.sums = {name: np.zeros(watermark.NBITS) for name in self.regions}
        for name, (ys, xs) in self.regions.items():
            self.sums[name] += watermark.project(gray[ys, xs])
        self.frames += 1

    def result(self) -> Segment:
        best = None
        for name, total in self.sums.items():
            d = watermark.detect(total / self.frames)
            if d.found:
                return Segment(self.start, self.frames, name, str(d.payload), round(d.margin, 3))
            best = best if best is not None and best.margin >= d.margin else d
        return Segment(self.start, self.frames, None, None, round(best.margin, 3))


def _verdict(path: Path, kind: str, results: list[Segment]) -> Verdict:
    found = collections.Counter(s.payload for s in results if s.payload)
    payload, hits = found.most_common(1)[0] if found else (None, 0)
    # A segment matches a random code with odds of 1.5e-5 (engines/provenance/watermark.py), which over
    # an hour of footage is not negligible; two segments matching the same one is.
    if hits < min(2, len(results)):
        payload, hits = None, 0
    return Verdict(str(path), kind, sum(s.frames for s in results), payload is not None, payload,
                   round(hits / len(results), 3), results)
