"""`avatar bench lipsync`: does the voice drive the mouth, measured on rendered frames.

- eSpeak NG sentences, made up afresh from a small grammar and a seed (never a fixed set to
  tune on): each is synthesized, the identity animated and rendered, and mediapipe measures
  the lip gap on the rendered frames. Against it, the openness of the phonemes eSpeak
  reports (their visemes' gap: visemes.openness) as a time series: Pearson's r, and the lag
  at which r peaks (positive: the mouth comes late).
- Lips on /p/ /b/ /m/: the share of those phonemes whose rendered lip gap, at the phoneme's
  centre, is near closed: within CLOSED_MARGIN of what mediapipe measures on the identity's
  own rendered closed mouth (a photo that shows its teeth keeps a thin line of them there,
  which reads as a gap of about 0.02).
- A real voice: a talking-head clip's own audio, recognized by pocketsphinx (phones) and
  heard (the sound's openness, envelope.py), drives the identity; the rendered lip gap against
  the clip's own (mediapipe on its frames). Beside it, on the same frames: the landmarks'
  gap with the phones alone, and the audio's loudness alone (the baseline).
- The voice path's CPU beyond the render: recognition plus animation, in CPU ms per second
  of audio (process time, so other work on a shared machine does not count).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..landmarks import FaceLandmarker
from ..measure import machine_info, percentiles
from ..render.mouth import lip_gap
from ..video import open_video, read_video
from .animate import VoiceAnimator
from .audio import load_audio, loudness
from .espeak import synthesize
from .learn import own_visemes
from .recognize import recognize_speech
from .visemes import VISEMES, openness, visemes_of

CLIP = Path(__file__).resolve().parents[3] / "shared" / "data" / "selfscan_a.mp4"
CLOSED_MARGIN = 0.01  # inter-ocular distances over the rendered closed mouth's gap: still closed
MAX_LAG, LAG_STEP = 0.2, 0.005  # seconds searched either way, and the grid
GOALS = {"espeak_r": 0.7, "lag_ms": 40, "pbm_closed": 0.8, "real_r": 0.5, "cpu_share": 0.4}


def add_arguments(parser) -> None:
    parser.add_argument("--identity", default="demo", help="identity to animate (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=20, help="eSpeak NG sentences (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence grammar (default: %(default)s)")
    parser.add_argument("--voice", default="en-us", help="eSpeak NG voice (default: %(default)s)")
    parser.add_argument("--clip", type=Path, default=CLIP,
                        help="a talking-head video whose own audio drives the avatar (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the voice path (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("bench-lipsync.json"),
                        help="where to write the results (default: %(default)s)")


# -- sentences --------------------------------------------------------------------------------

SUBJECTS = ["the old fisherman", "my neighbour Bob", "a tiny robot", "the museum guide", "Paul and his brother",
            "our new teacher", "the hungry puppy", "a woman from Boston", "the pilot", "Grandma Maisie",
            "the quiet boy", "two tired nurses", "the mayor of Phoenix", "a famous chef"]
VERBS = [("opened", "open"), ("painted", "paint"), ("borrowed", "borrow"), ("bought", "buy"), ("moved", "move"),
         ("found", "find"), ("threw", "throw"), ("washed", "wash"), ("measured", "measure"), ("carried", "carry"),
         ("brought", "bring"), ("polished", "polish"), ("fixed", "fix"), ("shared", "share"), ("hid", "hide")]
OBJECTS = ["a blue umbrella", "the wooden boat", "seven purple boxes", "a map of the mountains", "the broken window",
           "five ripe peaches", "her father's watch", "a bowl of warm soup", "the big red balloon",
           "some fresh bread", "a jar of honey", "the yellow bicycle", "an enormous pumpkin", "the shiny spoons"]
ENDINGS = ["before lunch", "near the bridge", "in the pouring rain", "with a smile", "at the beach",
           "for the whole family", "on Monday morning", "behind the school", "without a word", "under the moon",
           "as quickly as possible", "every other week", "by the old mill", "after the football game"]
ADJECTIVES = ["beautiful", "strange", "wonderful", "boring", "peaceful", "awful", "marvellous", "curious"]
NOUNS = ["evening", "puzzle", "garden", "movie", "voyage", "problem", "memory", "surprise"]


def make_sentences(n: int, seed: int) -> list[str]:
    """n English sentences from a small grammar: statements, questions, exclamations, prices."""
    rng = np.random.default_rng(seed)
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    templates = [
        lambda: f"{pick(SUBJECTS).capitalize()} {pick(VERBS)[0]} {pick(OBJECTS)} {pick(ENDINGS)}.",
        lambda: f"Why did {pick(SUBJECTS)} {pick(VERBS)[1]} {pick(OBJECTS)}?",
        lambda: f"Could you {pick(VERBS)[1]} {pick(OBJECTS)} {pick(ENDINGS)}, please?",
        lambda: f"What a {pick(ADJECTIVES)} {pick(NOUNS)}! {pick(SUBJECTS).capitalize()} {pick(VERBS)[0]} it.",
        lambda: f"It cost {rng.integers(2, 99)} dollars and {rng.integers(1, 99)} cents, "
                f"said {pick(SUBJECTS)}.",
        lambda: f"{pick(SUBJECTS).capitalize()} and {pick(SUBJECTS)} {pick(VERBS)[0]} {pick(OBJECTS)}, "
                f"then {pick(VERBS)[0]} {pick(OBJECTS)}.",
    ]
    return [templates[rng.integers(len(templates))]() for _ in range(n)]


# -- measures ---------------------------------------------------------------------------------

def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def openness_at(phones, times: np.ndarray, visemes=VISEMES) -> np.ndarray:
    """The openness of the phone heard at each time (0 outside them), in `visemes`."""
    starts = np.array([p.start for p in phones])
    values = np.array([openness(p.symbol, visemes) for p in phones])
    ends = np.array([p.end for p in phones])
    i = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, len(phones) - 1)
    return np.where((times >= starts[i]) & (times < ends[i]), values[i], 0.0)


def openness_per_frame(phones, frame_times: np.ndarray, fps: float, visemes=VISEMES) -> np.ndarray:
    """The phones' openness averaged over each frame's 1/fps of time (what a frame shows)."""
    offsets = (np.arange(33) / 32 - 0.5) / fps
    return openness_at(phones, frame_times[:, None] + offsets, visemes).mean(1)


def best_lag(ref_times, ref, times, measured) -> tuple[float, float]:
    """(lag in seconds, r there) at which `measured` best follows `ref`: measured(t + lag) ~ ref(t).
    Both are read on a 5 ms grid (linearly between samples); the peak refined by a parabola."""
    ref_times, times = np.asarray(ref_times, np.float64), np.asarray(times, np.float64)
    ok = np.isfinite(measured)
    grid = np.arange(ref_times[0] + MAX_LAG, ref_times[-1] - MAX_LAG, LAG_STEP)
    if len(grid) < 10 or ok.sum() < 10:
        return float("nan"), float("nan")
    reference = np.interp(grid, ref_times, ref)
    lags = np.arange(-MAX_LAG, MAX_LAG + LAG_STEP / 2, LAG_STEP)
    rs = np.array([pearson(reference, np.interp(grid + lag, times[ok], np.asarray(measured)[ok])) for lag in lags])
    k = int(np.nanargmax(rs))
    shift = 0.0
    if 0 < k < len(rs) - 1:
        a, b, c = rs[k - 1], rs[k], rs[k + 1]
        shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) < 0 else 0.0
    return float(lags[k] + shift * LAG_STEP), float(rs[k])


def rendered_gaps(targets, renderer, landmarker, timings: list | None = None) -> np.ndarray:
    """Lip gap measured by mediapipe on each rendered frame (NaN where it finds no face)."""
    out = np.full(len(targets), np.nan)
    for i, target in enumerate(targets):
        t = time.perf_counter()
        image = renderer.render(target)
        if timings is not None:
            timings.append((time.perf_counter() - t) * 1e3)
        points = landmarker(image)
        if points is not None:
            out[i] = lip_gap(points)
    return out


# -- the benchmark ----------------------------------------------------------------------------

def bench(identity, sentences: int = 20, seed: int = 0, voice: str = "en-us", clip: Path = CLIP,
          repeats: int = 3, progress: bool = True) -> dict:
    from ..pipeline import make_renderer  # the renderers take half a second to import: not for `avatar --help`

    if not Path(clip).is_file():
        raise ValueError(f"{clip}: no such file; give a talking-head video with its own audio (--clip)")
    renderer = make_renderer(identity)
    render_ms: list[float] = []
    report = {"identity": identity.name, "engine": identity.engine}
    with FaceLandmarker(static=True) as landmarker:  # each rendered frame measured afresh, not tracked
        report["espeak"] = _espeak_part(identity, renderer, landmarker, make_sentences(sentences, seed), voice,
                                        render_ms, progress)
        report["real_voice"] = _real_voice_part(identity, renderer, landmarker, clip, progress)
    report["cpu"] = _cpu_part(identity, clip, repeats)
    report["render_ms"] = percentiles(render_ms)
    report["goals"] = GOALS
    report["machine"] = machine_info(identity.engine)
    report["date"] = time.strftime("%Y-%m-%d")
    return report


def _espeak_part(identity, renderer, landmarker, sentences, voice, render_ms, progress) -> dict:
    rows, closures, all_open, all_gap, all_general = [], [], [], [], []
    # The mouth is measured against the openness of the shapes it is meant to make: the
    # identity's own (learned from its speech) where it has them. r_general_pooled is
    # against the general table, which an identity's own shapes depart from by design.
    shapes = own_visemes(identity)
    rig = VoiceAnimator(identity.neutral, visemes=shapes).rig
    rest = rendered_gaps(rig.pose(np.zeros((1, 3))).astype(np.float32), renderer, landmarker)[0]
    closed = rest + CLOSED_MARGIN
    synth_ms_per_s = []
    for k, text in enumerate(tqdm(sentences, desc="eSpeak sentences", unit="sentence", disable=not progress)):
        t = time.process_time()
        speech = synthesize(text, voice)
        synth_ms_per_s.append((time.process_time() - t) * 1e3 / speech.duration)
        animator = VoiceAnimator(identity.neutral, seed=k, visemes=shapes)
        targets = animator.frames(speech.phones, speech.duration)
        frame_times = animator.frame_times(speech.duration)
        gaps = rendered_gaps(targets, renderer, landmarker, render_ms)
        wanted = openness_per_frame(speech.phones, frame_times, animator.fps, shapes)
        all_general.append(openness_per_frame(speech.phones, frame_times, animator.fps))
        fine = np.arange(0, speech.duration, 0.001)
        lag, _ = best_lag(fine, openness_at(speech.phones, fine, shapes), frame_times, gaps)
        rows.append({"text": text, "seconds": round(speech.duration, 2), "r": round(pearson(wanted, gaps), 3),
                     "r_landmarks": round(pearson(wanted, [lip_gap(p) for p in targets]), 3),
                     "lag_ms": round(lag * 1e3, 1)})
        all_open.append(wanted), all_gap.append(gaps)
        for phone in speech.phones:
            if visemes_of(phone.symbol) == ("PP",):
                centre = (phone.start + phone.end) / 2
                closures.append(float(np.interp(centre, frame_times, np.nan_to_num(gaps, nan=1.0))))
    rs, lags = [row["r"] for row in rows], [row["lag_ms"] for row in rows]
    pooled = pearson(np.concatenate(all_open), np.concatenate(all_gap))
    general = pearson(np.concatenate(all_general), np.concatenate(all_gap))
    return {"sentences": rows, "r": percentiles(rs, (5, 50), 3), "r_pooled": round(pooled, 3),
            "r_general_pooled": round(general, 3), "own_shapes": "visemes" in identity.manifest,
            "lag_ms": percentiles(lags, (50,), 1), "abs_lag_ms": percentiles(np.abs(lags), (50, 95), 1),
            "pbm": {"count": len(closures), "closed_share": round(float(np.mean(np.array(closures) <= closed)), 3)
                    if closures else None, "gap": percentiles(closures, (50, 95), 4),
                    "rest_gap": round(float(rest), 4), "closed_below": round(float(closed), 4)},
            "synthesis_cpu_ms_per_s": percentiles(synth_ms_per_s, (50, 95), 2)}


def clip_lip_gaps(clip: Path, progress: bool = False) -> tuple[np.ndarray, float]:
    """A talking-head clip's own lip gap per frame (NaN where mediapipe finds no face, tracked
    from frame to frame), and its frame rate."""
    with open_video(clip) as container:
        fps = float(container.streams.video[0].average_rate or 30)
    with FaceLandmarker(static=False) as landmarker:
        gaps = [np.nan if p is None else lip_gap(p) for p in map(landmarker, tqdm(
            read_video(clip), desc="clip's own mouth", unit="frame", disable=not progress))]
    return np.array(gaps), fps


def _real_voice_part(identity, renderer, landmarker, clip: Path, progress) -> dict:
    speech = recognize_speech(load_audio(clip))
    animator = VoiceAnimator(identity.neutral, visemes=own_visemes(identity))
    targets = animator.frames(speech.phones, speech.duration, speech.openness)
    phones_only = animator.frames(speech.phones, speech.duration)  # as before the sound's openness was heard
    times = animator.frame_times(speech.duration)
    own, fps = clip_lip_gaps(clip, progress)
    own_times = np.arange(len(own)) / fps
    own_at = np.interp(times, own_times, own, left=np.nan, right=np.nan)
    avatar = rendered_gaps(tqdm(targets, desc="avatar", unit="frame", disable=not progress), renderer, landmarker)
    loud = loudness(speech.samples, speech.rate, times, 1 / animator.fps)
    lag, r_at_lag = best_lag(own_times[np.isfinite(own)], own[np.isfinite(own)], times, avatar)
    return {"clip": clip.name, "seconds": round(speech.duration, 2), "phones": len(speech.phones),
            "r": round(pearson(avatar, own_at), 3), "r_landmarks": round(pearson([lip_gap(p) for p in targets],
                                                                                 own_at), 3),
            "r_landmarks_phones_only": round(pearson([lip_gap(p) for p in phones_only], own_at), 3),
            "lag_ms": round(lag * 1e3, 1), "r_at_lag": round(r_at_lag, 3),
            "loudness_baseline_r": round(pearson(loud, own_at), 3)}


def _cpu_part(identity, clip: Path, repeats: int) -> dict:
    """CPU ms per second of audio: recognition (phones and the sound's openness), and animation
    (phones to landmarks), on the clip."""
    speech = load_audio(clip)
    recognize, animate = [], []
    for _ in range(max(1, repeats)):
        t = time.process_time()
        recognize_speech(speech)
        recognize.append((time.process_time() - t) * 1e3 / speech.duration)
        t = time.process_time()
        VoiceAnimator(identity.neutral, visemes=own_visemes(identity)).frames(speech.phones, speech.duration,
                                                                              speech.openness)
        animate.append((time.process_time() - t) * 1e3 / speech.duration)
    total = np.add(recognize, animate)
    return {"recognition_ms_per_s": percentiles(recognize, (50, 95), 2),
            "animation_ms_per_s": percentiles(animate, (50, 95), 2),
            "total_ms_per_s": percentiles(total, (50, 95), 2),
            "core_share": round(float(np.median(total)) / 1000, 4)}


def format_table(r: dict) -> str:
    e, v, c, goal = r["espeak"], r["real_voice"], r["cpu"], r["goals"]
    ok = lambda good: "yes" if good else "NO"  # noqa: E731
    rows = [
        ("eSpeak sentences: r, rendered lip gap vs phoneme openness in its shapes (median; p5)",
         f"{e['r']['p50']:.3f}; {e['r']['p5']:.3f} (pooled {e['r_pooled']:.3f}"
         + (f"; general shapes {e['r_general_pooled']:.3f})" if e.get("own_shapes") else ")"), f">= {goal['espeak_r']}",
         ok(e["r"]["p50"] >= goal["espeak_r"])),
        ("eSpeak sentences: lag, ms (median; |lag| p95)", f"{e['lag_ms']['p50']:+.0f}; {e['abs_lag_ms']['p95']:.0f}",
         f"within +-{goal['lag_ms']}", ok(abs(e["lag_ms"]["p50"]) <= goal["lag_ms"])),
        (f"/p b m/ closed at their centre (gap <= {e['pbm']['closed_below']:.3f}; n={e['pbm']['count']})",
         f"{e['pbm']['closed_share']:.1%}", f">= {goal['pbm_closed']:.0%}",
         ok((e["pbm"]["closed_share"] or 0) >= goal["pbm_closed"])),
        (f"real voice ({v['clip']}, {v['seconds']:.0f} s): r, avatar vs clip's own lip gap",
         f"{v['r']:.3f} (best lag {v['lag_ms']:+.0f} ms: {v['r_at_lag']:.3f})", f">= {goal['real_r']}",
         ok(v["r"] >= goal["real_r"])),
        ("  the avatar's landmarks: with the sound's openness; phones alone",
         f"{v['r_landmarks']:.3f}; {v['r_landmarks_phones_only']:.3f}", "", ""),
        ("  baseline: the audio's loudness alone", f"{v['loudness_baseline_r']:.3f}", "~0.25", ""),
        ("voice path CPU: recognition + animation, ms per s of audio (median)",
         f"{c['recognition_ms_per_s']['p50']:.1f} + {c['animation_ms_per_s']['p50']:.1f} = "
         f"{c['total_ms_per_s']['p50']:.1f} ({c['core_share']:.1%} of a core)", f"<= {goal['cpu_share']:.0%} of a core",
         ok(c["core_share"] <= goal["cpu_share"])),
        ("eSpeak NG synthesis, CPU ms per s of audio (median; p95)",
         f"{e['synthesis_cpu_ms_per_s']['p50']:.1f}; {e['synthesis_cpu_ms_per_s']['p95']:.1f}", "", ""),
        ("render, ms per frame (median; p95)", f"{r['render_ms']['p50']:.1f}; {r['render_ms']['p95']:.1f}", "", ""),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'measure':<{width}}  {'value':<52}{'goal':<18}met"]
    lines += [f"{a:<{width}}  {b:<52}{g:<18}{m}" for a, b, g, m in rows]
    m = r["machine"]
    lines.append(f"identity {r['identity']} ({r['engine']}); {m['cpu']}, {m['cores']} cores; {r['date']}")
    return "\n".join(lines)
