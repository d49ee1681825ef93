import numpy as np
import pytest

from helpers import CLIPS, read_frames, shared_clip
from engines.landmarks import NUM_POINTS, FaceLandmarker, inter_ocular


def test_no_face_is_none_not_an_exception():
    with FaceLandmarker(static=True) as lm:
        assert lm(np.full((240, 320, 3), 127, np.uint8)) is None


def test_rejects_non_rgb_input():
    with FaceLandmarker(static=True) as lm:
        with pytest.raises(ValueError, match="RGB uint8"):
            lm(np.zeros((64, 64), np.uint8))


def test_photo_landmarks_in_pixels(demo):
    with FaceLandmarker(static=True) as lm:
        pts = lm(demo.reference)
    assert pts.shape == (NUM_POINTS, 3)
    assert (pts[:, :2] >= 0).all() and (pts[:, :2] < 256).all()
    assert 40 < inter_ocular(pts) < 150


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIPS)
def test_face_found_on_95_percent_of_frames(clip):
    frames = read_frames(shared_clip(clip))
    with FaceLandmarker() as lm:
        found = sum(lm(f) is not None for f in frames)
    assert found >= 0.95 * len(frames), f"{clip}: face on {found}/{len(frames)} frames"


def test_start_up_chatter_is_dropped_and_other_stderr_kept(demo, tmp_path):
    import subprocess
    import sys

    image = tmp_path / "face.npy"
    np.save(image, demo.reference)
    run = ("import os, numpy as np\n"
           "from engines.landmarks import FaceLandmarker, start_up_chatter_dropped\n"
           "import mediapipe as mp\n"
           "face = np.load({image!r})\n"
           "{body}\n")
    ours = ("lm = FaceLandmarker()\n"
            "assert lm(face) is not None and lm(face) is not None\n"
            "with start_up_chatter_dropped():\n"
            "    os.write(2, b'a real warning\\n')")
    theirs = "mp.solutions.face_mesh.FaceMesh(refine_landmarks=True).process(face)"
    err = {}
    for name, body in (("ours", ours), ("theirs", theirs)):
        done = subprocess.run([sys.executable, "-c", run.format(image=str(image), body=body)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        err[name] = done.stderr
    # mediapipe itself says all of it (so the pattern matches what it really writes) ...
    assert "inference_feedback_manager" in err["theirs"] and "XNNPACK" in err["theirs"]
    # ... and none of it gets through, while anything else written meanwhile does.
    assert "a real warning" in err["ours"]
    assert not any(word in err["ours"] for word in ("XNNPACK", "absl", "feedback", "NORM_RECT")), err["ours"]


def test_stderr_swaps_from_threads_at_once_leave_stderr_as_it_was():
    # Sessions computing in threads of one process start their landmarkers together.
    import os
    import threading
    import time

    from engines.landmarks import start_up_chatter_dropped

    before = os.fstat(2)
    ready = threading.Barrier(4)

    def swap():
        ready.wait()
        for _ in range(10):
            with start_up_chatter_dropped():
                time.sleep(0.005)  # a FaceMesh starting: long enough for the others to come

    threads = [threading.Thread(target=swap) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
