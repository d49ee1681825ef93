"""Opening video files with errors that say what is wrong (shared by render and enroll)."""
from __future__ import annotations

import os
from pathlib import Path

import av


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
