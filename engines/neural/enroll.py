"""Enrollment: train a person's generator from a self-scan video and write a neural bundle.

    data.extract (crops, landmarks, held-out split)  ->  data.PairBuilder (training pairs)
    ->  train.train (checkpointed, resumable)  ->  evaluate.evaluate_holdout (held-out frames)
    ->  bundle.write_bundle (ONNX, weights, int8, eval report, manifest)

Progress is checkpointed to the store's work folder for the name (<root>/.<name>.enroll/)
about once a minute; rerunning an interrupted enrollment of the same video with the same
consent resumes from the checkpoint. An existing identity is never replaced without
overwrite=True (--overwrite), whatever checkpoint there is; publishing removes the
checkpoint, so a finished enrollment is never resumed.

`report(stage, done, total)`, if given, is told how far the work is (stages: "extracting"
per frame, "styling" per frame (a restyle), "preparing", "training" per step, "evaluating",
"writing"; total None when unknown): for a caller that shows progress elsewhere than this
terminal (the server's enrollment jobs).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..identity import PHOTO_SIZE, RENDER_SIZE, Consent, IdentityError, IdentityStore, check_labels, check_name
from .bundle import write_bundle
from .config import CHECKPOINT_FILE, PRESETS
from .data import PairBuilder, extract
from .train import bf16_supported, check_device, enrollment_key, train
from ..voice.learn import learn_from_video

log = logging.getLogger(__name__)
RESOLUTIONS = (RENDER_SIZE, PHOTO_SIZE)  # the output's largest side (the scan's own, when smaller)


def enroll(store: IdentityStore, video: str | os.PathLike, name: str, consent: Consent,
           display_name: str | None = None, preset: str = "quick", steps: int | None = None,
           max_frames: int | None = None, overwrite: bool = False, fresh: bool = False,
           bf16: bool | None = None, evaluate: bool = True, progress: bool = True,
           device: str = "cpu", resolution: int = PHOTO_SIZE,
           report: Callable[[str, int, int | None], None] | None = None, marker=None,
           max_pixels: int | None = None, style: str | None = None, derived_from: str | None = None) -> tuple:
    """Enroll `name` from a self-scan video. Returns (Identity, summary dict). `marker`
    (engines.watermark.Marker, of the enrollment's audit use) marks the rendered frames in
    its evaluation report. `max_pixels` bounds every frame's size (the server's upload limit).
    `resolution`: the output's largest side; the scan's face at its own size when smaller.
    `style` (engines/render/style.py): the scan is restyled first, so the generator learns
    the look (restyle, for identity `derived_from`)."""
    video = _check_request(store, video, name, display_name, consent, preset, steps, device, resolution,
                           overwrite)
    stage = store.work_dir(name)
    ckpt = stage / CHECKPOINT_FILE
    if fresh and stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    n_steps = steps if steps is not None else p.steps
    use_bf16 = bf16_supported() if bf16 is None else bf16
    t_start = time.monotonic()
    key = {**enrollment_key(video, max_frames, consent), "style": style}
    report = report or _silent
    data = extract(video, max_frames, progress, report, max_pixels)
    if style is not None:
        data = stylize_scan(data, style, report, progress)
    t_extract = time.monotonic() - t_start
    report("preparing", 0, None)
    # Its own mouth shapes, from the speech of the frames it trains on (none without a voice).
    visemes = learn_from_video(video, data.frame_index[:data.n_train], data.points[:data.n_train],
                               data.points[data.reference])
    builder = PairBuilder(data)
    log.info("enrolling %r: %d frames with a face (%d train, %d held out), reference frame %d, device %s, "
             "bf16=%s", name, len(data.crops), data.n_train, len(data.crops) - data.n_train,
             int(data.frame_index[data.reference]), device, use_bf16 and device == "cpu")
    info = train(builder, p, n_steps, ckpt, key, use_bf16, progress, device=device, report=report)
    evaluation = None
    if evaluate and data.n_train < len(data.crops):
        from .evaluate import evaluate_holdout
        from .runtime import TorchRuntime

        report("evaluating", 0, None)
        evaluation = evaluate_holdout(builder, TorchRuntime(info["model"]), progress=progress, marker=marker)
    report("writing", 0, None)
    origin = None if style is None else {"derived_from": derived_from, "style": style}
    identity = write_bundle(store, name, display_name or name, consent, builder, info["model"], info,
                            video, preset, evaluation, overwrite, largest=resolution, origin=origin,
                            visemes=visemes)
    summary = {k: v for k, v in info.items() if k != "model"}
    summary.update(visemes_learned=None if visemes is None else visemes["phones"],
                   extract_seconds=round(t_extract, 1), total_seconds=round(time.monotonic() - t_start, 1),
                   bf16=use_bf16, preset=preset, eval=evaluation["summary"] if evaluation else None,
                   int8=identity.manifest["neural"]["int8"])
    return identity, summary


def restyle(store: IdentityStore, name: str, style: str, new_name: str, display_name: str | None = None,
            overwrite: bool = False, **options) -> tuple:
    """A new neural identity: enrolled identity `name` in `style`, its generator trained again
    on its own self-scan restyled (the video its manifest names must still be there). Like a
    photo identity's style (IdentityStore.style) it inherits the consent record and names
    its origin, so revoking the origin revokes it. `options` go to enroll (preset, steps...)."""
    origin = store.style_origin(name, style, new_name)
    if origin.engine != "neural":
        raise IdentityError(f"identity {name!r} is a {origin.engine} identity: restyle it with IdentityStore.style")
    source = Path((origin.manifest.get("provenance") or {}).get("source_path", ""))
    if not source.is_file():
        raise IdentityError(f"identity {name!r}: its self-scan {str(source) or '(not recorded)'} is gone, and "
                            "its generator can only learn a style from it; enroll the scan again with the style")
    options.setdefault("max_frames", (origin.manifest.get("neural") or {}).get("frames_decoded"))  # its frames
    return enroll(store, source, new_name, origin.consent, display_name or f"{origin.display_name} ({style})",
                  overwrite=overwrite, style=style, derived_from=name, **options)


def stylize_scan(data, style: str, report: Callable[[str, int, int | None], None], progress: bool = False):
    """The scan in `style`: every crop (what the generator learns to draw), and the reference
    frame's scene, from which the large reference is cut again so the pasted-back head meets
    the same strokes at the seam (as a photo identity's style does)."""
    from dataclasses import replace

    from tqdm import tqdm

    from ..identity import restyle_scene
    from ..render.style import stylize

    crops = data.crops.copy()
    for i, crop in enumerate(tqdm(crops, desc=style, unit="frame", disable=not progress)):
        report("styling", i + 1, len(crops))
        crops[i] = stylize(crop, style, crop.shape[0])
    scene, large = data.scene, data.large
    if scene is not None:  # with its large reference: both are cut from the reference frame (data.crop_frames)
        picture, (left, top, right, bottom) = scene
        picture, large = restyle_scene(picture, left, top, right - left, style, large.shape[0])
        scene = (picture, scene[1])
    return replace(data, crops=crops, scene=scene, large=large)


def _silent(stage: str, done: int, total: int | None) -> None:
    pass


def _check_request(store: IdentityStore, video: str | os.PathLike, name: str, display_name: str | None,
                   consent: Consent, preset: str, steps: int | None, device: str, resolution: int,
                   overwrite: bool) -> Path:
    """IdentityError for anything that would fail later, before minutes of work; the video's path."""
    check_name(name)
    Consent.from_dict(consent.__dict__)
    check_labels(display_name or name, consent)
    if preset not in PRESETS:
        raise IdentityError(f"unknown preset {preset!r} (use {', '.join(PRESETS)})")
    check_device(device)
    if resolution not in RESOLUTIONS:
        raise IdentityError(f"--resolution {resolution}: use one of {', '.join(map(str, RESOLUTIONS))}")
    if steps is not None and steps < 1:
        raise IdentityError("--steps must be at least 1")
    video = Path(video)
    if not video.is_file():
        raise IdentityError(f"{video}: no such file")
    if store.exists(name) and not overwrite:  # a checkpoint never stands in for --overwrite (issue #15)
        raise IdentityError(f"identity {name!r} already exists (use --overwrite to replace it)")
    return video
