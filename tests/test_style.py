"""Stylized identities (`avatar identity style`, engines/render/style.py; issue #35, seed 000)."""
import numpy as np
import pytest

from engines.identity import Consent, ConsentError, IdentityError, IdentityStore
from engines.render.style import STYLES, stylize

CONSENT = Consent("I agree to be used as a live avatar.", "Test Person", "tester", "2026-11-22T00:00:00+00:00",
                  expires_at="2099-01-01T00:00:00+00:00")


@pytest.fixture
def fresh(tmp_path):
    """A store with a photo identity "jo" (the demo's photo, its scene kept)."""
    from skimage.data import astronaut

    s = IdentityStore(tmp_path / "identities")
    s.create(astronaut(), "jo", CONSENT, "Jo", source="astronaut.png")
    return s


@pytest.mark.parametrize("style", list(STYLES))
def test_a_style_repaints_the_face_and_its_scene_as_one_picture(fresh, style):
    from engines.landmarks import FaceLandmarker
    from engines.render.scene import composer

    jo = fresh.load("jo")
    styled = fresh.style("jo", style, f"jo-{style}")
    assert styled.engine == "warp" and styled.display_name == f"Jo ({style})"
    assert np.array_equal(styled.neutral, jo.neutral) and styled.size == jo.size
    assert np.abs(styled.reference.astype(int) - jo.reference).mean() > 6  # a look, not a tint
    with FaceLandmarker(static=True) as landmarks:  # and still a face
        found = landmarks(styled.reference)
    assert found is not None and np.abs(found[:, :2] - jo.neutral[:, :2]).mean() < 0.03 * jo.size
    # The head pasted back into the styled scene meets the same strokes at the seam (the
    # feathered band), about as closely as the unstyled photo's does: the reference was cut
    # from the restyled scene. A reference restyled apart from its scene matches it worse.
    def seam(identity, reference):
        compose = composer(identity, 1280, 720)
        band = (compose.mask[..., 0] > 0.02) & (compose.mask[..., 0] < 0.98)
        pasted = compose(reference)[compose.frame_roi].astype(int)
        return np.abs(pasted - compose.background[compose.frame_roi]).mean(2)[band].mean()

    photo, same = seam(jo, jo.reference), seam(styled, styled.reference)
    apart = seam(styled, stylize(jo.reference, style, jo.size))
    assert same < 2 * photo and same < apart, (photo, same, apart)


def test_a_style_carries_the_consent_and_names_its_origin(fresh):
    styled = fresh.style("jo", "toon", "jo-toon", display_name="Jo, drawn")
    assert styled.consent == fresh.load("jo").consent and styled.display_name == "Jo, drawn"
    provenance = styled.manifest["provenance"]
    assert (provenance["derived_from"], provenance["style"], provenance["tool"]) == ("jo", "toon",
                                                                                    "avatar identity style")
    fresh.style("jo-toon", "painted", "jo-toon-painted")  # a style of a style
    fresh.revoke("jo", by="jo", reason="changed my mind")
    for name in ("jo", "jo-toon", "jo-toon-painted"):
        with pytest.raises(ConsentError, match="revoked"):
            fresh.load(name).consent.check("live-avatar")
    assert "revoked with 'jo'" in fresh.load("jo-toon").consent.revoke_reason
    with pytest.raises(ConsentError, match="revoked"):  # nothing new from a revoked face
        fresh.style("jo", "toon", "jo-again")
    assert "jo-again" not in fresh.names()


@pytest.mark.parametrize("args, message", [
    (("jo", "sepia", "jo-sepia"), "unknown style 'sepia' .known: painted, toon"),
    (("jo", "toon", "jo"), "a style is a new identity"),
    (("jo", "toon", "../x"), "identity name"),
    (("nobody", "toon", "x"), "no identity named 'nobody'"),
])
def test_bad_style_requests_get_clear_errors(fresh, args, message):
    with pytest.raises(IdentityError, match=message):
        fresh.style(*args)
    assert fresh.names() == ["jo"]


def test_an_enrolled_identity_is_restyled_only_by_training_on_its_scan(fresh, demo):
    # Repainting its reference alone would leave a generator that draws the real face;
    # enroll.restyle trains it again on its restyled scan (tests/test_neural.py), which
    # needs the scan.
    from engines.neural.enroll import restyle

    def extra(staging):
        (staging / "model.onnx").write_bytes(b"weights")
        return ["model.onnx"], {"neural": {"model": "model.onnx"}}

    fresh.write("nn", "NN", "neural", CONSENT, demo.reference, demo.neutral, (1, 2, 3, 4), {"source": "scan.mp4"},
                tool="test", extra=extra)
    with pytest.raises(IdentityError, match="enrolled .neural. identity.*restyle trains"):
        fresh.style("nn", "toon", "nn-toon")
    with pytest.raises(IdentityError, match="its self-scan .* is gone"):
        restyle(fresh, "nn", "toon", "nn-toon")
    with pytest.raises(IdentityError, match="is a warp identity"):
        restyle(fresh, "demo", "toon", "x-toon")
    assert "nn-toon" not in fresh.names() and "x-toon" not in fresh.names()


def test_avatar_identity_style_command(tmp_path, monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setenv("AVATAR_HOME", str(tmp_path))
    assert main(["identity", "style", "demo", "--style", "toon", "--name", "demo-toon"]) == 0
    assert "created identity 'demo-toon' (toon 'demo')" in capsys.readouterr().out
    assert main(["identity", "style", "demo", "--style", "toon", "--name", "demo-toon"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["identity", "style", "demo", "--style", "sepia", "--name", "x"])
    assert "invalid choice: 'sepia'" in capsys.readouterr().err
