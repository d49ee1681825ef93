"""`avatar eval`'s region metrics (mouth, eyes) and its report: JSON keys and the HTML frame strip."""
import base64
import json
import re

import cv2
import numpy as np
import pytest

from engines.render.mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER
from engines.render.mouth import OUTER_LIPS
from engines.neural.evaluate import STRIP_FRAMES, evaluate_frames, write_report
from engines.landmarks import RIGID, inter_ocular
from engines.neural.metrics import (engine_metrics, eyes_box, frame_scores, mouth_box, pose_novelty, psnr,
                                    region_boxes, ssim)

SHAPE = (256, 256, 3)


RIGHT_EYE = {"corners": (33, 133), "top": 159, "bottom": 145}
LEFT_EYE = {"corners": (263, 362), "top": 386, "bottom": 374}


def lips_at(x0, x1, y0, y1, eyes=((60, 100), (150, 190), 90)):
    """Synthetic landmarks: the outer lip contour spans x0..x1, y0..y1; the eyes' corners
    are at the x of `eyes` (right eye, left eye) and height eyes[2], their lids 5 px above and
    below it, every other lid point at the middle of its eye; the rest of the face in the middle."""
    p = np.full((478, 3), 128, np.float32)
    k = np.arange(len(OUTER_LIPS))
    p[OUTER_LIPS, 0] = x0 + (x1 - x0) * k / (len(k) - 1)
    p[OUTER_LIPS, 1] = np.where(k % 2, y0, y1)
    ey = eyes[2]
    for (a, b), eye, lids in ((eyes[0], RIGHT_EYE, RIGHT_EYE_UPPER + RIGHT_EYE_LOWER),
                              (eyes[1], LEFT_EYE, LEFT_EYE_UPPER + LEFT_EYE_LOWER)):
        p[lids, :2] = ((a + b) / 2, ey)
        p[eye["corners"][0], :2], p[eye["corners"][1], :2] = (a, ey), (b, ey)
        p[eye["top"], 1], p[eye["bottom"], 1] = ey - 5, ey + 5
    return p


