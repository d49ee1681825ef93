import os

import pytest

from helpers import read_frames, shared_clip

os.environ.setdefault("GLOG_minloglevel", "2")

# The in-process servers of the tests run as `avatar` does: one BLAS thread (server/cli.py).
from server.cli import single_threaded_blas  # noqa: E402

single_threaded_blas()


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
