"""What the fork server imports and computes once, so that every session process forked
from it starts with it (server/media/stages.py) instead of paying for it on its first frame: the
engines with mediapipe, OpenCV and numba's compiled raster; ONNX Runtime and torch for
neural identities; the watermark's patterns (a QR decomposition, ~0.15 s)."""
import onnxruntime  # noqa: F401

import server.media.tracks  # noqa: F401
import server.media.stages  # noqa: F401
from engines.neural import model  # noqa: F401  (torch)
from engines.provenance.watermark import patterns

patterns()