def face(seed=0):
    """A textured 256x256 image (SSIM and PSNR need structure to tell images apart)."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, SHAPE, dtype=np.uint8), (5, 5), 1.0)


def test_mouth_box_pads_a_quarter_of_the_mouth_width():
    p = lips_at(100, 160, 170, 190)  # 60 px wide: 15 px on every side
    assert mouth_box(p, SHAPE) == (85, 155, 175, 205)
    assert mouth_box(p, SHAPE, pad=0) == (100, 170, 160, 190)


def test_region_boxes_clip_at_the_frame_edge():
    assert mouth_box(lips_at(-20, 40, 230, 250), SHAPE) == (0, 215, 55, 256)  # left and bottom edges
    assert mouth_box(lips_at(220, 270, 0, 10), SHAPE) == (207, 0, 256, 23)  # right and top edges
    assert mouth_box(lips_at(300, 360, 100, 120), SHAPE) is None  # wholly outside: no box
    box = eyes_box(lips_at(100, 160, 170, 190), SHAPE)  # eyes 40 px wide: 10 px of padding
    assert box == (50, 75, 200, 105)


def test_region_scores_are_higher_for_the_better_image():
    truth = face(0)
    box = mouth_box(lips_at(100, 160, 170, 190), SHAPE)
    x0, y0, x1, y1 = box
    noise = np.random.default_rng(1).normal(0, 25, SHAPE)
    bad = np.clip(truth + noise, 0, 255).astype(np.uint8)  # noisy everywhere
    good = bad.copy()
    good[y0:y1, x0:x1] = np.clip(truth + noise / 5, 0, 255)[y0:y1, x0:x1]  # 5x less noise in the mouth
    s_bad, s_good = (frame_scores(o, truth, {"mouth": box, "eyes": None}) for o in (bad, good))
    assert s_good["mouth_psnr"] > s_bad["mouth_psnr"] + 10 and s_good["mouth_ssim"] > s_bad["mouth_ssim"] + 0.2
    assert s_good["psnr"] > s_bad["psnr"] and s_good["psnr"] < s_good["mouth_psnr"]  # the rest is as noisy
    assert abs(s_bad["mouth_psnr"] - s_bad["psnr"]) < 0.5  # uniform noise: the same inside and out
    assert s_bad["eyes_psnr"] is None and s_bad["eyes_ssim"] is None
    # the whole-frame figures are the metrics' own
    assert s_bad["psnr"] == psnr(bad, truth) and s_bad["ssim"] == pytest.approx(ssim(bad, truth))
    assert frame_scores(truth, truth, {"mouth": box})["mouth_ssim"] == pytest.approx(1.0)


class NoFace:
    def __call__(self, rgb):
        return None


def test_engine_metrics_per_frame_and_means():
    truth = [face(0), face(1)]
    outs = [np.clip(t.astype(int) + d, 0, 255).astype(np.uint8) for t, d in zip(truth, (4, 8))]
    pts = [lips_at(100, 160, 170, 190), lips_at(300, 360, 100, 120)]  # the second mouth is off the frame
    m = engine_metrics(outs, pts, truth, [False, True], NoFace(), region_boxes(pts, SHAPE))
    per = m["per_frame"]
    assert len(per["mouth_psnr"]) == 2 and per["mouth_psnr"][1] is None
    assert m["mouth_psnr"] == per["mouth_psnr"][0]  # the mean over frames with a box
    assert m["psnr"] == pytest.approx(np.mean(per["psnr"]))
    assert m["eyes_ssim"] == pytest.approx(np.mean(per["eyes_ssim"]))
    no_truth = engine_metrics(outs, pts, None, [False, True], NoFace())
    assert no_truth.keys().isdisjoint({"psnr", "mouth_psnr", "per_frame"})


def _images(html):
    return re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', html)


def _decode(b64):
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def report(demo, tmp_path_factory):
    """The demo face as ground truth for 8 frames; warp: blurred; neural: the same blur
    but the mouth box exact: neural must win in the mouth and a little overall."""
    truth = [demo.reference] * 8
    pts = [demo.neutral] * 8
    x0, y0, x1, y1 = mouth_box(demo.neutral, SHAPE)
    warp = cv2.GaussianBlur(demo.reference, (9, 9), 3)
    neural = warp.copy()
    neural[y0:y1, x0:x1] = demo.reference[y0:y1, x0:x1]
    r = evaluate_frames([warp] * 8, [neural] * 8, pts, truth, [False] + [True] * 7, drivers=truth,
                        frame_ids=range(800, 808))
    r.update(kind="synthetic", runtime="none")
    out = tmp_path_factory.mktemp("rep")
    write_report(r, out / "r.json", out / "r.html", "demo: neural vs warp")
    return r, json.loads((out / "r.json").read_text()), (out / "r.html").read_text(encoding="utf-8"), demo


def test_report_json_keeps_old_keys_and_gains_region_keys(report):
    r, data, _, demo = report
    s = data["summary"]
    for k in ("frames", "neural_psnr", "warp_psnr", "neural_ssim", "warp_ssim", "neural_l1", "warp_l1", "neural_akd",
              "warp_akd", "neural_flicker", "warp_flicker", "psnr_gain_db", "neural_beats_warp"):
        assert k in s, k
    for k in ("mouth_psnr", "mouth_ssim", "eyes_psnr", "eyes_ssim"):
        assert isinstance(data["warp"][k], float) and isinstance(data["neural"][k], float), k
        assert s[f"neural_{k}"] == data["neural"][k] and s[f"warp_{k}"] == data["warp"][k]
    assert s["mouth_psnr_gain_db"] == pytest.approx(s["neural_mouth_psnr"] - s["warp_mouth_psnr"])
    assert s["mouth_psnr_gain_db"] > 50 and s["mouth_ssim_gain"] > 0.1  # neural is exact in the mouth box
    assert 0 < s["psnr_gain_db"] < s["mouth_psnr_gain_db"] and s["eyes_psnr_gain_db"] == pytest.approx(0)
    assert s["neural_beats_warp"]["mouth_psnr_by_4db"] is True
    per = data["per_frame"]
    assert per["frame"] == list(range(800, 808)) and len(per["mouth_box"]) == 8
    assert per["mouth_box"][0] == list(mouth_box(demo.neutral, SHAPE))
    assert len(per["neural"]["mouth_psnr"]) == 8 and len(per["warp"]["eyes_ssim"]) == 8
    assert "strip" not in data and "per_frame" not in data["neural"]  # images only in the HTML


def test_report_html_shows_the_strip(report):
    _, _, html, demo = report
    assert "<script" not in html
    imgs = _images(html)
    frames = min(STRIP_FRAMES, 8)
    assert len(imgs) == 6 * frames  # ground truth, warp, neural and the three mouth close-ups
    for row in ("ground truth", "warp", "neural", "ground truth mouth", "warp mouth", "neural mouth"):
        assert f"<th>{row}</th>" in html, row
    assert html.count("<figcaption>") == len(imgs) and "frame 800" in html and "frame 807" in html
    assert re.search(r"neural: PSNR \d+\.\d dB, SSIM \d\.\d{3}", html)
    full = _decode(imgs[0])
    assert full.shape == SHAPE
    x0, y0, x1, y1 = mouth_box(demo.neutral, SHAPE)
    close = _decode(imgs[-1])  # the last neural mouth close-up
    assert close.shape[1] == 256 and abs(close.shape[0] - 256 * (y1 - y0) / (x1 - x0)) <= 1
    # the warp row shows the warp, unmarked: its first image is the warp frame itself
    assert np.array_equal(cv2.cvtColor(_decode(imgs[frames]), cv2.COLOR_BGR2RGB),
                          cv2.GaussianBlur(demo.reference, (9, 9), 3))
    assert "mouth box" in html and "neural − warp" in html


def test_report_without_ground_truth(demo, tmp_path):
    frames = [demo.reference] * 3
    r = evaluate_frames(frames, frames, [demo.neutral] * 3, None, [False, True, True], drivers=frames)
    r.update(kind="driven", runtime="none")
    write_report(r, tmp_path / "r.json", tmp_path / "r.html", "t")
    data, html = json.loads((tmp_path / "r.json").read_text()), (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "mouth_psnr" not in data["neural"] and "mouth_psnr_gain_db" not in data["summary"]
    assert "<th>driver</th>" in html and "<th>warp mouth</th>" in html and "<th>ground truth" not in html
    assert len(_images(html)) == 3 * 5


def _strip_rows(html):
    """{row name: [RGB images]} of the report's frame strip."""
    rows = {}
    for name, cells in re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", html, re.S):
        rows[name] = [cv2.cvtColor(_decode(b64), cv2.COLOR_BGR2RGB) for b64 in _images(cells)]
    return rows


