"""The mouth interior: the identity's own teeth when its photo shows them, painted teeth
(not a flat band) when it does not."""
import numpy as np

from engines.mesh import MOUTH_LOWER, MOUTH_UPPER
from engines.mouth import OWN_MIN_GAP, MouthPainter, lip_gap
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
