"""Opening and reading video files, with errors that say what is wrong (shared by render,
enroll, eval and bench)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np


class VideoError(ValueError):
    """A video file cannot be used; the message says why."""


def open_video(path: str | os.PathLike):
    """An open PyAV container with at least one video stream, or VideoError."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if not p.is_file():
        raise VideoError(f"{p}: not a file")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"{p}: not a readable video ({e})")
    if not container.streams.video:
        container.close()
        raise VideoError(f"{p}: has no video stream")
    return container


def read_video(path: str | os.PathLike, limit: int | None = None,
               max_pixels: int | None = None) -> Iterator[np.ndarray]:
    """Yield the RGB frames of a video, at most `limit` of them; VideoError (at the first
    frame asked for) if it cannot be read. Frames are decoded one at a time, so a long
    video never has to fit in memory. With `max_pixels`, every frame's size is checked
    before it is converted (a stream may change its size after its first frame): VideoError
    for one larger than that."""
    with open_video(path) as container:
        n = 0
        for frame in container.decode(video=0):
            if max_pixels and frame.width * frame.height > max_pixels:
                raise VideoError(f"{path}: frame {n + 1} is {frame.width}x{frame.height}, over the limit of "
                                 f"{max_pixels} pixels")
            yield frame.to_ndarray(format="rgb24")
            n += 1
            if limit and n >= limit:
                break
