"""Who a face is: dlib's 128-D face descriptor (its ResNet face recognition model) and the
distance between two. By dlib's convention two faces closer than 0.6 are the same person.

Optional: needs the `identity` extra (dlib-bin and face_recognition_models, whose package
data holds the model files). Nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

EXTRA_HINT = "pip install -e .[identity]"
SAME_PERSON = 0.6  # dlib's threshold: below it, the same person
# The HOG detector's window is 80 px: below this size an image is upsampled once when no
# face is found at its own size (a 256² avatar crop with a small or turned face).
UPSAMPLE_BELOW = 640


class IdentityDistanceUnavailable(ImportError):
    pass


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))


@lru_cache(maxsize=1)
def _models():
    """dlib's face detector, 5-point shape predictor and ResNet, loaded once (about 0.7 s)."""
    if not available():
        raise IdentityDistanceUnavailable(f"identity distance needs dlib and its face models: {EXTRA_HINT}")
    import dlib

    # The files are found without importing face_recognition_models: its __init__ imports
    # pkg_resources, which recent setuptools no longer ship.
    spec = importlib.util.find_spec("face_recognition_models")
    models = Path(spec.submodule_search_locations[0]) / "models"
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat")))


def descriptor(rgb: np.ndarray) -> np.ndarray | None:
    """The 128-D descriptor of the largest face in an RGB uint8 image; None without a face."""
    detect, shape, net = _models()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    faces = detect(rgb, 0)
    if not faces and min(rgb.shape[:2]) < UPSAMPLE_BELOW:
        faces = detect(rgb, 1)
    if not faces:
        return None
    face = max(faces, key=lambda r: r.width() * r.height())
    return np.array(net.compute_face_descriptor(rgb, shape(rgb, face)))


def distance(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Euclidean distance of two descriptors (None if either face was not found)."""
    if a is None or b is None:
        return None
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
