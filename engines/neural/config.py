"""The neural engine's constants, in one place: what the network takes and how big it is,
the training presets, the held-out share and the bundle's file names.

Model, training, evaluation and the benchmark all read these; a bundle records
MODEL_CONFIG, so changing it here affects new enrollments only (old bundles and
checkpoints load with the config they were trained with). No heavy imports here: the CLI
and the runtime read it before anything loads torch.
"""
from __future__ import annotations

from dataclasses import dataclass

SIZE = 256  # the generator's input and output side; = identity.RENDER_SIZE
IN_CHANNELS = 11  # warp RGB, contour map, previous contour map, rigid-head RGB, still RGB (model.py)
LEGACY_CHANNELS = 8  # bundles enrolled before the still reference: they run without it

# The generator every enrollment trains (and the benchmark times when it has none trained).
MODEL_CONFIG = {"width": 32, "deep": 96, "blocks": 4, "in_channels": IN_CHANNELS}

HOLDOUT = 0.2  # the last fifth of a self-scan's frames: evaluation only, never trained on

MODEL_FILE = "generator.onnx"
WEIGHTS_FILE = "generator.pt"
INT8_FILE = "generator.int8.onnx"
EVAL_FILE, EVAL_HTML = "eval.json", "eval.html"
CHECKPOINT_FILE = "checkpoint.pt"
MOUTH_MEMORY_FILE = "mouth_memory.npz"
EYE_MEMORY_FILE = "eye_memory.npz"


@dataclass
class Preset:
    steps: int
    batch: int
    lr: float
    max_minutes: float  # wall-clock cap on training, so a preset keeps its time promise
    crop: int = 160  # train on random crops (the net is fully convolutional): ~2.5x more samples/s
    augment: float = 0.5  # share of samples moved by a random head pose (PairBuilder.batch)


# lr 2e-3 spiked around step 100 in most runs (bf16, no normalisation layers) and lost
# hundreds of steps of progress; 1e-3 trains smoothly. quick asks for more steps than most
# machines finish in its 6 minutes: the cap stops it annealed (train.learning_rate), so a
# CPU without bf16 ends at about 1200 steps (estimated from an AVX2 CPU's 1000 in ~4.9 min),
# and one with bf16 (2500 steps in ~5 min) trains on for a better identity. 6, not more: reading the video, the
# evaluation and the int8 check add up to 1.6 min on a slow CPU, and quick promises 8.
PRESETS = {
    "quick": Preset(steps=2500, batch=6, lr=1e-3, max_minutes=6.0),
    "default": Preset(steps=6000, batch=6, lr=1e-3, max_minutes=52.0),
    "quality": Preset(steps=12000, batch=6, lr=7e-4, max_minutes=180.0, crop=256),
}