def test_avatar_eval_marks_its_rendered_frames_and_is_on_record(demo, tmp_path):
    """`avatar eval` renders the person: a render in the audit log, whose watermark every
    rendered frame of its report carries; the driver's frames stay as they were."""
    import av

    from engines.provenance import watermark
    from server.audit import AuditLog, audit_path
    from server.cli import main

    clip = tmp_path / "driver.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for i in range(12):
            frame = np.roll(demo.reference, i, axis=1)  # the demo face, moving a little
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    home = tmp_path / "home"
    assert main(["--home", str(home), "eval", "demo", "--driving", str(clip), "--no-identity-distance",
                 "-o", str(tmp_path / "ev")]) == 0
    log = AuditLog(audit_path(home), "test")
    uses = log.query(kind="render")
    log.close()
    assert len(uses) == 1 and uses[0]["identity"] == "demo" and uses[0]["frames"] == 12
    payload = watermark.Payload.here(uses[0]["use_id"])
    rows = _strip_rows((tmp_path / "ev.html").read_text(encoding="utf-8"))
    assert rows["warp"] and all(watermark.detect(np.array([watermark.project(watermark.luma(img))])).payload
                                == payload for img in rows["warp"])
    assert watermark.detect(np.array([watermark.project(watermark.luma(img)) for img in rows["driver"]])).payload is None


def test_pose_novelty_follows_the_skull_not_the_expression(demo):
    n = demo.neutral.astype(np.float64)
    talking = n.copy()
    jaw = np.setdiff1d(np.flatnonzero(n[:, 1] > n[14, 1]), RIGID)
    talking[jaw, 1] += 12  # the mouth opens: the head has not moved
    moved = n + [6.0, 0.0, 0.0]
    io = inter_ocular(n)
    far = np.concatenate([n[None], (n + [20.0, 0.0, 0.0])[None]])  # two training frames
    assert np.allclose(pose_novelty([n], [n, talking, moved]), [0, 0, 6 / io])
    assert pose_novelty(far, [moved])[0] == pytest.approx(6 / io)  # the nearest training frame counts


def test_psnr_split_by_pose_novelty(demo, tmp_path):
    """Six held-out frames, two at each distance from the one training pose; the neural is
    exact on the nearest two and worse the farther the pose: its thirds say so."""
    truth, base = [demo.reference] * 6, demo.neutral.astype(np.float64)
    pts = [(base + [dx, 0.0, 0.0]).astype(np.float32) for dx in (0, 0, 5, 5, 15, 15)]
    neural = [demo.reference] * 2 + [cv2.GaussianBlur(demo.reference, (0, 0), s) for s in (1, 1, 3, 3)]
    warp = [cv2.GaussianBlur(demo.reference, (0, 0), 3)] * 6
    r = evaluate_frames(warp, neural, pts, truth, [False] + [True] * 5, drivers=truth, train_points=[base])
    r.update(kind="synthetic", runtime="none")
    write_report(r, tmp_path / "r.json", tmp_path / "r.html", "t")
    s = json.loads((tmp_path / "r.json").read_text())["summary"]
    per = [psnr(o, t) for o, t in zip(neural, truth)]
    assert s["neural_psnr_near_pose"] == pytest.approx(np.mean(per[:2]))
    assert s["neural_psnr_mid_pose"] == pytest.approx(np.mean(per[2:4]))
    assert s["neural_psnr_far_pose"] == pytest.approx(np.mean(per[4:]))
    assert s["warp_psnr_near_pose"] == pytest.approx(s["warp_psnr_far_pose"])
    io = inter_ocular(base)
    assert np.allclose(s["pose_novelty_thirds"], [[0, 0], [5 / io, 5 / io], [15 / io, 15 / io]], atol=1e-4)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<th>psnr_far_pose</th>" in html and "self-scan never showed" in html
    driven = evaluate_frames(warp, neural, pts, None, [False] + [True] * 5, drivers=truth, train_points=[base])
    assert "pose_novelty_thirds" not in driven and "psnr_near_pose" not in driven["neural"]  # needs ground truth
