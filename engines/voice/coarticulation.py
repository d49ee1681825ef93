"""Timed phones to a smooth mouth: the lip gap, spread and rounding at any time.

Cohen and Massaro's dominance model: each viseme pulls the mouth towards its shape with a
strength that is full over its own sound and dies away exponentially outside it; the mouth
is the strength-weighted mean of all pulls. Between two equally dominant visemes the mouth
moves from one to the next over TRANSITION; a dominant one (p, b, m closing the lips) wins
over its neighbours and gets its shape even when short; weak ones (t, n, k) take theirs
from the vowels around them, as real lips do.

Lookahead: the mouth starts moving to a sound about TRANSITION / 2 + LEAD (30 to 40 ms, more
for a dominant one) before it is heard, and is more than half way there as it starts; the
curve is read LEAD early for that. The lips close for p, b and m at least MIN_CLOSURE before
the burst (eSpeak counts the silent closure into the phone before), and part only as the
sound's own time ends: a stop's release is what is heard, so it is never moved early.

A longer lead or slower transitions look smoother but follow the phones less: on eight
hand-written sentences, the correlation of the landmarks' lip gap with the phones' openness
(as `avatar bench lipsync` measures it) was 0.87 with no lead, 0.82 with 10 ms, 0.73 with
20 ms and 0.62 with 30 ms (60 ms transitions: 0.84, 0.79, 0.72, 0.62).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .speech import Phone
from .visemes import VISEMES, Viseme, visemes_of

TRANSITION = 0.045  # seconds from 10% to 90% of a move between two equally dominant visemes
DECAY = TRANSITION / (2 * np.log(9))  # the strength's e-folding time outside its sound
LEAD = 0.01  # seconds the mouth runs ahead of the sound
MIN_CLOSURE = 0.07  # seconds: lips stay together at least this long for p, b, m (eSpeak times the release)
REACH = 0.5  # seconds: a segment further than this from a time has no say there
HEARD = 0.5  # share of a sound's gap taken from the sound's own openness (envelope.py), when given
CLOSING = ("sil", "PP", "FF")  # lips that meet keep their gap whatever the sound's level
BLOCK = 512  # times evaluated at once (bounds the times x segments arrays)


def segments(phones: list[Phone], lead: float = LEAD) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(starts, ends, viseme names) covering all time: a diphthong's duration split between its
    two visemes, silence before, between and after the phones. A closure (p, b, m) is lengthened
    to MIN_CLOSURE before its end, and its end is moved `lead` later, the next sound starting
    then: the curve is read `lead` early, and a release must not come before it is heard."""
    starts, ends, names = [-REACH * 2], [phones[0].start if phones else 0.0], ["sil"]
    released = -np.inf  # the last closure's end
    for phone in phones:
        if phone.start > ends[-1] + 1e-3:
            starts.append(ends[-1]), ends.append(phone.start), names.append("sil")
        parts = visemes_of(phone.symbol)
        edges = np.linspace(phone.start, phone.end, len(parts) + 1)
        for name, a, b in zip(parts, edges[:-1], edges[1:]):
            if name == "PP":
                a, b = min(a, b - MIN_CLOSURE), b + lead
                released = b
            else:
                a = max(a, released)
                b = max(a, b)
            starts.append(a), ends.append(b), names.append(name)
    starts.append(max(ends)), ends.append(max(ends) + 1e4), names.append("sil")  # silence ever after
    return np.array(starts), np.array(ends), names


def mouth_track(phones: list[Phone], times: np.ndarray, lead: float = LEAD,
                visemes: dict[str, Viseme] = VISEMES,
                openness: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(len(times), 3): gap, spread, round (as in visemes.Viseme) at each time, in seconds.
    `visemes`: the shapes (an identity's own: learn.own_visemes). `openness`: for recognized
    speech, the sound's own openness at given times (envelope.SoundOpenness; NaN where none
    was heard): every sound but the CLOSING ones then takes HEARD of its gap from it, scaled to
    the open "aa"."""
    starts, ends, names = segments(phones, lead)
    table = np.array([visemes[n] for n in names])  # (S, 5)
    heard = np.array([n not in CLOSING for n in names]) * HEARD
    centres, halves = (starts + ends) / 2, (ends - starts) / 2
    read = np.asarray(times, np.float64) + lead
    out = np.empty((len(read), 3))
    for b in range(0, len(read), BLOCK):
        t = read[b:b + BLOCK]
        near = (ends > t.min() - REACH) & (starts < t.max() + REACH)
        distance = np.maximum(np.abs(t[:, None] - centres[near]) - halves[near], 0.0)
        falloff = np.exp(-distance / DECAY)  # (T, S)
        rows = table[near]
        gap_w = falloff * rows[:, 3]
        shape_w = falloff * rows[:, 4]
        gaps = np.broadcast_to(rows[None, :, 0], gap_w.shape)
        if openness is not None:
            heard_here = np.asarray(openness(t), np.float64)[:, None]
            share = heard[near][None, :] * np.isfinite(heard_here)
            gaps = gaps * (1 - share) + share * visemes["aa"].gap * np.nan_to_num(heard_here)
        out[b:b + BLOCK, 0] = (gap_w * gaps).sum(1) / gap_w.sum(1)
        out[b:b + BLOCK, 1:] = shape_w @ rows[:, 1:3] / shape_w.sum(1)[:, None]
    return out
