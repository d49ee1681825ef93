import json
import subprocess
import sys

import av
import numpy as np
import pytest

from helpers import read_frames, shared_clip
from test_c2pa import top_boxes
from engines.landmarks import FaceLandmarker, eye_openness, mouth_openness
from server.cli import main


def run_cli(*args, home):
    return subprocess.run([sys.executable, "-m", "server.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.mp4", "no such file"),
    (lambda d: (d / "notes.mp4").write_text("not a video") and d / "notes.mp4", "not a readable video"),
    (lambda d: d, "not a file"),
])
def test_bad_driving_input_is_a_clear_error(tmp_path, capsys, make, message):
    code = main(["--home", str(tmp_path), "render", str(make(tmp_path)), "-o", str(tmp_path / "o.mp4")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_help_explains_commands():
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True).stdout
    for word in ("serve", "render", "identity"):
        assert word in out


@pytest.mark.slow
def test_render_follows_the_driver(tmp_path, store):
    clip = shared_clip("drive_expressive.mp4")
    out = tmp_path / "out.mp4"
    result = run_cli("render", str(clip), "-o", str(out), "--identity", "demo", home=store.root.parent)
    assert result.returncode == 0, result.stderr
    timings = json.loads(out.with_suffix(".timings.json").read_text())
    assert timings["stages"]["render_ms"]["median_ms"] > 0
    with av.open(str(out)) as c:
        assert c.streams.audio, "the driving video's audio track must be kept"
    # Provenance: every segment marked, a valid signed manifest, and the render on record.
    verify = run_cli("verify", str(out), "--json", home=store.root.parent)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    # Measured at CRF 17: every segment in 4 of 4 renders (at CRF 20, 1 in 8 was lost in
    # some). One lost segment of eight is tolerated here; the bench test holds the 95% goal.
    assert report["confidence"] >= 0.875, report["segments"]
    assert report["c2pa"]["valid"] and report["c2pa"]["ai_generated"]
    assert report["c2pa"]["identity"]["watermark_payload"] == report["payload"]
    data = bytearray(out.read_bytes())
    _, offset, size, header = next(b for b in top_boxes(data) if b[0] == "mdat")
    data[offset + header + (size - header) // 2] ^= 0xFF
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(data)
    changed = run_cli("verify", str(tampered), home=store.root.parent)
    assert "C2PA manifest: INVALID" in changed.stdout and "bmffHash.mismatch" in changed.stdout, changed.stdout
    audit = run_cli("audit", "--kind", "render", "--json", home=store.root.parent)
    rows = [json.loads(line) for line in audit.stdout.splitlines()]
    assert any(r["status"] == "ok" and r["frames"] == timings["frames"] and
               report["payload"].endswith(r["use_id"][:6]) for r in rows), rows
    driver, avatar = read_frames(clip), read_frames(out)
    assert len(avatar) == len(driver)
    with FaceLandmarker() as a, FaceLandmarker() as b:
        pairs = [(a(d), b(o)) for d, o in zip(driver, avatar)]
    pairs = [(d, o) for d, o in pairs if d is not None and o is not None]
    assert len(pairs) >= 0.95 * len(driver)
    for metric in (mouth_openness, eye_openness):
        d, o = np.array([(metric(d), metric(o)) for d, o in pairs]).T
        r = np.corrcoef(d, o)[0, 1]
        assert r >= 0.8, f"{metric.__name__} correlation {r:.2f}"
