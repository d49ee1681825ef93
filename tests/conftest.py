import gc
import logging
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


class _UnretrievedTaskErrors(logging.Handler):
    """asyncio's "Task exception was never retrieved" (and "exception was never retrieved" of
    futures): an error a task raised that nobody awaited. Each one fails the suite."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "never retrieved" in message:
            self.seen.append(message + "".join(logging.Formatter().formatException(record.exc_info)
                                               if record.exc_info else ""))


_unretrieved = _UnretrievedTaskErrors()
logging.getLogger("asyncio").addHandler(_unretrieved)


@pytest.fixture(autouse=True)
def no_unretrieved_task_errors():
    """A test fails when asyncio reports an exception no one retrieved while it ran (found as
    the garbage collector meets the task: so also checked once more at the session's end)."""
    before = len(_unretrieved.seen)
    yield
    assert len(_unretrieved.seen) == before, "\n".join(_unretrieved.seen[before:])


@pytest.fixture(autouse=True, scope="session")
def no_unretrieved_task_errors_at_the_end():
    yield
    gc.collect()
    assert not _unretrieved.seen, "\n".join(_unretrieved.seen)
