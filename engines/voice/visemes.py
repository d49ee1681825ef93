"""Phonemes to visemes, and what each viseme does to the mouth.

Fifteen visemes, as in the Oculus/Meta lip-sync set (sil, PP, FF, TH, DD, kk, CH, SS, nn, RR,
aa, E, ih, oh, ou). Each has a mouth shape, in the face's own unit (inter-ocular distances,
so a small face and a large one say "a" alike): the gap between the inner lips at their
middle, how far each mouth corner moves out (spread) or in, and rounding (0 to 1: narrowed
and pushed forward). And how strongly it holds that shape against its neighbours (Cohen and
Massaro's dominance; engines/voice/coarticulation.py): lips must meet for p, b and m however
open the vowels around them are, and the lower lip must touch the teeth for f and v. Consonants
raise the jaw (the tongue must reach the teeth or the palate: the syllable's open-close
rhythm is most of what a mouth shows), but t, d, k, n and s leave the lips' shape, spread or
rounded, to the vowels beside them.
Gaps are those of a relaxed talker: about 0.25 inter-ocular distances for a wide "a".
"""
from __future__ import annotations

import unicodedata
from typing import NamedTuple


class Viseme(NamedTuple):
    gap: float  # inner lip gap at the middle, inter-ocular distances
    spread: float  # each corner outwards (negative: inwards), inter-ocular distances
    round: float  # 0..1: lips narrowed and pushed forward
    hold_gap: float  # dominance of the gap over the neighbours'
    hold_shape: float  # dominance of spread and rounding


VISEMES = {
    "sil": Viseme(0.0, 0.0, 0.0, 1.5, 0.4),  # a pause: lips together, relaxed
    "PP": Viseme(0.0, 0.0, 0.0, 12.0, 0.4),  # p b m: lips pressed together
    "FF": Viseme(0.02, 0.01, 0.0, 6.0, 0.5),  # f v: lower lip under the upper teeth
    "TH": Viseme(0.05, 0.01, 0.0, 2.0, 0.3),  # th: tongue between the teeth
    "DD": Viseme(0.05, 0.0, 0.0, 2.0, 0.2),  # t d: jaw up for the tongue to reach the ridge
    "kk": Viseme(0.08, 0.0, 0.0, 1.2, 0.2),  # k g ng h
    "CH": Viseme(0.04, -0.02, 0.6, 2.5, 2.0),  # ch j sh zh: lips pushed forward
    "SS": Viseme(0.03, 0.02, 0.0, 3.0, 0.5),  # s z: teeth nearly together
    "nn": Viseme(0.05, 0.0, 0.0, 1.5, 0.2),  # n l
    "RR": Viseme(0.06, -0.01, 0.4, 1.2, 1.0),  # r
    "aa": Viseme(0.24, 0.0, 0.0, 1.0, 1.0),  # a
    "E": Viseme(0.15, 0.03, 0.0, 1.0, 1.0),  # e, and the schwa
    "ih": Viseme(0.09, 0.04, 0.0, 1.0, 1.0),  # i
    "oh": Viseme(0.16, -0.02, 0.6, 1.0, 1.5),  # o
    "ou": Viseme(0.06, -0.03, 1.0, 1.0, 2.0),  # u w
}
NAMES = tuple(VISEMES)
UNKNOWN = "nn"  # a sound the tables do not know: a mid, easily overruled shape

# IPA as eSpeak NG reports it. Whole symbols first (affricates, r-coloured vowels), then one
# character at a time: a diphthong ("aɪ") becomes two visemes, one after the other.
IPA_SYMBOLS = {"tʃ": "CH", "dʒ": "CH", "ts": "SS", "dz": "SS", "ɚ": "RR", "ɝ": "RR"}
IPA_CHARS = {
    **dict.fromkeys("pbmɓ", "PP"), **dict.fromkeys("fvɱʋ", "FF"), **dict.fromkeys("θð", "TH"),
    **dict.fromkeys("tdɾʈɖ", "DD"), **dict.fromkeys("kgɡŋxɣqhɦçʝχʔ", "kk"),
    **dict.fromkeys("ʃʒʂʐɕʑ", "CH"), **dict.fromkeys("sz", "SS"), **dict.fromkeys("nlɫɲɭʎɳ", "nn"),
    **dict.fromkeys("ɹrɻʁʀ", "RR"), **dict.fromkeys("aɑæʌä", "aa"), **dict.fromkeys("eɛəɜɐ", "E"),
    **dict.fromkeys("iɪɨᵻjʏ", "ih"), **dict.fromkeys("oɔɒøœɵ", "oh"), **dict.fromkeys("uʊɯywɥʉ", "ou"),
}
# ARPAbet as pocketsphinx's en-us phone models name them (stress digits dropped).
ARPABET = {
    **dict.fromkeys(("P", "B", "M"), "PP"), **dict.fromkeys(("F", "V"), "FF"), **dict.fromkeys(("TH", "DH"), "TH"),
    **dict.fromkeys(("T", "D"), "DD"), **dict.fromkeys(("K", "G", "NG", "HH"), "kk"),
    **dict.fromkeys(("CH", "JH", "SH", "ZH"), "CH"), **dict.fromkeys(("S", "Z"), "SS"),
    **dict.fromkeys(("N", "L"), "nn"), **dict.fromkeys(("R", "ER"), "RR"), **dict.fromkeys(("AA", "AE", "AH"), "aa"),
    "EH": "E", **dict.fromkeys(("IH", "IY", "Y"), "ih"), "AO": "oh", **dict.fromkeys(("UH", "UW", "W"), "ou"),
    "AW": ("aa", "ou"), "AY": ("aa", "ih"), "EY": ("E", "ih"), "OW": ("oh", "ou"), "OY": ("oh", "ih"),
    "SIL": "sil",
}


def visemes_of(symbol: str) -> tuple[str, ...]:
    """The viseme(s) one phone shows, in order: one, or two for a diphthong. A pause (""), a
    silence or a noise marker shows "sil"."""
    if not symbol or symbol.startswith(("+", "_")):
        return ("sil",)
    if symbol.isascii() and symbol.rstrip("012").isupper():
        found = ARPABET.get(symbol.rstrip("012"), UNKNOWN)
        return found if isinstance(found, tuple) else (found,)
    clean = "".join(c for c in unicodedata.normalize("NFD", symbol)
                    if c.isalpha() and not unicodedata.combining(c) and c not in "ːˑˈˌ")
    if clean in IPA_SYMBOLS:
        return (IPA_SYMBOLS[clean],)
    found = [IPA_CHARS[c] for c in clean if c in IPA_CHARS]
    found = [v for i, v in enumerate(found) if i == 0 or v != found[i - 1]][:2]
    return tuple(found) or (UNKNOWN,)


def openness(symbol: str, visemes: dict[str, Viseme] = VISEMES) -> float:
    """How open one phone holds the mouth: its visemes' mean lip gap (what `avatar bench
    lipsync` correlates the rendered mouth with), in `visemes` (an identity's own shapes)."""
    names = visemes_of(symbol)
    return sum(visemes[n].gap for n in names) / len(names)
