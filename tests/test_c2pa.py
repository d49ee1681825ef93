"""C2PA provenance on renders (engines/provenance/c2pa_sign.py): sign a real mp4, read it back, catch
tampering, and say plainly that a local signer is valid but untrusted. No network."""
from __future__ import annotations

import datetime as dt
import shutil
import stat
import struct

import av
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engines.provenance.c2pa_sign import (AI_SOURCE, ProvenanceError, consent_digest, load_signer, local_signer,
                               read_provenance, sign_file)

CONSENT = {"statement": "I agree to appear as an avatar", "subject": "Ada Example",
           "recorded_by": "operator", "granted_at": "2025-01-02T03:04:05+00:00",
           "scope": ["live", "render"], "expires_at": None, "revoked_at": None}


def make_video(path, frames=20, size=64):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            rgb = np.full((size, size, 3), (i * 12) % 256, np.uint8)
            rgb[:, : size // 2, 0] = 255 - i
            for packet in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def top_boxes(data: bytes):
    """(type, offset, size, header size) of the file's top-level ISO BMFF boxes."""
    i = 0
    while i < len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[i + 8:i + 16])[0], 16
        elif size == 0:
            size = len(data) - i
        yield kind.decode("latin-1"), i, size, header
        i += size


@pytest.fixture(scope="module")
def signer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("c2pa")


@pytest.fixture(scope="module")
def signer(signer_dir):
    return local_signer(signer_dir)


@pytest.fixture
def signed(tmp_path, signer):
    path = make_video(tmp_path / "render.mp4")
    path.chmod(0o644)
    sign_file(path, identity_name="ada", consent=CONSENT, signer=signer, payload="a1b2:c3d4e5")
    return path


