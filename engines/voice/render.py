"""Speech to a talking video file: the identity animated by the speech's phones, every frame
marked (and badged) as reenact.py marks them, the speech as the file's audio track (AAC).
Pure compute on files: `avatar say` and `avatar render --audio` call it."""
from __future__ import annotations

import os
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from ..identity import Identity
from ..measure import timing_summary
from ..pipeline import make_renderer
from ..provenance.watermark import Marker
from ..reenact import RenderError, RenderSummary
from .animate import VoiceAnimator
from .audio import resample
from .learn import own_visemes
from .speech import Speech

AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OUTPUTS = (".mp4", ".mov", ".mkv")


def render_speech(speech: Speech, identity: Identity, output: str | os.PathLike, *, marker: Marker,
                  label: bool = False, progress: bool = True, seed: int = 0,
                  extra_stages: dict | None = None) -> RenderSummary:
    """Write `identity` saying `speech` to `output` (.mp4, .mov or .mkv). `extra_stages` (name ->
    ms, e.g. the synthesis or recognition that made the phones) join the summary's timings."""
    output = Path(output)
    if output.suffix.lower() not in OUTPUTS:
        raise RenderError(f"{output}: output must end in .mp4, .mov or .mkv")
    partial = output.with_name(f".{output.name}.partial{output.suffix}")
    try:
        summary = _render(speech, identity, partial, marker, label, progress, seed)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output)  # never leave a half-written file under the requested name
    summary.output = str(output)
    for name, ms in (extra_stages or {}).items():
        summary.stages = {f"{name}_ms": timing_summary([ms], count_key="count", digits=3), **summary.stages}
    return summary


def _render(speech: Speech, identity: Identity, output: Path, marker, label, progress, seed) -> RenderSummary:
    t0 = _now()
    animator = VoiceAnimator(identity.neutral, seed, visemes=own_visemes(identity))
    targets = animator.frames(speech.phones, speech.duration, speech.openness)
    times = {"animate_ms": [_now() - t0], "render_ms": [], "mark_ms": [], "encode_ms": []}
    rate = speech.rate if speech.rate in AAC_RATES else 48000
    samples = resample(speech.samples, speech.rate, rate)
    renderer = make_renderer(identity)
    fps = Fraction(animator.fps)
    size = identity.reference.shape[0]
    with av.open(str(output), "w") as sink:
        video = sink.add_stream("libx264", rate=fps)
        video.pix_fmt, video.width, video.height = "yuv420p", size, size
        video.options = {"crf": "17", "preset": "veryfast"}  # as reenact.py: the watermark keeps every segment
        audio = sink.add_stream("aac", rate=rate, layout="mono")
        sent = 0
        for i, target in enumerate(tqdm(targets, unit="frame", desc="render", disable=not progress)):
            t = _now()
            image = renderer.render(target)
            times["render_ms"].append(_now() - t)
            t = _now()
            image = marker(image, badge=label)
            times["mark_ms"].append(_now() - t)
            t = _now()
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / fps
            sink.mux(video.encode(frame))
            upto = len(samples) if i == len(targets) - 1 else min(len(samples), round((i + 1) / fps * rate))
            sink.mux(_encode_audio(audio, samples[sent:upto], sent, rate))
            sent = upto
            times["encode_ms"].append(_now() - t)
        sink.mux(video.encode(None))
        sink.mux(audio.encode(None))
    stages = {k: timing_summary(v, count_key="count", digits=3) for k, v in times.items()}
    return RenderSummary(len(targets), len(targets), float(fps), str(output), stages)


def _encode_audio(stream, samples: np.ndarray, first: int, rate: int) -> list:
    if not len(samples):
        return []
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None]), format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = rate, first, Fraction(1, rate)
    return stream.encode(frame)


def _now() -> float:
    return time.perf_counter() * 1e3


def format_summary(summary: RenderSummary, seconds: float) -> str:
    """What a speech render did: frames, seconds of speech, output, and per-stage timings."""
    lines = [f"{summary.frames} frames at {summary.fps:.0f} fps, {seconds:.1f} s of speech -> {summary.output}",
             f"{'stage':<14}{'median ms':>10}{'p95 ms':>10}{'count':>7}"]
    for name, s in summary.stages.items():
        if s["count"]:
            lines.append(f"{name[:-3]:<14}{s['median_ms']:>10.2f}{s['p95_ms']:>10.2f}{s['count']:>7}")
    return "\n".join(lines)
