import json
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pytest

from engines.identity import (Consent, IdentityError, IdentityStore, check_name, crop_matrix, crop_with_box,
                             points_to_crop)

CONSENT = Consent("I agree to be used as a live avatar.", "Test Person", "tester", "2026-11-22T00:00:00+00:00")


@pytest.fixture
def photo(tmp_path, demo):
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), cv2.cvtColor(demo.reference, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def fresh(tmp_path):
    return IdentityStore(tmp_path / "identities")


def test_demo_identity_is_embedded(demo, store):
    assert "demo" in store.names()
    assert demo.reference.shape == (256, 256, 3)
    assert demo.neutral.shape == (478, 3)
    assert demo.consent.scope == ["demo"]


def test_create_list_load_delete(fresh, photo):
    ident = fresh.create_from_image(photo, "jo", CONSENT, "Jo")
    assert fresh.names() == ["jo"]
    manifest = json.loads((ident.path / "manifest.json").read_text())
    assert manifest["consent"]["statement"] == CONSENT.statement
    assert set(manifest["files"]) == {"reference.png", "neutral.npy", "scene.jpg"}  # scene: issue #35
    assert fresh.load("jo").display_name == "Jo"
    with pytest.raises(IdentityError, match="already exists"):
        fresh.create_from_image(photo, "jo", CONSENT)
    fresh.delete("jo")
    assert fresh.names() == []


@pytest.mark.parametrize("name", ["../../etc", "a/b", "", "Upper", ".hidden", "x" * 64, None, "nl2\n", "ok\n"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(IdentityError, match="invalid identity name"):
        check_name(name)


def test_photo_without_face(fresh, tmp_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((300, 300, 3), 200, np.uint8))
    with pytest.raises(IdentityError, match="no face found"):
        fresh.create_from_image(blank, "wall", CONSENT)
    assert fresh.names() == []


def test_not_an_image(fresh, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(IdentityError, match="not a readable image"):
        fresh.create_from_image(text, "notes", CONSENT)
    with pytest.raises(IdentityError, match="no such file"):
        fresh.create_from_image(tmp_path / "missing.jpg", "missing", CONSENT)


def test_unknown_identity_names_the_known_ones(store):
    with pytest.raises(IdentityError, match="known: demo"):
        store.load("nobody")


def _broken_copy(store, tmp_path, edit):
    root = tmp_path / "ids"
    shutil.copytree(store.path("demo"), root / "demo")
    manifest_path = root / "demo" / "manifest.json"
    edit(manifest_path)
    return IdentityStore(root)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_text("[]"), "must be a JSON object"),
    (lambda p: _set(p, "schema_version", 99), "schema_version"),
    (lambda p: _set(p, "engine", "magic"), "engine must be one of"),
    (lambda p: _set(p, "display_name", None), "display_name"),
    (lambda p: _set(p, "consent", {"statement": ""}), "consent.statement"),
    (lambda p: _set(p, "files", {"../../etc/passwd": "0"}), "not a plain file name"),
    (lambda p: (p.parent / "reference.png").write_bytes(b"tampered"), "does not match its sha256"),
    (lambda p: (p.parent / "neutral.npy").unlink(), "neutral.npy is missing"),
])
def test_malformed_bundle_says_what_is_wrong(store, tmp_path, edit, message):
    broken = _broken_copy(store, tmp_path, edit)
    with pytest.raises(IdentityError, match=message):
        broken.load("demo")


def _set(path, key, value):
    m = json.loads(path.read_text())
    m[key] = value
    path.write_text(json.dumps(m))


def test_manifest_common_fields(fresh, photo):
    m = fresh.create_from_image(photo, "jo", CONSENT, "Jo").manifest
    assert list(m) == ["schema_version", "name", "display_name", "engine", "reference_image",
                       "neutral_landmarks", "crop", "consent", "provenance", "scene", "files"]
    assert list(m["provenance"]) == ["source", "created_at", "tool"]
    assert m["provenance"]["source"] == "face.png" and m["provenance"]["tool"] == "avatar identity create"
    assert m["engine"] == "warp" and all(isinstance(v, int) for v in m["crop"])


def test_write_takes_extra_files_and_fields(fresh, demo):
    def extra(staging):
        (staging / "model.bin").write_bytes(b"weights")
        return ["model.bin"], {"neural": {"model": "model.bin"}}

    ident = fresh.write("nn", "NN", "neural", CONSENT, demo.reference, demo.neutral, (1, 2, 3, 4),
                        {"source": "scan.mp4", "source_path": "/x/scan.mp4"}, tool="test", extra=extra)
    m = ident.manifest
    assert list(m)[-3:] == ["provenance", "neural", "files"] and m["neural"] == {"model": "model.bin"}
    assert list(m["files"]) == ["reference.png", "neutral.npy", "model.bin"]
    assert list(m["provenance"]) == ["source", "source_path", "created_at", "tool"]
    assert (ident.path / "model.bin").read_bytes() == b"weights" and ident.engine == "neural"
    assert not [p for p in fresh.root.iterdir() if p.name.startswith(".")]  # no staging left behind
    again = ("nn", "Other", "warp", CONSENT, demo.reference, demo.neutral, (1, 2, 3, 4), {"source": "b.png"})
    with pytest.raises(IdentityError, match="already exists .use --overwrite"):
        fresh.write(*again, tool="test")
    assert fresh.load("nn").display_name == "NN"
    fresh.work_dir("nn").mkdir()  # an enrollment checkpoint's folder: publishing finishes it
    assert fresh.write(*again, tool="test", overwrite=True).display_name == "Other"
    assert not fresh.work_dir("nn").exists() and not (fresh.path("nn") / "model.bin").exists()


def test_points_to_crop_moves_points_with_the_image():
    x0, y0, side = 100.0, 50.0, 512.0
    p = np.array([[[x0, y0, 2.0], [x0 + side, y0 + side, -4.0]]], np.float32)
    q = points_to_crop(p, x0, y0, side)
    assert q.dtype == np.float32 and q.shape == p.shape
    assert np.allclose(q[0], [[0, 0, 1.0], [256, 256, -2.0]])
    assert np.allclose(q[0, :, :2], p[0, :, :2] @ crop_matrix(x0, y0, side)[:, :2].T + crop_matrix(x0, y0, side)[:, 2])


def test_crop_past_the_frame_edge_is_padded_with_the_edge_not_black():
    # A self-scan whose face sits at the frame edge gets a crop box that reaches past it
    # (issue #13 saw a black band there): enrollment and photo crops share crop_with_box.
    frame = np.full((240, 320, 3), 180, np.uint8)
    frame[:, :8] = (200, 150, 120)  # the left edge's own colour
    crop = crop_with_box(frame, -120.0, -40.0, 300.0)  # 120 px past the left, 40 past the top
    assert crop.shape == (256, 256, 3)
    assert crop.min() >= 120
    next_to_the_left_edge = crop[60:220, 80:100].reshape(-1, 3)  # 3-23 px out, clear of the corners
    assert np.abs(next_to_the_left_edge.mean(0) - (200, 150, 120)).max() < 2


def test_a_stripe_across_the_frame_edge_fades_in_the_padding_instead_of_streaking():
    # selfscan_a's hair bun touches the top of the video: repeating the edge row drew it up
    # to the crop's border as a pole above the head, in every render of that identity.
    rng = np.random.default_rng(3)
    frame = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), np.uint8), (0, 0), 2)
    frame[:, 150:160] = 20  # a dark stripe crossing the top edge
    x0, y0, side = 40.0, -80.0, 256.0  # 1 crop px per image px; 80 rows above the frame
    crop = crop_with_box(frame, x0, y0, side)
    inside = cv2.warpAffine(frame, crop_matrix(x0, y0, side), (256, 256), flags=cv2.INTER_AREA)
    assert np.array_equal(crop[82:], inside[82:])  # the image itself is untouched
    stripe, beside = crop[:, 112:118].mean((1, 2)), crop[:, 140:160].mean((1, 2))
    assert beside[78] - stripe[78] > 80  # next to the frame it still continues the image...
    assert beside[:40].min() - stripe[:40].max() < 15  # ...far from it, it has faded
    assert crop[:80].min() > 0.5 * frame.min() and crop[:80].max() <= frame.max()


