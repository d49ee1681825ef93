"""Identity bundles: a folder per consenting person (or demo face).

    <root>/<name>/manifest.json      schema, names, engine, crop, consent, files + sha256
    <root>/<name>/reference.png      the face the engines animate (a square, output_side())
    <root>/<name>/neutral.npy        its (478, 3) landmarks
    <root>/<name>/scene.jpg          photo identities: the photo around the face (at most
                                     SCENE_SIDE px), where call frames paste the avatar back;
                                     the manifest's "scene" says where the face square sits in it

IdentityStore.write is the one writer (photo identities and neural enrollments alike);
loading checks every field and every file's hash and says exactly what is wrong.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from .landmarks import NUM_POINTS, FaceLandmarker

SCHEMA_VERSION = 1
RENDER_SIZE = 256  # what a neural identity's generator is trained at
PHOTO_SIZE = 512  # a photo identity's side, unless its face is smaller in the photo
SIZE_STEP = 16  # sides are multiples of it: even for I420, whole blocks for VP8
MIN_SIDE, MAX_SIDE = 64, 1024  # what a bundle's reference may measure
ENGINES = ("warp", "neural")
# Used with fullmatch: `$` alone also matches before a trailing newline ("nl2\n").
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MEMORIES = ("mouth_memory", "eye_memory")  # optional manifest fields naming a bundle's remembered appearances
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a plain file inside the bundle
DEFAULT_IDENTITY = "demo"
# A bundle being written, beside the identities: .<name>-<8 random>.staging (no suffix
# before issue #33). Its writer holds it locked; one found unlocked is a dead writer's.
STAGING_SUFFIX = ".staging"
STAGING_RE = re.compile(r"\.[a-z0-9][a-z0-9_-]{0,62}-[a-z0-9_]{8}(\.staging)?")
# Join controls shape letters (Persian, Indic scripts) and emoji; no other format or control
# character belongs in a name people read.
JOINERS = frozenset("\u200c\u200d")
CROP_SCALE = 1.9  # crop side over the landmarks' extent: room for hair and neck
SCENE_SIDE = 1920  # a scene's longer side at most (a 1080p call frame needs no more)
SCENE_REACH = (3.0, 2.2)  # how far a scene reaches from the face square's centre, in its sides (x, y)
SCENE_FILE = "scene.jpg"


class IdentityError(ValueError):
    """An identity cannot be created or loaded; the message says why."""


class ConsentError(IdentityError):
    """The identity's consent does not cover this use (scope, expiry, or revoked)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code  # consent_revoked, consent_expired or consent_scope


# What a consent's scope may name; "demo" (the embedded public-domain face) covers them all.
USES = ("live-avatar", "offline-render", "enrollment")
DEMO_SCOPE = "demo"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise IdentityError(
            f"invalid identity name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit")
    return name


def check_label(text: object, what: str) -> str:
    """A one-line text people read as a name (a display name, a consent's subject);
    IdentityError if it holds a control or format character: a newline forges another line
    of a log or a list, a bidi override (U+202E) shows other words than those stored."""
    if not isinstance(text, str):
        raise IdentityError(f"{what} must be a string")
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and ch not in JOINERS:
            raise IdentityError(f"{what} has a control character (U+{ord(ch):04X}); use one line of plain text")
    return text


def check_labels(display_name: str, consent: "Consent") -> None:
    """The names an identity shows people: its display name and its consent's subject."""
    check_label(display_name, "display_name")
    check_label(consent.subject, "consent.subject")


