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
    if width > height:
        return {"left": (slice(None), slice(0, side)), "right": (slice(None), slice(width - side, width)),
                "centre": (slice(None), slice((width - side) // 2, (width + side) // 2))}
    return {"top": (slice(0, side), slice(None)), "bottom": (slice(height - side, height), slice(None)),
            "middle": (slice((height - side) // 2, (height + side) // 2), slice(None))}


def verify_file(path: str | os.PathLike) -> Verdict:
    """Raises VideoError when the file is neither a readable image nor video."""
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        gray = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) if p.is_file() else None
        if gray is None:
            raise VideoError(f"{p}: not a readable image")
        return _verdict(p, "image", [(0.0, [gray])])
    with open_video(p) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 30)
        per_segment = max(1, round(fps * SEGMENT_SECONDS))
        segments, frames = [], []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="gray"))
                if len(frames) == per_segment:
                    segments.append((len(segments) * SEGMENT_SECONDS, frames))
                    frames = []
        except av.error.FFmpegError as e:
            raise VideoError(f"{p}: cannot decode ({e})")
        if frames:
            segments.append((len(segments) * SEGMENT_SECONDS, frames))
    if not segments:
        raise VideoError(f"{p}: has no decodable frames")
    return _verdict(p, "video", segments)


def _verdict(path: Path, kind: str, segments: list[tuple[float, list[np.ndarray]]]) -> Verdict:
    results = [_segment(start, frames) for start, frames in segments]
    found = collections.Counter(s.payload for s in results if s.payload)
    payload, hits = found.most_common(1)[0] if found else (None, 0)
    # A segment matches a random code with odds of 1.5e-5 (engines/provenance/watermark.py), which over
    # an hour of footage is not negligible; two segments matching the same one is.
    if hits < min(2, len(results)):
        payload, hits = None, 0
    return Verdict(str(path), kind, sum(s.frames for s in results), payload is not None, payload,
                   round(hits / len(results), 3), results)


def _segment(start: float, frames: list[np.ndarray]) -> Segment:
    best = None
    for name, (ys, xs) in regions(*frames[0].shape[:2]).items():
        d = watermark.detect(np.array([watermark.project(f[ys, xs]) for f in frames]))
        if d.found:
            return Segment(start, len(frames), name, str(d.payload), round(d.margin, 3))
        best = best if best is not None and best.margin >= d.margin else d
    return Segment(start, len(frames), None, None, round(best.margin, 3))
