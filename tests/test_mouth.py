"""The mouth interior: the identity's own teeth when its photo shows them, painted teeth
(not a flat band) when it does not."""
import numpy as np

from engines.render.mesh import MOUTH_LOWER, MOUTH_UPPER
from engines.render.mouth import MEMORY_MIN_GAP, OWN_MIN_GAP, MouthMemory, MouthPainter, lip_gap
from test_warp import jaw_drop


def closed(points):
    """The same face with its lips together (inner lower lip moved onto the upper)."""
    out = points.copy()
    out[MOUTH_LOWER[1:-1]] = points[MOUTH_UPPER[1:-1]]
    return out


def column(image, target):
    """The pixels down the middle of the target's opening, top to bottom (luma)."""
    cx = int(round((target[13, 0] + target[14, 0]) / 2))
    return image[int(target[13, 1]) + 1:int(target[14, 1]), cx].astype(float) @ [0.299, 0.587, 0.114]


def test_photo_with_teeth_lends_its_own(demo):
    assert lip_gap(demo.neutral) >= OWN_MIN_GAP  # the astronaut smiles with teeth
    painter = MouthPainter(demo.reference, demo.neutral)
    assert painter.own is not None
    target = jaw_drop(demo.neutral, 16)
    image = demo.reference.copy()
    painter.paint(image, target)
    luma = column(image, target)
    third = len(luma) // 3
    # Its teeth under the upper lip, then the dark back of the mouth, then the lower teeth.
    assert luma[:third].max() > 150 and luma[third:2 * third].min() < 70
    # The teeth are the photo's: under the upper lip the column matches the reference's own.
    ref = column(demo.reference, demo.neutral)
    assert abs(luma[:3].mean() - ref[:3].mean()) < 40


def test_closed_mouth_photo_gets_painted_teeth_not_a_band(demo):
    neutral = closed(demo.neutral)
    painter = MouthPainter(demo.reference, neutral)
    assert painter.own is None
    for drop in (8, 16):
        target = neutral.copy()
        target[MOUTH_LOWER[1:-1], 1] += drop
        image = np.full_like(demo.reference, (200, 150, 130))  # skin only: what shows is painted
        painter.paint(image, target)
        luma = column(image, target)
        bright = (luma > 150).mean()
        assert 0.1 < bright <= 0.65, (drop, bright)  # teeth, but a narrow opening is not all teeth
        assert luma.min() < 70  # a dark cavity shows
        # Along the upper teeth: the faint gaps between neighbours, not one flat band.
        y = int(target[13, 1]) + 2
        x0, x1 = int(target[78, 0]) + 4, int(target[308, 0]) - 4
        row = image[y, x0:x1].astype(float) @ [0.299, 0.587, 0.114]
        assert row.max() - row.min() > 15


def green_mouth_frame(demo, target):
    """A frame whose open mouth (inside the inner lips of `target`) is pure green."""
    import cv2

    frame = demo.reference.copy()
    inner = np.concatenate([target[MOUTH_UPPER, :2], target[MOUTH_LOWER[-2:0:-1], :2]])
    cv2.fillPoly(frame, [np.round(inner).astype(np.int32)], (0, 200, 0))
    return frame


def test_memory_keeps_spread_open_mouths_and_round_trips(demo, tmp_path):
    shut = closed(demo.neutral)
    points = np.stack([shut] * 5 + [jaw_drop(demo.neutral, d) for d in (4, 8, 12, 16, 20)])
    frames = np.stack([demo.reference] * len(points))
    memory = MouthMemory.build(frames, points, size=3)
    # Three of the five open mouths, the widest first, spread over the openings; no closed one.
    gaps = [lip_gap(p) for p in memory.points]
    assert len(memory.patches) == 3 and gaps[0] == max(gaps) and min(gaps) >= MEMORY_MIN_GAP
    assert max(gaps) - min(gaps) > 0.5 * (lip_gap(points[-1]) - lip_gap(points[5]))
    memory.save(tmp_path / "m.npz")
    again = MouthMemory.load(tmp_path / "m.npz")
    assert np.array_equal(again.patches, memory.patches) and np.allclose(again.points, memory.points)
    assert MouthMemory.build(frames[:5], points[:5]) is None  # nothing opens: no memory


def test_open_mouth_is_drawn_from_the_identitys_memory(demo):
    # The remembered mouth opening like the target's is the one drawn: its green interior.
    wide = jaw_drop(demo.neutral, 16)
    narrow = jaw_drop(demo.neutral, 6)
    frames = np.stack([green_mouth_frame(demo, wide), demo.reference])
    memory = MouthMemory.build(frames, np.stack([wide, narrow]))
    target = jaw_drop(demo.neutral, 15)
    with_memory, without = demo.reference.copy(), demo.reference.copy()
    MouthPainter(demo.reference, demo.neutral, memory).paint(with_memory, target)
    MouthPainter(demo.reference, demo.neutral).paint(without, target)
    cx = int(round((target[13, 0] + target[14, 0]) / 2))
    mid = slice(int(target[13, 1]) + 3, int(target[14, 1]) - 2)
    green = lambda img: (img[mid, cx, 1].astype(int) - img[mid, cx, 0]).mean()  # noqa: E731
    assert green(with_memory) > 120 and green(without) < 30


def test_memory_choice_holds_between_two_mouths(demo):
    narrow, wide = jaw_drop(demo.neutral, 8), jaw_drop(demo.neutral, 16)
    memory = MouthMemory.build(np.stack([demo.reference] * 2), np.stack([narrow, wide]))
    i_narrow, i_wide = memory.choose(narrow), memory.choose(wide)
    assert i_narrow != i_wide
    between = jaw_drop(demo.neutral, 12)  # as near to either: keep whichever was drawn
    assert memory.choose(between, previous=i_narrow) == i_narrow
    assert memory.choose(between, previous=i_wide) == i_wide
    assert memory.choose(wide, previous=i_narrow) == i_wide  # clearly nearer: switch
