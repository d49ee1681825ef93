"""Signed C2PA provenance for offline renders: who made the file, that it is AI-generated,
and whose consented face it shows; a verifier reads it back and detects tampering.

Why C2PA, and why `c2pa-python`: the visible badge (label.py) and the invisible mark
(watermark.py) say "synthesized" but anyone can forge them. A C2PA manifest is signed with
an X.509 key, hashes the media bytes, and is what players, newsrooms and
contentcredentials.org verify. `c2pa-python` wraps the reference implementation (c2pa-rs,
the one those verifiers use) in a prebuilt wheel: writing JUMBF boxes, COSE signatures and
the BMFF hash rules by hand would be a large, easy-to-get-wrong reimplementation.

What a signed file carries (the active manifest):
- `claim_generator_info`: avatar-server and its version;
- `c2pa.actions`: one `c2pa.created` action whose `digitalSourceType` is IPTC's
  `trainedAlgorithmicMedia` (the standard way to say "AI-generated");
- `org.avatar-server.identity`: the identity's name, its consent's subject and
  granted_at, `consent_sha256` (see `consent_digest`), and the watermark payload if given.

Formats (c2pa-python 0.38.1, c2pa-rs 0.91.3): MP4 and MOV (ISO BMFF) can be signed and
read, and so can PNG and JPEG. Matroska (.mkv) cannot: the library has no MKV support
("type is unsupported"), so `sign_file` refuses it; render to .mp4 or .mov instead.

Certificates: the library enforces C2PA's certificate profile when signing. Measured on
0.38.1: the signing certificate must be issued by a CA (a self-signed leaf is refused),
carry keyUsage digitalSignature, an authorityKeyIdentifier, and an extendedKeyUsage the
library accepts: emailProtection, timeStamping or OCSPSigning. It rejects documentSigning
and the C2PA/Microsoft signing EKUs ("certificate missing required EKU") despite the
specification listing them. `local_signer` makes such a chain when the operator has none.

Trust is not validity. `valid` means the signature verifies and the media hashes match;
`trusted` means the signer chains to a trust anchor the verifier knows. A local signer is
never trusted by anyone else's verifier (it is valid, and `trusted` says False): that is
the honest answer for a self-made CA. Pass its `ca.pem` as `trust_anchors` to trust it.

No network: verification runs with remote-manifest and OCSP fetching off, and signing
uses no timestamp authority, so a manifest's time is the signer's own clock.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOOL = "avatar-server"
IDENTITY_LABEL = "org.avatar-server.identity"
AI_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_AI_SOURCES = {AI_SOURCE, "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"}
# Tested with this library version; it supports more (avi, webp, ...), untested here.
FORMATS = {".mp4": "video/mp4", ".mov": "video/quicktime", ".png": "image/png",
           ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
# Failure codes about who signed, not about whether the file is intact.
TRUST_CODES = {"signingCredential.untrusted", "timeStamp.untrusted"}
_OFFLINE = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_PROFILE_HINT = ("C2PA needs a signing certificate issued by a CA (not self-signed) with keyUsage "
                 "digitalSignature, an authorityKeyIdentifier, and extendedKeyUsage emailProtection "
                 "(c2pa-python 0.38 refuses documentSigning); or use local_signer()")


class ProvenanceError(RuntimeError):
    """Signing or reading provenance failed: unsupported format, bad credentials, library error."""


@dataclass(frozen=True)
class Signer:
    """A certificate chain (leaf first, PEM) and its private key (PKCS#8 PEM)."""
    cert_chain_pem: bytes
    private_key_pem: bytes = field(repr=False)
    alg: str  # es256, es384, es512, ps256 or ed25519
    subject: str = ""  # the leaf's common name, for messages


def _tool_version() -> str:
    try:
        return importlib.metadata.version(TOOL)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _alg_for(key) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name)
        if alg:
            return alg
        raise ProvenanceError(f"EC curve {key.curve.name} is not allowed by C2PA (use P-256, P-384 or P-521)")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ProvenanceError(f"{type(key).__name__} keys cannot sign C2PA manifests (use EC, RSA or Ed25519)")


