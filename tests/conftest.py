import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = ["selfscan_a.mp4", "selfscan_b.mp4", "drive_wink.mp4", "drive_expressive.mp4"]


def shared_clip(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared clip {name} not found in {SHARED} (real clips are not part of the repo)")
    return path


def read_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    import av

    frames = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if limit and len(frames) >= limit:
                break
    return frames


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """An identity store with the embedded demo identity, shared by the whole session."""
    from engines.identity import IdentityStore

    s = IdentityStore(tmp_path_factory.mktemp("home") / "identities")
    s.ensure_default()
    return s


@pytest.fixture(scope="session")
def demo(store):
    return store.load("demo")


@pytest.fixture(scope="session")
def expressive_landmarks():
    """Driver landmarks of drive_expressive.mp4 (None where no face), with its frames."""
    from engines.landmarks import FaceLandmarker

    frames = read_frames(shared_clip("drive_expressive.mp4"))
    with FaceLandmarker() as lm:
        return frames, [lm(f) for f in frames]