@dataclass
class Consent:
    statement: str  # what the person agreed to, in their words or the operator's record
    subject: str  # who is depicted
    recorded_by: str  # who recorded the consent
    granted_at: str  # ISO 8601
    scope: list[str] = field(default_factory=lambda: list(USES))
    expires_at: str | None = None  # ISO 8601; no use after it
    revoked_at: str | None = None  # set by `avatar identity revoke`: the record stays, its use stops
    revoked_by: str | None = None
    revoke_reason: str | None = None

    def check(self, use: str, now: dt.datetime | None = None) -> None:
        """Raise ConsentError unless this consent covers `use` (one of USES) now."""
        now = now or dt.datetime.now(dt.timezone.utc)
        if self.revoked_at:
            raise ConsentError(f"consent for {self.subject!r} was revoked on {self.revoked_at}"
                               f" by {self.revoked_by}" + (f" ({self.revoke_reason})" if self.revoke_reason else ""),
                               "consent_revoked")
        if self.expires_at and now >= _aware(dt.datetime.fromisoformat(self.expires_at)):
            raise ConsentError(f"consent for {self.subject!r} expired on {self.expires_at}", "consent_expired")
        if use not in self.scope and DEMO_SCOPE not in self.scope:
            raise ConsentError(f"consent for {self.subject!r} does not cover {use!r} "
                               f"(it covers: {', '.join(self.scope)})", "consent_scope")

    @classmethod
    def from_dict(cls, d: object) -> "Consent":
        if not isinstance(d, dict):
            raise IdentityError("consent must be an object")
        for key in ("statement", "subject", "recorded_by", "granted_at"):
            if not isinstance(d.get(key), str) or not d[key].strip():
                raise IdentityError(f"consent.{key} must be a non-empty string")
        try:
            dt.datetime.fromisoformat(d["granted_at"])
        except ValueError:
            raise IdentityError(f"consent.granted_at is not an ISO 8601 time: {d['granted_at']!r}")
        scope = d.get("scope", [])
        if not isinstance(scope, list) or not scope or not all(isinstance(s, str) for s in scope):
            raise IdentityError("consent.scope must be a non-empty list of strings")
        optional = {}
        for key in ("expires_at", "revoked_at", "revoked_by", "revoke_reason"):
            value = d.get(key)
            if value is not None and not isinstance(value, str):
                raise IdentityError(f"consent.{key} must be a string")
            optional[key] = value
        for key in ("expires_at", "revoked_at"):
            if optional[key]:
                try:
                    dt.datetime.fromisoformat(optional[key])
                except ValueError:
                    raise IdentityError(f"consent.{key} is not an ISO 8601 time: {optional[key]!r}")
        return cls(d["statement"], d["subject"], d["recorded_by"], d["granted_at"], scope, **optional)


