"""An enrolled identity's own closing eyes (eyes.EyeMemory): what is remembered, and that
a closing target eye is drawn from it instead of painted lid skin."""
import cv2
import numpy as np

from engines.render.eyes import EYES, EyelidPainter, EyeMemory, eye_shape
from test_warp import blink


def green_eyes_frame(demo, points):
    """The reference with both eye openings of `points` (and a band round them) pure green."""
    frame = demo.reference.copy()
    for upper, lower in EYES:
        outline = np.concatenate([points[upper, :2], points[lower[-2:0:-1], :2]])
        cv2.fillPoly(frame, [np.round(outline).astype(np.int32)], (0, 200, 0))
        cv2.polylines(frame, [np.round(outline).astype(np.int32)], True, (0, 200, 0), 7)
    return frame


def test_eye_memory_keeps_closing_eyes_and_round_trips(demo, tmp_path):
    shut = blink(demo.neutral)
    points = np.stack([demo.neutral] * 6 + [shut] * 2)
    frames = np.stack([demo.reference] * len(points))
    memory = EyeMemory.build(frames, points)
    assert len(memory.patches) == 2  # the two blinks; no open eye is worth remembering
    assert (memory.shapes < 0.6 * eye_shape(demo.neutral)).all()
    memory.save(tmp_path / "e.npz")
    again = EyeMemory.load(tmp_path / "e.npz")
    assert np.array_equal(again.patches, memory.patches)
    assert EyeMemory.build(frames[:6], points[:6]) is None  # the eyes never close: no memory


def test_closing_eye_is_drawn_from_the_identitys_memory(demo):
    shut = blink(demo.neutral)
    frames = np.stack([green_eyes_frame(demo, shut)] + [demo.reference] * 4)
    memory = EyeMemory.build(frames, np.stack([shut] + [demo.neutral] * 4))
    with_memory, without = demo.reference.copy(), demo.reference.copy()
    EyelidPainter(demo.reference, demo.neutral, memory).paint(with_memory, shut)
    EyelidPainter(demo.reference, demo.neutral).paint(without, shut)
    for upper, lower in EYES:
        x, y = np.round(shut[upper[4], :2]).astype(int)
        spot = lambda img: int(img[y, x, 1]) - int(img[y, x, 0])  # noqa: E731  green over red
        assert spot(with_memory) > 100 and spot(without) < 30