def test_signed_mp4_reads_back_valid_ai_generated_untrusted(signed):
    p = read_provenance(signed)
    assert p["valid"] and p["state"] == "Valid" and p["problems"] == []
    # A local CA chains to no anchor this verifier knows: said, not hidden.
    assert not p["trusted"] and [t["code"] for t in p["trust_problems"]] == ["signingCredential.untrusted"]
    assert p["ai_generated"] and p["digital_source_type"] == AI_SOURCE
    assert p["generator"].startswith("avatar-server ")
    assert p["identity"] == {"identity": "ada", "consent_subject": "Ada Example",
                             "consent_granted_at": CONSENT["granted_at"],
                             "consent_sha256": consent_digest(CONSENT), "watermark_payload": "a1b2:c3d4e5"}
    assert p["signer"]["common_name"] == "avatar-server local signer" and p["signer"]["alg"].lower() == "es256"
    assert p["title"] == "render.mp4"
    # Still a playable video, signed in place: same mode, no temp file left behind.
    with av.open(str(signed)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20
    assert stat.S_IMODE(signed.stat().st_mode) == 0o644
    assert [f.name for f in signed.parent.iterdir()] == ["render.mp4"]


def test_local_ca_as_trust_anchor_makes_it_trusted(signed, signer_dir):
    p = read_provenance(signed, trust_anchors=signer_dir / "ca.pem")
    assert p["valid"] and p["trusted"] and p["state"] == "Trusted" and p["trust_problems"] == []


def test_tampered_media_data_is_detected(signed, tmp_path):
    data = bytearray(signed.read_bytes())
    _, offset, size, header = next(b for b in top_boxes(data) if b[0] == "mdat")
    data[offset + header + (size - header) // 2] ^= 0xFF
    copy = tmp_path / "tampered.mp4"
    copy.write_bytes(data)
    p = read_provenance(copy)
    assert not p["valid"] and p["state"] == "Invalid"
    assert "assertion.bmffHash.mismatch" in [x["code"] for x in p["problems"]]
    assert read_provenance(signed)["valid"]  # the original is untouched


def test_tampered_identity_assertion_is_detected(signed, tmp_path):
    data = signed.read_bytes()
    assert data.count(b"Ada Example") == 1
    copy = tmp_path / "renamed.mp4"
    copy.write_bytes(data.replace(b"Ada Example", b"Bob Example"))
    p = read_provenance(copy)
    assert not p["valid"]
    assert "assertion.hashedURI.mismatch" in [x["code"] for x in p["problems"]]


def test_unsigned_file_has_no_provenance(tmp_path):
    assert read_provenance(make_video(tmp_path / "plain.mp4", frames=5)) is None


def test_mov_and_png_sign_and_read(tmp_path, signer):
    mov = make_video(tmp_path / "clip.mov", frames=5)
    sign_file(mov, identity_name="ada", consent=CONSENT, signer=signer, title="a clip")
    p = read_provenance(mov)
    assert p["valid"] and p["title"] == "a clip" and "watermark_payload" not in p["identity"]
    png = tmp_path / "still.png"
    with av.open(str(make_video(tmp_path / "one.mp4", frames=1))) as c:
        next(c.decode(video=0)).to_image().save(png)
    sign_file(png, identity_name="ada", consent=CONSENT, signer=signer)
    assert read_provenance(png)["valid"]


def test_mkv_is_refused_with_the_supported_formats(tmp_path, signer):
    mkv = make_video(tmp_path / "clip.mkv", frames=5)
    before = mkv.read_bytes()
    with pytest.raises(ProvenanceError, match=r"\.mkv.*\.mov.*\.mp4"):
        sign_file(mkv, identity_name="ada", consent=CONSENT, signer=signer)
    assert mkv.read_bytes() == before
    with pytest.raises(ProvenanceError, match="not supported"):
        read_provenance(mkv)


def test_local_signer_is_reused_and_its_key_private(signer_dir, signer):
    key = signer_dir / "signer.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    stamps = {p.name: p.stat().st_mtime_ns for p in signer_dir.glob("*.pem")} | {key.name: key.stat().st_mtime_ns}
    again = local_signer(signer_dir)
    assert again == signer
    assert stamps == {p.name: p.stat().st_mtime_ns for p in signer_dir.glob("*.pem")} | {key.name: key.stat().st_mtime_ns}
    assert "PRIVATE" not in repr(again)


def test_load_signer_errors_are_clear(tmp_path, signer_dir):
    cert, key = signer_dir / "signer.pem", signer_dir / "signer.key"
    with pytest.raises(ProvenanceError, match="cannot read"):
        load_signer(tmp_path / "missing.pem", key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ProvenanceError, match="not a PEM certificate chain"):
        load_signer(garbage, key)
    with pytest.raises(ProvenanceError, match="not an unencrypted PEM private key"):
        load_signer(cert, garbage)
    other = local_signer(tmp_path / "other")
    other_key = tmp_path / "other.key"
    other_key.write_bytes(other.private_key_pem)
    with pytest.raises(ProvenanceError, match="is not the private key"):
        load_signer(cert, other_key)


def test_load_signer_accepts_sec1_keys_and_rejects_self_signed(tmp_path, signer_dir, signer):
    # openssl's EC keys are SEC1 ("BEGIN EC PRIVATE KEY"); the library reads only PKCS#8.
    k = serialization.load_pem_private_key(signer.private_key_pem, None)
    sec1 = tmp_path / "sec1.key"
    sec1.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()))
    assert load_signer(signer_dir / "signer.pem", sec1) == signer
    # A self-signed leaf with the right usages is still refused by C2PA's certificate profile.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=9))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "self.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "self.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    with pytest.raises(ProvenanceError, match="certificate is invalid.*issued by a CA"):
        load_signer(tmp_path / "self.pem", tmp_path / "self.key")


def test_resigning_replaces_the_manifest(signed, signer):
    shutil.copy(signed, signed.with_name("copy.mp4"))
    copy = signed.with_name("copy.mp4")
    sign_file(copy, identity_name="other", consent=CONSENT, signer=signer)
    p = read_provenance(copy)
    assert p["valid"] and p["identity"]["identity"] == "other"