def test_mouth_memory_must_be_a_listed_file(store, tmp_path):
    assert store.load("demo").memory("mouth_memory") is None  # a photo identity has none
    shutil.copytree(store.path("demo"), tmp_path / "demo")
    copy = IdentityStore(tmp_path)
    ident = copy.load("demo")
    manifest = json.loads((ident.path / "manifest.json").read_text())
    manifest["mouth_memory"] = "mouths.npz"
    (ident.path / "mouths.npz").write_bytes(b"not listed")
    (ident.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IdentityError, match="mouth_memory 'mouths.npz' is not listed"):
        copy.load("demo")


def test_photo_identities_keep_their_faces_size_up_to_512(fresh):
    """A photo's face is kept at its own size in the photo (no upscaled detail), from 256
    (the neural size) up to 512, in whole 16-px steps."""
    from skimage.data import astronaut

    small = fresh.create(astronaut(), "small", CONSENT, "Small", source="astronaut")  # a ~200-px face
    big = fresh.create(cv2.resize(astronaut(), None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC), "big",
                       CONSENT, "Big", source="astronaut x3")  # a ~600-px face
    assert small.size == 256 and big.size == 512
    assert fresh.load("big").reference.shape == (512, 512, 3)
    assert np.ptp(big.neutral[:, 0]) > 1.8 * np.ptp(small.neutral[:, 0])  # landmarks in its own pixels

    shrunk = big.at_most(256)  # an operator's --output-size 256
    assert shrunk.reference.shape == (256, 256, 3) and big.reference.shape == (512, 512, 3)
    assert np.allclose(shrunk.neutral, big.neutral / 2, atol=1e-4)
    assert big.at_most(512) is big and small.at_most(512) is small
    # An enrolled identity's generator runs at 256: no operator's setting takes it below.
    neural = replace(big, engine="neural")
    assert neural.at_most(128).size == 256 and neural.at_most(384).size == 384


def test_remembered_mouths_scale_with_the_identity():
    """Memories are cut from 256² crops; an identity rendered at 512 draws them at 512."""
    from engines.render.mouth import MouthMemory

    rng = np.random.default_rng(0)
    points = rng.uniform(10, 90, (2, 478, 3)).astype(np.float32)
    memory = MouthMemory(rng.integers(0, 255, (2, 96, 128, 3), dtype=np.uint8), points)
    big = memory.scaled(2.0)
    assert big.patches.shape == (2, 192, 256, 3) and np.allclose(big.points, points * 2)
    assert np.allclose(big.shapes, memory.shapes, atol=1e-4)  # a shape is the same at any size
    assert memory.scaled(1.0) is memory


def test_a_reference_of_an_odd_size_is_refused(fresh, demo):
    with pytest.raises(IdentityError, match="even square"):
        fresh.write("odd", "Odd", "warp", CONSENT, np.zeros((255, 255, 3), np.uint8), demo.neutral,
                    (0, 0, 255, 255), {}, tool="test")
    assert "odd" not in fresh.names()
