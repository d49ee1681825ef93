"""An enrolled identity's own mouth shapes, learned from the speech in its self-scan (issue #36).

The scan's audio is recognized (recognize.py: timed phones), and at the centre of each vowel
(and r) the scan's own landmarks say how this person's mouth holds it: the inner lips' gap
and how far the corners moved, against the identity's neutral face, in inter-ocular
distances as visemes.Viseme has them. Per vowel the median of those moments is kept, drawn
towards the general shape while there are few of them (SHRINK), so a vowel heard twice, or
misheard, cannot make a strange mouth.

What is not learned, and why (measured on selfscan_a, the one shared scan with speech):
* consonants: at a phone's centre, recognition's timing (tens of milliseconds off) and the
  neighbouring vowels (coarticulation) show more of the vowels than of the consonant; their
  medians came out as open as the vowels (t d n k 0.09-0.18 against "a" 0.15), and the
  eSpeak sentences' r fell to 0.67;
* how wide a person opens overall (one gain on every gap, fitted by least squares: 2.3 here):
  the avatar's mean gap came nearer the person's, but p, b and m closed in 63% of cases
  instead of 78%, and the real voice's r fell from 0.28 to 0.24;
* closures (silence, p b m): the lips meet whoever speaks.
With the vowels learned, selfscan_a's own voice drives its avatar at r 0.34 (0.28 with the
general shapes; learned from the first 80% of that same clip, so not held out). Held out,
with the sound's openness heard too (envelope.py): each fifth of the clip spoken with vowels
learned from the other four, rendered r 0.415 against 0.393 with the general shapes. eSpeak
sentences follow the identity's shapes at r 0.83, and p, b and m close in 83% of cases
(`avatar bench lipsync`).

Only the training frames are read (the held-out fifth stays unseen), and a frame's time is
its index over the video's mean frame rate (recordings from browsers are close to constant).
"""
from __future__ import annotations

import logging

import numpy as np

from ..landmarks import inter_ocular
from ..render.mesh import MOUTH_LOWER, MOUTH_UPPER
from .rig import ROUND_NARROW
from .speech import Phone, SpeechError
from .visemes import VISEMES, Viseme, visemes_of

log = logging.getLogger(__name__)

VOWELS = ("aa", "E", "ih", "oh", "ou", "RR")  # held long enough to be seen at their centre
MIN_PHONES = 40  # a scan with fewer recognized phones teaches nothing (silent, or music)
SHRINK = 8.0  # moments at which a vowel's own median and the general shape weigh the same
MAX_GAP, MAX_SPREAD = 0.45, 0.12  # inter-ocular distances: a learned shape stays a mouth's
CORNERS = (61, 291)


def mouth_measures(points: np.ndarray, neutral: np.ndarray) -> tuple[float, float]:
    """(gap, corner move) of `points`, as the rig poses them (rig.FaceRig): the inner lips'
    gap at their middle (0: closed), and each corner's move outwards from `neutral`, in
    inter-ocular distances."""
    middle = MOUTH_UPPER[5], MOUTH_LOWER[5]
    unit = max(inter_ocular(points), 1e-6)  # the head nearer or further than in the neutral
    width = np.linalg.norm(points[CORNERS[1], :2] - points[CORNERS[0], :2]) / unit
    rest = np.linalg.norm(neutral[CORNERS[1], :2] - neutral[CORNERS[0], :2]) / max(inter_ocular(neutral), 1e-6)
    return float(np.linalg.norm(points[middle[1], :2] - points[middle[0], :2]) / unit), float(width - rest) / 2


def learn_visemes(phones: list[Phone], frame_times: np.ndarray, frame_points: np.ndarray,
                  neutral: np.ndarray) -> dict | None:
    """The identity's vowel shapes ({"shapes": {viseme: [gap, spread, round]}, "moments":
    {viseme: n}, "phones": n}) from `phones` heard while frames at `frame_times` (seconds)
    showed `frame_points`; None when too few phones were heard to learn from."""
    if len(phones) < MIN_PHONES or len(frame_times) < 2:
        return None
    moments: dict[str, list[tuple[float, float]]] = {n: [] for n in VOWELS}
    for phone in phones:
        parts = visemes_of(phone.symbol)
        edges = np.linspace(phone.start, phone.end, len(parts) + 1)
        for name, a, b in zip(parts, edges[:-1], edges[1:]):
            k = int(np.argmin(np.abs(frame_times - (a + b) / 2)))
            if name in moments and abs(frame_times[k] - (a + b) / 2) <= (b - a) / 2 + 0.02:
                moments[name].append(mouth_measures(frame_points[k], neutral))
    return {"phones": len(phones), "shapes": {n: _shape(VISEMES[n], m) for n, m in moments.items()},
            "moments": {n: len(m) for n, m in moments.items()}}


def _shape(general: Viseme, seen: list[tuple[float, float]]) -> list[float]:
    """[gap, spread, round]: the general shape moved towards the median of what was `seen`, the
    more the more there is of it. Spread is what the rig adds to rounding's narrowing, so it is
    the corners' move plus that."""
    gap, spread = general.gap, general.spread
    if seen:
        own_gap, corner = np.median(np.array(seen), axis=0)
        w = len(seen) / (len(seen) + SHRINK)
        gap += w * (own_gap - gap)
        spread += w * (corner + general.round * ROUND_NARROW - spread)
    return [round(float(np.clip(gap, 0.0, MAX_GAP)), 4), round(float(np.clip(spread, -MAX_SPREAD, MAX_SPREAD)), 4),
            general.round]


def learn_from_video(video, frame_index: np.ndarray, points: np.ndarray, neutral: np.ndarray) -> dict | None:
    """learn_visemes on a self-scan: its audio recognized, `points` the landmarks of its frames
    `frame_index`. None (and why, in the log) when it has no usable speech."""
    from ..video import open_video
    from .audio import load_audio
    from .recognize import RATE, recognize_phones

    try:  # no sound, or no recognizer installed: the general shapes, not a failed enrollment
        phones = recognize_phones(load_audio(video, rate=RATE))  # decoded at the recognizer's rate
    except SpeechError as e:
        log.info("no mouth shapes learned from the scan's voice: %s", e)
        return None
    with open_video(video) as container:
        fps = float(container.streams.video[0].average_rate or 30)
    learned = learn_visemes(phones, np.asarray(frame_index) / fps, points, neutral)
    if learned is None:
        log.info("no mouth shapes learned from the scan's voice: too little speech heard")
    else:
        learned["learned_from"] = "the self-scan's speech"
    return learned


def own_visemes(identity) -> dict[str, Viseme]:
    """The viseme table for `identity`: the general one, with the shapes its enrollment learned
    from its own speech (manifest "visemes") where it did."""
    learned = (identity.manifest.get("visemes") or {}).get("shapes") or {}
    return {n: v._replace(gap=learned[n][0], spread=learned[n][1], round=learned[n][2]) if n in learned else v
            for n, v in VISEMES.items()}