@dataclass
class Identity:
    name: str
    display_name: str
    engine: str
    reference: np.ndarray  # RGB uint8, a square: output_side() of its source (RENDER_SIZE before 512² output)
    neutral: np.ndarray  # (478, 3) float32 landmarks of the reference
    consent: Consent
    path: Path
    manifest: dict

    def memory(self, kind: str):
        """Its remembered appearances of one kind ("mouth_memory": engines.mouth.MouthMemory,
        "eye_memory": engines.eyes.EyeMemory) when the bundle has them, else None. The file
        is listed in the manifest, so its hash was checked at load. Memories are kept in
        RENDER_SIZE crop pixels, where the generator was trained; they are scaled to this
        identity's size."""
        name = self.manifest.get(kind)
        if name is None:
            return None
        from .render.eyes import EyeMemory
        from .render.mouth import MouthMemory

        try:
            return {"mouth_memory": MouthMemory, "eye_memory": EyeMemory}[kind].load(self.path / name).scaled(
                self.size / RENDER_SIZE)
        except (OSError, KeyError, ValueError) as e:
            raise IdentityError(f"identity {self.name!r}: {name} is not a {kind.replace('_', ' ')} ({e})") from None

    def scene(self) -> tuple[np.ndarray, tuple[float, float, float]] | None:
        """The photo (or the self-scan's reference frame) around the face (RGB) and where the
        face square sits in it, (x0, y0, side) in scene pixels; None for a bundle made before
        scenes were kept. Its hash was checked at load; read here, when asked."""
        entry = self.manifest.get("scene")
        if entry is None:
            return None
        bgr = cv2.imread(str(self.path / entry["image"]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise IdentityError(f"identity {self.name!r}: {entry['image']} is not a readable image")
        x0, y0, x1, y1 = (float(v) for v in entry["box"])
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (x0, y0, (x1 - x0 + y1 - y0) / 2)

    @property
    def size(self) -> int:
        return self.reference.shape[0]

    def at_most(self, side: int) -> "Identity":
        """This identity rendered no larger than `side` (an operator's --output-size): its
        reference scaled down and its landmarks with it. An enrolled identity stays at least
        RENDER_SIZE: its generator runs at that size."""
        floor = RENDER_SIZE if self.engine == "neural" else 0
        return self if self.size <= side else self.scaled(max(side, floor))

    def scaled(self, side: int) -> "Identity":
        """This identity with its reference resized to `side` and its landmarks with it."""
        if side == self.size:
            return self
        k = side / self.size
        reference = cv2.resize(self.reference, (side, side), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
        return replace(self, reference=reference, neutral=(self.neutral * k).astype(np.float32))

    @property
    def label_viewers(self) -> bool:
        """Whether viewers see the visible "AI avatar" badge (on unless its owner turned it off)."""
        return self.manifest.get("visible_label", True) is not False


class IdentityStore:
    """The identities under one folder (default: $AVATAR_HOME/identities)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.fullmatch(p.name) and (p / "manifest.json").is_file())

    def exists(self, name: str) -> bool:
        return (self.path(name) / "manifest.json").is_file()

    def load(self, name: str) -> Identity:
        if name == DEFAULT_IDENTITY and not self.exists(name):
            self.ensure_default()
        folder = self.path(name)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            known = ", ".join(self.names()) or "none"
            raise IdentityError(f"no identity named {name!r} (known: {known})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IdentityError(f"{manifest_path}: not valid JSON ({e})")
        return _from_manifest(folder, manifest)

    def revoke(self, name: str, by: str, reason: str = "") -> Consent:
        """Mark the identity's consent revoked: every use stops (a running server ends live
        sessions within a second), the record and the bundle stay. Identities made from it
        (its styles) carry its consent, so they are revoked with it."""
        def change(m: dict) -> None:
            if m["consent"].get("revoked_at"):
                raise IdentityError(f"consent for identity {name!r} was already revoked on {m['consent']['revoked_at']}")
            m["consent"].update(revoked_at=_now(), revoked_by=by, revoke_reason=reason or None)
        consent = self.update_manifest(name, change).consent
        for derived in self.derived_from(name):
            if not self.load(derived).consent.revoked_at:
                self.revoke(derived, by, f"revoked with {name!r}" + (f": {reason}" if reason else ""))
        return consent

    def derived_from(self, name: str) -> list[str]:
        """The identities made from identity `name` (`avatar identity style`)."""
        found = []
        for other in self.names():
            try:
                provenance = json.loads((self.path(other) / "manifest.json").read_text()).get("provenance")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue  # a broken bundle is refused wherever it is loaded
            if isinstance(provenance, dict) and provenance.get("derived_from") == name:
                found.append(other)
        return found

    def style(self, name: str, style: str, new_name: str, display_name: str | None = None,
              overwrite: bool = False) -> Identity:
        """A new identity: identity `name` in `style` (engines/render/style.py). The reference and
        the scene are repainted as one picture, the landmarks stay; it inherits the consent
        record (scope, expiry, and revocation: see revoke) and names its origin."""
        from .render.style import stylize

        origin = self.style_origin(name, style, new_name)
        if origin.engine != "warp" or any(kind in origin.manifest for kind in MEMORIES):
            raise IdentityError(f"identity {name!r} is an enrolled ({origin.engine}) identity: its generator "
                                "and memories learned the real face; engines.neural.enroll.restyle trains "
                                "them again on its restyled self-scan")
        scene = origin.scene()
        if scene is None:  # a bundle made before scenes were kept
            reference, extra = stylize(origin.reference, style, origin.size), None
        else:
            picture, (x0, y0, side) = scene
            picture, reference = restyle_scene(picture, x0, y0, side, style, origin.size)

            def extra(staging: Path) -> tuple[list[str], dict]:
                return write_scene(staging, picture, origin.manifest["scene"]["box"])
        provenance = {"source": f"identity {name}", "derived_from": name, "style": style}
        return self.write(new_name, display_name or f"{origin.display_name} ({style})", "warp", origin.consent,
                          reference, origin.neutral, origin.manifest["crop"], provenance,
                          tool="avatar identity style", extra=extra, overwrite=overwrite)

    def style_origin(self, name: str, style: str, new_name: str) -> Identity:
        """Identity `name`, checked as the origin of its style `new_name`: a known style, a new
        name, and consent covering it (a refused origin makes nothing, not even a staging folder)."""
        from .render.style import check_style

        try:
            check_style(style)
        except ValueError as e:
            raise IdentityError(str(e)) from None
        if check_name(new_name) == name:
            raise IdentityError("a style is a new identity: give it a new --name")
        origin = self.load(name)
        origin.consent.check("enrollment")
        return origin

    def set_label(self, name: str, viewers: bool) -> None:
        """Show (or not) the visible "AI avatar" badge to the identity's viewers."""
        self.update_manifest(name, lambda m: m.update(visible_label=viewers))

    def update_manifest(self, name: str, change: Callable[[dict], None]) -> Identity:
        """Apply `change` to the manifest of a valid identity and replace it atomically."""
        if name == DEFAULT_IDENTITY and not self.exists(name):
            self.ensure_default()
        self.load(name)  # refuse to edit a broken bundle
        path = self.path(name) / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        staged = path.with_name(".manifest.json.tmp")
        staged.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(staged, path)
        return self.load(name)

    def consent_stamp(self, name: str) -> float:
        """Changes whenever the manifest is rewritten (cheap: one stat), so a live session
        can notice a revocation without reloading the bundle every second."""
        try:
            return (self.path(name) / "manifest.json").stat().st_mtime_ns
        except OSError:
            return -1

    def delete(self, name: str) -> None:
        folder = self.path(name)
        if not (folder / "manifest.json").is_file():
            raise IdentityError(f"no identity named {name!r}")
        shutil.rmtree(folder)
        shutil.rmtree(self.work_dir(name), ignore_errors=True)  # its enrollment checkpoint goes with it

    def work_dir(self, name: str) -> Path:
        """Where unfinished work on identity `name` is kept (an enrollment's training
        checkpoint, engines/neural/train.py): hidden beside the identities, never loaded as one."""
        return self.root / f".{check_name(name)}.enroll"

    def create_from_image(self, image_path: str | os.PathLike, name: str, consent: Consent,
                          display_name: str | None = None, overwrite: bool = False) -> Identity:
        check_name(name)
        rgb = read_image(image_path)
        return self.create(rgb, name, consent, display_name or name, source=Path(image_path).name,
                           overwrite=overwrite)

    def create(self, rgb: np.ndarray, name: str, consent: Consent, display_name: str,
               source: str, overwrite: bool = False) -> Identity:
        """Crop the face (PHOTO_SIZE, or the face's own size in the photo if smaller), find
        its neutral landmarks and write the bundle atomically."""
        check_name(name)
        if self.exists(name) and not overwrite:
            raise IdentityError(f"identity {name!r} already exists (delete it first)")
        reference, crop = crop_face(rgb)
        with FaceLandmarker(static=True) as landmarker:
            neutral = landmarker(reference)
        if neutral is None:
            raise IdentityError("the face was lost after cropping; try a larger, frontal photo")
        scene, box = scene_around(rgb, crop)
        return self.write(name, display_name, "warp", consent, reference, neutral, crop,
                          {"source": source}, tool="avatar identity create",
                          extra=lambda staging: write_scene(staging, scene, box), overwrite=overwrite)

    def write(self, name: str, display_name: str, engine: str, consent: Consent, reference: np.ndarray,
              neutral: np.ndarray, crop: Sequence[int], provenance: dict, tool: str,
              extra: Callable[[Path], tuple[list[str], dict]] | None = None,
              overwrite: bool = False) -> Identity:
        """Write a bundle and publish it atomically: the one writer of every identity, so
        every manifest has the same common fields, whichever tool made it.

        reference.png and neutral.npy are written first; then `extra(staging)` may add its
        own files to the staging folder and returns their names and its manifest fields
        (the neural engine's model files and "neural" section). `provenance` holds what the
        bundle was made from; created_at and tool are added here. The consent must cover
        enrollment (ConsentError otherwise). An existing identity of
        that name is replaced only with `overwrite`, checked again at the end, as an
        enrollment's minutes of training leave time for one to appear."""
        consent.check("enrollment")
        check_labels(display_name, consent)
        check_reference(reference)
        with self.new_bundle(name) as staging:
            cv2.imwrite(str(staging / "reference.png"), cv2.cvtColor(reference, cv2.COLOR_RGB2BGR))
            np.save(staging / "neutral.npy", neutral.astype(np.float32))
            files = ["reference.png", "neutral.npy"]
            extra_files, extra_fields = extra(staging) if extra is not None else ([], {})
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "name": name,
                "display_name": display_name,
                "engine": engine,
                "reference_image": "reference.png",
                "neutral_landmarks": "neutral.npy",
                "crop": [int(v) for v in crop],
                "consent": consent.__dict__,
                "provenance": {**provenance, "created_at": _now(), "tool": tool},
                **extra_fields,
            }
            if self.exists(name) and not overwrite:
                raise IdentityError(f"identity {name!r} already exists (use --overwrite to replace it)")
            self.publish(staging, manifest, files + extra_files)
        return self.load(name)

    @contextlib.contextmanager
    def new_bundle(self, name: str):
        """A staging folder beside the identities, removed afterwards unless published. It
        holds a face until then, so a writer killed mid-write must not leave it behind: the
        writer keeps it locked (the kernel drops the lock when the writer dies), and
        sweep_staging, run here and when the server starts, removes unlocked ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_staging()
        staging, lock = self._locked_staging(check_name(name))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(lock)

    def _locked_staging(self, name: str) -> tuple[Path, int]:
        """A new staging folder and the descriptor holding its lock. Another process's sweep
        may take the new folder, unlocked for an instant, for a dead writer's and remove it:
        then another is made."""
        while True:
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=STAGING_SUFFIX, dir=self.root))
            try:
                fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep looks at it
            try:
                if os.path.samestat(os.fstat(fd), os.stat(staging)):
                    return staging, fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def sweep_staging(self) -> list[str]:
        """Remove the staging folders of writers that died mid-write (a killed enrollment's
        reference, landmarks and generator); a live writer's, locked, stays. The names removed."""
        removed = []
        if not self.root.is_dir():
            return removed
        for folder in self.root.iterdir():
            if not STAGING_RE.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
                continue
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue  # removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            else:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
            finally:
                os.close(fd)
        return removed

    def publish(self, staging: Path, manifest: dict, files: list[str]) -> None:
        """Hash `files`, write the manifest and swap the staging folder in as the identity,
        so a crash never leaves a half-written bundle under the identity's name. Unfinished
        work on the name (an enrollment checkpoint) goes: the name now holds a finished
        identity, and a later enrollment must not resume into it."""
        manifest["files"] = {f: sha256(staging / f) for f in files}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        target = self.path(manifest["name"])
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        shutil.rmtree(self.work_dir(manifest["name"]), ignore_errors=True)

    def ensure_default(self) -> None:
        """The embedded demo identity: NASA's public-domain astronaut portrait (Eileen
        Collins), which scikit-image ships, so a fresh install works without enrollment."""
        if self.exists(DEFAULT_IDENTITY):
            return
        from skimage.data import astronaut

        consent = Consent(
            statement="Public-domain NASA portrait (scikit-image's `astronaut`), used as a demo face only.",
            subject="Eileen Collins (NASA photo, public domain)",
            recorded_by="avatar-server (embedded default)",
            granted_at="1999-01-01T00:00:00+00:00",
            scope=["demo"],
        )
        self.create(astronaut(), DEFAULT_IDENTITY, consent, "Demo (NASA astronaut portrait)",
                    source="skimage.data.astronaut")


def read_image(path: str | os.PathLike) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise IdentityError(f"{p}: no such file")
    bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if bgr is None:
        raise IdentityError(f"{p}: not a readable image (PNG, JPEG, ...)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def crop_face(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A square around the one face in rgb, with hair and neck (output_side), and its box."""
    with FaceLandmarker(static=True) as landmarker:
        points = landmarker(rgb)
    if points is None:
        raise IdentityError("no face found in the image; use a well-lit, frontal photo of one person")
    x0, y0, side = face_box(points)
    return crop_with_box(rgb, x0, y0, side, output_side(side)), crop_corners(x0, y0, side)


def output_side(source_side: float, largest: int = PHOTO_SIZE) -> int:
    """The side a face `source_side` px wide in its photo or scan is kept at: `largest`, or
    its own side when that is smaller (no upscaled detail), in whole SIZE_STEPs, at least
    RENDER_SIZE."""
    return int(np.clip(source_side // SIZE_STEP * SIZE_STEP, RENDER_SIZE, max(largest, RENDER_SIZE)))


def restyle_scene(picture: np.ndarray, x0: float, y0: float, side: float, style: str,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene `picture` in `style`, and its face square (x0, y0, side) cut from it at `size`:
    restyled as one picture, so the head pasted back into it meets the same strokes at the seam."""
    from .render.style import stylize

    picture = stylize(picture, style, side)
    return picture, crop_with_box(picture, x0, y0, side, size)


def scene_around(rgb: np.ndarray, crop: Sequence[int]) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The part of the photo around the face square `crop` (left, top, right, bottom, photo
    pixels) that a call frame may show, SCENE_REACH square sides from its centre, scaled so
    its longer side is at most SCENE_SIDE; and the square in its pixels (left, top, right,
    bottom, fractional)."""
    h, w = rgb.shape[:2]
    left, top, right, bottom = (float(v) for v in crop)
    side = right - left
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0, x1 = max(0, math.floor(cx - SCENE_REACH[0] * side)), min(w, math.ceil(cx + SCENE_REACH[0] * side))
    y0, y1 = max(0, math.floor(cy - SCENE_REACH[1] * side)), min(h, math.ceil(cy + SCENE_REACH[1] * side))
    part = rgb[y0:y1, x0:x1]
    k = min(1.0, SCENE_SIDE / max(part.shape[:2]))
    if k < 1.0:
        size = (max(1, round(part.shape[1] * k)), max(1, round(part.shape[0] * k)))
        part = cv2.resize(part, size, interpolation=cv2.INTER_AREA)
        kx, ky = size[0] / (x1 - x0), size[1] / (y1 - y0)
    else:
        kx = ky = 1.0
    box = ((left - x0) * kx, (top - y0) * ky, (right - x0) * kx, (bottom - y0) * ky)
    return np.ascontiguousarray(part), box


def write_scene(staging: Path, scene: np.ndarray, box: Sequence[float]) -> tuple[list[str], dict]:
    """The scene file in a bundle being written, and its manifest field (IdentityStore.write's
    `extra`): the picture around the face and where the face square sits in it."""
    cv2.imwrite(str(staging / SCENE_FILE), cv2.cvtColor(scene, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 93])
    return [SCENE_FILE], {"scene": {"image": SCENE_FILE, "box": [round(float(v), 2) for v in box]}}


def face_box(points: np.ndarray) -> tuple[float, float, float]:
    """The crop square (x0, y0, side) around a face's landmarks, with hair and neck."""
    lo, hi = points[:, :2].min(0), points[:, :2].max(0)
    side = float((hi - lo).max()) * CROP_SCALE
    cx, cy = (lo + hi) / 2
    cy -= 0.08 * side  # hair above the forehead needs more room than the neck
    return float(cx - side / 2), float(cy - side / 2), side


def crop_corners(x0: float, y0: float, side: float) -> tuple[int, int, int, int]:
    """The crop square as a manifest records it: (left, top, right, bottom), whole pixels."""
    return round(x0), round(y0), round(x0 + side), round(y0 + side)


def crop_matrix(x0: float, y0: float, side: float, size: int = RENDER_SIZE) -> np.ndarray:
    """The 2x3 affine map from image pixels to the pixels of a `size` square crop."""
    k = size / side
    return np.array([[k, 0, -x0 * k], [0, k, -y0 * k]])


def points_to_crop(points: np.ndarray, x0: float, y0: float, side: float, size: int = RENDER_SIZE) -> np.ndarray:
    """Landmarks (..., 478, 3) in image pixels -> float32 crop pixels, as crop_with_box moves
    the image: x and y scaled and shifted by crop_matrix, z scaled alike (landmarks keep z
    in the units of x)."""
    m = crop_matrix(x0, y0, side, size)
    p = np.array(points, np.float64)
    p[..., :2] = p[..., :2] * m[0, 0] + m[:, 2]
    p[..., 2] *= m[0, 0]
    return p.astype(np.float32)


def crop_with_box(rgb: np.ndarray, x0: float, y0: float, side: float, size: int = RENDER_SIZE) -> np.ndarray:
    """The `size` square crop of rgb; where the box reaches past the image, pad_softly fills it.
    Enlarged bicubically: bilinear kept 0.70 of a 202-px face's detail at 256² (shown at
    720 px, metrics.face_detail), bicubic 0.98."""
    h, w = rgb.shape[:2]
    cx0, cy0 = min(max(math.floor(x0), 0), w - 1), min(max(math.floor(y0), 0), h - 1)
    cx1, cy1 = min(max(math.ceil(x0 + side) + 1, cx0 + 1), w), min(max(math.ceil(y0 + side) + 1, cy0 + 1), h)
    part = rgb[cy0:cy1, cx0:cx1]  # what of the image the box holds
    left, top = max(0, cx0 - math.floor(x0) + 2), max(0, cy0 - math.floor(y0) + 2)
    right, bottom = max(0, math.ceil(x0 + side) - cx1 + 3), max(0, math.ceil(y0 + side) - cy1 + 3)
    padded = pad_softly(part, top, bottom, left, right)
    return cv2.warpAffine(padded, crop_matrix(x0 - cx0 + left, y0 - cy0 + top, side, size), (size, size),
                          flags=cv2.INTER_CUBIC if size > side else cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def pad_softly(rgb: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """rgb with margins that continue its edge, smoothed along the edge the more the further
    they lie from it. Repeating the edge (BORDER_REPLICATE) drew whatever crossed it out to
    the crop's border as a streak: a hair bun cut by the top of a self-scan became a pole
    above the head in every render. Smoothed, it fades into a soft continuation; never dark."""
    out = _pad_rows(rgb, top, bottom)
    return np.ascontiguousarray(_pad_rows(out.transpose(1, 0, 2), left, right).transpose(1, 0, 2))


def _pad_rows(rgb: np.ndarray, top: int, bottom: int) -> np.ndarray:
    """rgb with `top` rows above and `bottom` below; the row d away from the image is the mean
    of the edge row over +-2d pixels, so a streak across the edge fans out and fades within a
    few of its own widths."""
    def band(edge: np.ndarray, n: int) -> np.ndarray:
        ext = np.pad(edge.astype(np.float64), ((2 * n, 2 * n), (0, 0)), mode="reflect")
        sums = np.concatenate([np.zeros((1, edge.shape[1])), np.cumsum(ext, 0)])
        reach = 2 * np.arange(1, n + 1)[:, None]
        x = np.arange(len(edge))[None] + 2 * n  # edge pixel x sits at ext[x + 2n]
        mean = (sums[x + reach + 1] - sums[x - reach]) / (2 * reach + 1)[..., None]
        return np.rint(mean).astype(rgb.dtype)

    above = band(rgb[0], top)[::-1] if top else rgb[:0]
    below = band(rgb[-1], bottom) if bottom else rgb[:0]
    return np.concatenate([above, rgb, below])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _visemes_ok(entry: object) -> bool:
    """An enrollment's learned mouth shapes (engines/voice/learn.py), as the voice reads them."""
    shapes = entry.get("shapes") if isinstance(entry, dict) else None
    return isinstance(shapes, dict) and all(
        isinstance(k, str) and isinstance(v, list) and len(v) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and -1 <= x <= 1 for x in v)
        for k, v in shapes.items())


def _from_manifest(folder: Path, m: object) -> Identity:
    where = folder / "manifest.json"

    def fail(msg):
        raise IdentityError(f"{where}: {msg}")

    if not isinstance(m, dict):
        fail("must be a JSON object")
    if m.get("schema_version") != SCHEMA_VERSION:
        fail(f"schema_version must be {SCHEMA_VERSION}, got {m.get('schema_version')!r}")
    for key in ("name", "display_name", "engine", "reference_image", "neutral_landmarks"):
        if not isinstance(m.get(key), str) or not m[key]:
            fail(f"missing or empty field {key!r}")
    if m["name"] != folder.name:
        fail(f"name {m['name']!r} does not match its folder {folder.name!r}")
    if m["engine"] not in ENGINES:
        fail(f"engine must be one of {', '.join(ENGINES)}, got {m['engine']!r}")
    try:
        consent = Consent.from_dict(m.get("consent"))
    except IdentityError as e:
        fail(str(e))
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        fail("'files' must map file names to sha256 hashes")
    for fname, digest in files.items():
        if not FILE_RE.fullmatch(fname) or ".." in fname or not isinstance(digest, str):
            fail(f"file name {fname!r} is not a plain file name")
        f = folder / fname
        if not f.is_file():
            fail(f"listed file {fname} is missing")
        if sha256(f) != digest:
            fail(f"{fname} does not match its sha256 (corrupted or edited)")
    for key in ("reference_image", "neutral_landmarks"):
        if m[key] not in files:
            fail(f"{key} {m[key]!r} is not listed in 'files'")
    for key in MEMORIES:
        if key in m and m[key] not in files:
            fail(f"{key} {m[key]!r} is not listed in 'files'")
    if "scene" in m:
        scene = m["scene"]
        if not isinstance(scene, dict) or scene.get("image") not in files:
            fail("scene must name an image listed in 'files'")
        box = scene.get("box")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
                or not (box[2] - box[0] > 1 and abs((box[2] - box[0]) - (box[3] - box[1])) <= 2)):
            fail("scene.box must be a square [left, top, right, bottom] in the scene's pixels")
    if "visemes" in m and not _visemes_ok(m["visemes"]):
        fail("visemes.shapes must map viseme names to [gap, spread, round], numbers within -1..1")
    bgr = cv2.imread(str(folder / m["reference_image"]), cv2.IMREAD_COLOR)
    if bgr is None:
        fail(f"{m['reference_image']} is not a readable image")
    try:
        neutral = np.load(folder / m["neutral_landmarks"], allow_pickle=False)
    except ValueError as e:
        fail(f"{m['neutral_landmarks']} is not a NumPy array ({e})")
    if neutral.shape != (NUM_POINTS, 3) or not np.isfinite(neutral).all():
        fail(f"neutral landmarks must be a finite ({NUM_POINTS}, 3) array, got {neutral.shape}")
    try:
        check_reference(bgr)
    except IdentityError as e:
        fail(f"{m['reference_image']}: {e}")
    return Identity(m["name"], m["display_name"], m["engine"], cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                    neutral.astype(np.float32), consent, folder, m)


def check_reference(image: np.ndarray) -> None:
    """IdentityError unless `image` can be a reference: an even square the renderer and the
    encoders take."""
    h, w = image.shape[:2]
    if h != w or not MIN_SIDE <= h <= MAX_SIDE or h % 2:
        raise IdentityError(f"a reference must be an even square of {MIN_SIDE}-{MAX_SIDE} px, got {w}x{h}")


def default_home() -> Path:
    return Path(os.environ.get("AVATAR_HOME") or Path.home() / ".local" / "share" / "avatar")


def identities_dir(home: str | os.PathLike | None = None) -> Path:
    """Where the identities of `home` (default: default_home()) live."""
    return Path(home or default_home()) / "identities"