def load_signer(cert_path: str | os.PathLike, key_path: str | os.PathLike) -> Signer:
    """Load a PEM chain (signing certificate first) and its private key, and check them now
    (key matches certificate; the library accepts the certificate) rather than after a render."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    try:
        chain_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as e:
        raise ProvenanceError(f"cannot read C2PA signing credentials: {e}") from e
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise ProvenanceError(f"{cert_path}: not a PEM certificate chain ({e})") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise ProvenanceError(f"{key_path}: not an unencrypted PEM private key ({e})") from e
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (chain[0].public_key().public_bytes(serialization.Encoding.DER, pub)
            != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise ProvenanceError(f"{key_path} is not the private key of the first certificate in {cert_path}")
    names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    signer = Signer(
        cert_chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        # c2pa-rs reads only PKCS#8 ("BEGIN PRIVATE KEY"); openssl often writes SEC1 or PKCS#1.
        private_key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()),
        alg=_alg_for(key),
        subject=str(names[0].value) if names else chain[0].subject.rfc4514_string())
    _sign_stream(_tiny_png(), io.BytesIO(), "image/png", {"claim_generator_info": [{"name": TOOL}],
                 "assertions": [_created_action()]}, signer)
    return signer


def local_signer(folder: str | os.PathLike) -> Signer:
    """The operator's local signer under `folder` (e.g. $AVATAR_HOME/c2pa), made on first use.

    Writes ca.pem (a self-made root: the trust anchor a verifier may choose to add),
    signer.pem (the signing certificate, issued by that root) and signer.key (mode 0600).
    The root's private key is discarded after issuing, so nothing can issue more under it.
    Reused while valid; an expired or unreadable set is replaced by a new one (a new root)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = folder / "signer.pem", folder / "signer.key"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two renders starting at once make one set
        if cert.exists() and key.exists():
            try:
                if x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc > _now() + dt.timedelta(days=1):
                    return load_signer(cert, key)
            except (ValueError, ProvenanceError):
                pass
        _write_local_set(folder)
        return load_signer(cert, key)


