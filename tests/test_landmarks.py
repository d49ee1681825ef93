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
