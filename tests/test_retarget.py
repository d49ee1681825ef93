import numpy as np
import pytest

from engines.render import geometry
from engines.landmarks import FACE_LEFT, FACE_RIGHT, inter_ocular, mouth_openness
from engines.retarget import OneEuroFilter, RetargetControls, Retargeter
from scipy.spatial.transform import Rotation


def posed(points, yaw_deg=0.0, shift=(0, 0, 0), scale=1.0):
    c = points.mean(0)
    rot = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    return ((points - c) @ rot.T * scale + c + np.array(shift)).astype(np.float32)


def norm_error(a, b, ref):
    return float(np.linalg.norm(a[:, :2] - b[:, :2], axis=1).mean() / inter_ocular(ref))


def valid(lms):
    return [p for p in lms if p is not None]


def test_self_retargeting_reproduces_driver(expressive_landmarks):
    _, lms = expressive_landmarks
    driver = valid(lms)
    # Identity = the driver, with the same neutral (its first frame).
    rt = Retargeter(driver[0], smoothing=False, calibration_frames=1)
    errors = [norm_error(rt.update(p, i / 30), p, driver[0]) for i, p in enumerate(driver)]
    assert max(errors) < 1e-3
    smoothed = Retargeter(driver[0], calibration_frames=1)
    errors = [norm_error(smoothed.update(p, i / 30), p, driver[0]) for i, p in enumerate(driver)]
    assert np.median(errors) < 0.02  # the jitter filter costs little lag


def test_self_retargeting_synthetic(demo):
    n = demo.neutral
    rt = Retargeter(n, smoothing=False, calibration_frames=1)
    rt.update(n, 0.0)
    moved = posed(n, yaw_deg=15, shift=(8, -5, 0), scale=1.1)
    moved[14, 1] += 12  # lower lip drops
    assert norm_error(rt.update(moved, 0.04), moved, n) < 1e-3


def test_cross_identity_keeps_identity_face_shape(demo, expressive_landmarks):
    _, lms = expressive_landmarks
    rt = Retargeter(demo.neutral, RetargetControls(freeze_head=True))
    iod0 = inter_ocular(demo.neutral)
    width0 = np.linalg.norm(demo.neutral[FACE_LEFT, :2] - demo.neutral[FACE_RIGHT, :2])
    iod, width = [], []
    for i, p in enumerate(valid(lms)):
        out = rt.update(p, i / 30)
        iod.append(abs(inter_ocular(out) / iod0 - 1))
        width.append(abs(np.linalg.norm(out[FACE_LEFT, :2] - out[FACE_RIGHT, :2]) / width0 - 1))
    for name, rel in (("inter-ocular distance", iod), ("face width", width)):
        # mediapipe's depth is approximate, so extreme turns leave a few percent of residue
        assert np.median(rel) < 0.02 and np.percentile(rel, 95) < 0.04 and max(rel) < 0.08, name


def test_driver_expression_reaches_identity(demo, expressive_landmarks):
    _, lms = expressive_landmarks
    rt = Retargeter(demo.neutral)
    pairs = [(mouth_openness(p), mouth_openness(rt.update(p, i / 30))) for i, p in enumerate(lms) if p is not None]
    d, o = np.array(pairs).T
    assert np.corrcoef(d, o)[0, 1] > 0.9


def test_gains_and_freeze(demo):
    n = demo.neutral
    turned = posed(n, yaw_deg=20, shift=(10, 0, 0))
    turned[14, 1] += 10
    outs = {}
    for name, c in {"frozen": RetargetControls(freeze_head=True), "gain0": RetargetControls(head_gain=0.0),
                    "no_expr": RetargetControls(expression_gain=0.0, freeze_head=True)}.items():
        rt = Retargeter(n, c, smoothing=False, calibration_frames=1)
        rt.update(n, 0)
        outs[name] = rt.update(turned, 0.04)
    assert norm_error(outs["frozen"], outs["gain0"], n) < 1e-3
    assert norm_error(outs["no_expr"], n, n) < 1e-3
    assert outs["frozen"][14, 1] - n[14, 1] > 5  # expression kept while the head stays still


@pytest.mark.parametrize("bad", [-0.1, 2.5, float("nan"), "1"])
def test_controls_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match="expression_gain"):
        RetargetControls(expression_gain=bad).validated()


def test_face_lost_eases_back_to_neutral(demo):
    n = demo.neutral
    rt = Retargeter(n, smoothing=False, calibration_frames=1)
    rt.update(n, 0)
    open_mouth = n.copy()
    open_mouth[14, 1] += 20
    last = rt.update(open_mouth, 0.033)
    distances = []
    for k in range(2, 90):  # 3 s
        out = rt.update(None, k * 0.033)
        distances.append(np.abs(out - n).max())
        assert np.abs(out - last).max() < 3.0  # no jump from one frame to the next
        last = out
    assert all(b <= a for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 0.1


def test_recalibrate_takes_new_neutral(demo):
    n = demo.neutral
    rt = Retargeter(n, smoothing=False, calibration_frames=1)
    smiling = n.copy()
    smiling[14, 1] += 6
    rt.update(n, 0)
    assert np.abs(rt.update(smiling, 0.03) - n).max() > 5
    rt.recalibrate()
    rt.update(smiling, 0.06)  # the new person's resting face
    assert np.abs(rt.update(smiling, 0.09) - n).max() < 1e-3


def test_one_euro_removes_jitter_without_lag():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 200, (478, 3))
    f = OneEuroFilter()
    still = [f(base + rng.normal(0, 0.5, base.shape), i / 30, unit=60) for i in range(60)]
    raw_jitter = 0.5
    assert np.std(np.array(still[30:]) - base, axis=0).mean() < raw_jitter / 2
    moved = base + 30  # a fast head move of half an inter-ocular distance
    out = [f(moved + rng.normal(0, 0.5, base.shape), (60 + i) / 30, unit=60) for i in range(4)]
    assert np.abs(out[-1] - moved).mean() < 3  # caught up within four frames


def test_similarity_fit_roundtrip():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(50, 3))
    m = geometry.compose(1.3, Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix(), np.array([1, 2, 3]))
    fit = geometry.fit_similarity(pts, geometry.apply(m, pts))
    assert np.allclose(fit, m, atol=1e-9)
    half = geometry.scale_motion(m, pts.mean(0), 0.5)
    assert np.allclose(geometry.scale_motion(half, pts.mean(0), 2.0), m, atol=1e-9)