def consent_digest(consent: dict) -> str:
    """sha256 (hex) of the consent record as canonical JSON: sorted keys, no spaces, UTF-8."""
    canonical = json.dumps(consent, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sign_file(path: str | os.PathLike, *, identity_name: str, consent: dict, signer: Signer,
              payload: str | None = None, title: str | None = None) -> None:
    """Embed a signed manifest into `path` (.mp4, .mov, .png, .jpg) in place: the signed copy is
    written next to it, then replaces it. An existing manifest is replaced, not kept as history."""
    path = Path(path)
    mime = FORMATS.get(path.suffix.lower())
    if mime is None:
        raise ProvenanceError(f"cannot embed a C2PA manifest in {path.name}: c2pa-python {c2pa.__version__} "
                              f"cannot sign {path.suffix or 'extensionless'} files here "
                              f"(supported: {', '.join(sorted(FORMATS))}); render to .mp4 or .mov")
    if not all(isinstance(consent.get(k), str) for k in ("subject", "granted_at")):
        raise ProvenanceError("consent must have string 'subject' and 'granted_at' fields")
    identity = {"identity": identity_name, "consent_subject": consent["subject"],
                "consent_granted_at": consent["granted_at"], "consent_sha256": consent_digest(consent)}
    if payload is not None:
        identity["watermark_payload"] = payload
    version = _tool_version()
    manifest = {"claim_generator_info": [{"name": TOOL, "version": version}],
                "title": title or path.name,
                "assertions": [_created_action(version), {"label": IDENTITY_LABEL, "data": identity}]}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
        with os.fdopen(fd, "w+b") as dst, open(path, "rb") as src:
            _sign_stream(src, dst, mime, manifest, signer)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ProvenanceError(f"cannot sign {path}: {e}") from e
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def read_provenance(path: str | os.PathLike, *, trust_anchors: str | os.PathLike | None = None) -> dict | None:
    """Verify `path`'s C2PA manifest offline. None when the file carries none (which proves
    nothing: a manifest can be stripped). `trust_anchors`: a PEM file of extra roots to trust.

    Returns: valid (signature and media hashes check out), trusted (signer chains to a known
    anchor), state (the library's "Valid", "Trusted" or "Invalid"), problems (integrity
    failures, [{code, explanation}], C2PA status codes such as assertion.bmffHash.mismatch;
    "manifest.unreadable" is this module's code for a manifest the library cannot parse),
    trust_problems (e.g. signingCredential.untrusted), generator, ai_generated,
    digital_source_type, identity (the org.avatar-server.identity assertion), signer
    (common_name, issuer, alg, serial), title."""
    path = Path(path)
    if not path.is_file():
        raise ProvenanceError(f"{path}: no such file")
    settings = dict(_OFFLINE)
    if trust_anchors is not None:
        try:
            settings["trust"] = {"user_anchors": Path(trust_anchors).read_text()}
        except OSError as e:
            raise ProvenanceError(f"cannot read trust anchors: {e}") from e
    try:
        with c2pa.Context.from_dict(settings) as ctx, open(path, "rb") as f:
            reader = c2pa.Reader.try_create(FORMATS.get(path.suffix.lower()), f, context=ctx)
            if reader is None:
                return None
            with reader:
                store = json.loads(reader.json())
    except c2pa.C2paError.NotSupported as e:
        raise ProvenanceError(f"cannot read C2PA from {path.name}: this format is not supported by "
                              f"c2pa-python {c2pa.__version__} ({e})") from e
    except c2pa.C2paError as e:  # a manifest is there but cannot be parsed or checked
        return _report(None, "Invalid", [{"code": "manifest.unreadable", "explanation": str(e)}])
    manifest = store.get("manifests", {}).get(store.get("active_manifest"))
    results = store.get("validation_results") or {}
    failures = list((results.get("activeManifest") or {}).get("failure", []))
    for delta in results.get("ingredientDeltas") or []:
        failures += (delta.get("validationDeltas") or {}).get("failure", [])
    if not results:  # older stores report only validation_status
        failures = store.get("validation_status", [])
    failures = [{"code": s.get("code"), "explanation": s.get("explanation")} for s in failures]
    return _report(manifest, store.get("validation_state", "Invalid"), failures)


def _report(manifest: dict | None, state: str, failures: list[dict]) -> dict:
    manifest = manifest or {}
    assertions = {a.get("label"): a.get("data") for a in manifest.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    source = next((a.get("digitalSourceType") for a in actions if a.get("action") == "c2pa.created"), None)
    gen = (manifest.get("claim_generator_info") or [{}])[0]
    sig = manifest.get("signature_info") or {}
    problems = [f for f in failures if f["code"] not in TRUST_CODES]
    return {
        "valid": state in ("Valid", "Trusted") and not problems,
        "trusted": state == "Trusted",
        "state": state,
        "problems": problems,
        "trust_problems": [f for f in failures if f["code"] in TRUST_CODES],
        "generator": " ".join(str(gen[k]) for k in ("name", "version") if gen.get(k)) or manifest.get("claim_generator"),
        "ai_generated": source in _AI_SOURCES,
        "digital_source_type": source,
        "identity": assertions.get(IDENTITY_LABEL),
        "signer": {"common_name": sig.get("common_name"), "issuer": sig.get("issuer"),
                   "alg": sig.get("alg"), "serial": sig.get("cert_serial_number")} if sig else None,
        "title": manifest.get("title"),
    }


def _created_action(version: str | None = None) -> dict:
    agent = {"name": TOOL, **({"version": version} if version else {})}
    return {"label": "c2pa.actions", "data": {"actions": [
        {"action": "c2pa.created", "digitalSourceType": AI_SOURCE, "softwareAgent": agent}]}}


def _sign_stream(src, dst, mime: str, manifest: dict, signer: Signer) -> None:
    info = c2pa.C2paSignerInfo(signer.alg.encode(), signer.cert_chain_pem, signer.private_key_pem, None)
    try:
        with (c2pa.Context.from_dict({**_OFFLINE, "builder": {"thumbnail": {"enabled": False}}}) as ctx,
              c2pa.Signer.from_info(info) as native, c2pa.Builder(manifest, context=ctx) as builder):
            builder.sign(native, mime, src, dst)
    except c2pa.C2paError as e:
        hint = f"; {_PROFILE_HINT}" if "certificate" in str(e) or "EKU" in str(e) else ""
        raise ProvenanceError(f"C2PA signing with {signer.subject or 'the signer'!r} failed: {e}{hint}") from e


def _tiny_png() -> io.BytesIO:
    """A 1x1 grey PNG: what load_signer signs to prove the credentials work."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return io.BytesIO(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_local_set(folder: Path) -> None:
    now = _now()
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{TOOL} (local, unverified)")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{TOOL} local CA"), org])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{TOOL} local signer"), org])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                             crl_sign=not sign, encipher_only=False, decipher_only=False)

    def build(subject, public_key, years, extensions) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=365 * years))
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(ca_key, hashes.SHA256())

    ca = build(ca_name, ca_key.public_key(), 20, [(x509.BasicConstraints(ca=True, path_length=0), True),
                                                  (usage(False), True)])
    leaf = build(name, key.public_key(), 10, [
        (x509.BasicConstraints(ca=False, path_length=None), True), (usage(True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])
    pem = serialization.Encoding.PEM
    _write(folder / "signer.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()), 0o600)
    _write(folder / "signer.pem", leaf.public_bytes(pem), 0o644)  # the root is the verifier's to add
    _write(folder / "ca.pem", ca.public_bytes(pem), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
