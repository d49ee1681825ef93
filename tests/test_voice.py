"""The voice drives the face (engines/voice/, `avatar say`, `avatar render --audio`): phonemes
with their times from eSpeak NG and from pocketsphinx, lips that close on p, b, m and in
silence, a head that never freezes, and marked, audited videos with their audio."""
from __future__ import annotations

import ctypes.util

import av
import numpy as np
import pytest

from engines.landmarks import RIGID, eye_openness
from engines.render.mouth import lip_gap
from engines.voice.speech import Phone, SpeechError
from engines.voice.visemes import visemes_of
from helpers import shared_clip

SENTENCE = "Maybe Bob met my mom by the pub. Pam, please pass the bottle of apple milk!"


@pytest.fixture(scope="module")
def espeak():
    """The synthesizer, or a skip saying what to install."""
    if ctypes.util.find_library("espeak-ng") is None:
        pytest.skip("eSpeak NG is not installed (apt-get install -y espeak-ng libespeak-ng1)")
    from engines.voice.espeak import synthesize
    return synthesize


@pytest.fixture(scope="module")
def pocketsphinx():
    return pytest.importorskip("pocketsphinx", reason="pocketsphinx is not installed (pip install pocketsphinx==5.1.1)")


@pytest.fixture(scope="module")
def spoken(espeak):
    return espeak(SENTENCE)


@pytest.fixture(scope="module")
def animator(demo):
    from engines.voice.animate import VoiceAnimator
    return VoiceAnimator(demo.neutral)


def test_espeak_reports_phonemes_in_order_inside_the_audio(spoken):
    assert spoken.rate == 22050 and spoken.duration > 2.0
    starts = [p.start for p in spoken.phones]
    assert len(starts) > 30
    assert all(0.0 <= t <= spoken.duration for t in starts)
    assert all(a <= b for a, b in zip(starts, starts[1:]))
    sounds = [p.start for p in spoken.phones if p.symbol]  # pauses may share a time with what follows
    assert all(a < b for a, b in zip(sounds, sounds[1:]))
    assert {"p", "b", "m"} <= {p.symbol for p in spoken.phones}
    # the reported times are where the sound is: the audio is loud inside the vowels
    vowels = [p for p in spoken.phones if visemes_of(p.symbol)[0] in ("aa", "E", "oh")]
    loud = [np.abs(spoken.samples[int(p.start * spoken.rate):int(p.end * spoken.rate)]).max() for p in vowels]
    assert np.median(loud) > 0.1


def test_pbm_close_the_lips_and_vowels_open_them(spoken, animator):
    frames = animator.frames(spoken.phones, spoken.duration)
    times = animator.frame_times(spoken.duration)
    gaps = np.array([lip_gap(f) for f in frames])
    closures = [(p.start + p.end) / 2 for p in spoken.phones if visemes_of(p.symbol) == ("PP",)]
    assert len(closures) >= 10
    at_centre = np.interp(closures, times, gaps)
    assert np.mean(at_centre < 0.01) >= 0.9, at_centre
    assert gaps.max() > 0.12  # and the vowels open the mouth


def test_silence_closes_the_lips_while_the_head_moves_and_blinks(animator):
    frames = animator.frames([], 6.0)
    assert frames.shape == (180, 478, 3)
    assert max(lip_gap(f) for f in frames) < 0.005
    head = frames[:, RIGID, :2].mean(1)
    assert np.ptp(head, axis=0).max() > 1.0  # pixels: the head drifts
    assert np.abs(np.diff(frames[:, RIGID], axis=0)).max(axis=(1, 2)).min() > 0  # never a frozen frame
    eyes = np.array([eye_openness(f) for f in frames])
    shut = eyes < 0.3 * eyes.max()
    blinks = np.count_nonzero(shut[1:] & ~shut[:-1]) + shut[0]
    assert 1 <= blinks <= 3  # one every 2 to 6 s


def test_recognized_phones_have_times_inside_the_audio(spoken, pocketsphinx):
    from engines.voice.recognize import recognize_phones

    phones = recognize_phones(spoken)  # 22050 Hz in, resampled to 16 kHz
    assert len(phones) > 20
    assert all(0.0 <= p.start < p.end <= spoken.duration + 0.05 for p in phones)
    assert all(a.start <= b.start for a, b in zip(phones, phones[1:]))
    assert any(visemes_of(p.symbol) == ("PP",) for p in phones)


def test_the_audio_of_a_real_clip_is_read_and_recognized(pocketsphinx):
    from engines.voice.audio import load_audio
    from engines.voice.recognize import recognize_phones

    speech = load_audio(shared_clip("selfscan_a.mp4"))  # the audio stream of a video
    assert speech.rate == 48000 and 30 < speech.duration < 40
    speech.samples = speech.samples[:5 * speech.rate]
    phones = recognize_phones(speech)
    assert sum(p.symbol not in ("SIL", "") and not p.symbol.startswith("+") for p in phones) > 10


def test_unreadable_audio_is_a_clear_error(tmp_path):
    from engines.voice.audio import load_audio

    text = tmp_path / "speech.wav"
    text.write_text("not audio at all\n")
    with pytest.raises(SpeechError, match="not a readable audio file"):
        load_audio(text)
    with pytest.raises(SpeechError, match="no such file"):
        load_audio(tmp_path / "missing.wav")


def test_phones_without_sound_are_silence():
    from engines.voice.coarticulation import mouth_track

    track = mouth_track([Phone(0.2, 0.4, ""), Phone(0.4, 0.6, "+SPN+"), Phone(0.6, 0.8, "SIL")], np.arange(0, 1, 0.1))
    assert np.abs(track).max() < 1e-9



# ---- the sound's own openness (engines/voice/envelope.py) -------------------------------------
def band_noise(seconds: float, rng, rate: int = 16000) -> np.ndarray:
    """White noise through 1-3 kHz: what a voice puts in the band the envelope listens to."""
    from scipy.signal import butter, sosfilt

    noise = rng.standard_normal(int(seconds * rate))
    return sosfilt(butter(4, (1000, 3000), btype="band", fs=rate, output="sos"), noise) * 0.1


def test_syllables_open_the_mouth_and_a_held_sound_or_low_music_does_not():
    from engines.voice.envelope import sound_openness

    rng, rate = np.random.default_rng(0), 16000
    t = np.arange(4 * rate) / rate
    syllables = band_noise(4, rng) * (0.02 + np.clip(np.sin(2 * np.pi * 4 * t), 0, None))  # 4 a second
    opened = sound_openness(syllables, rate)
    peaks, dips = np.arange(1.0, 4, 0.25) + 1 / 16, np.arange(1.0, 4, 0.25) + 3 / 16
    assert opened(peaks).min() > 0.6 and opened(dips).max() < 0.25
    held = sound_openness(band_noise(4, rng), rate)  # loud, but never dipping: a tone, music, a hum
    assert held(np.arange(1.0, 3.9, 0.1)).max() < 0.15
    low = 0.5 * np.sin(2 * np.pi * 200 * t) * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)  # music below the band
    assert sound_openness(low.astype(np.float32), rate)(np.arange(1.0, 3.9, 0.05)).max() < 0.15
    assert sound_openness(np.zeros(rate, np.float32), rate)(np.arange(0.1, 0.9, 0.1)).max() == 0.0


def test_the_openness_heard_live_is_the_whole_recordings_and_a_gap_is_not_heard():
    from engines.voice.envelope import SoundOpenness, sound_openness

    rng, rate = np.random.default_rng(1), 16000
    t = np.arange(3 * rate) / rate
    speech = band_noise(3, rng) * (0.05 + np.abs(np.sin(2 * np.pi * 3 * t)))
    whole = sound_openness(speech, rate)
    live = SoundOpenness()
    pcm = np.round(speech * 32767).astype(np.int16)
    for start in range(0, len(pcm), 320):  # 20 ms at a time, as a session feeds it
        live.feed(pcm[start:start + 320], start / rate)
    times = np.arange(0.05, 2.9, 0.01)
    np.testing.assert_allclose(live(times), whole(times), atol=0.01)
    assert np.isnan(live([3.5, 10.0])).all()  # nothing fed there: not heard, which is not silence
    live.feed(pcm[:rate], 10.0)  # a jump in time starts afresh
    assert np.isnan(live([4.5])).all() and np.isfinite(live([10.5])).all()


def test_the_sound_parts_the_lips_but_never_opens_a_closure():
    from engines.voice.coarticulation import mouth_track

    phones = [Phone(0.0, 0.3, "AA"), Phone(0.3, 0.45, "M"), Phone(0.45, 0.8, "IH")]
    times = np.array([0.15, 0.4, 0.62])
    alone = mouth_track(phones, times)[:, 0]
    shut, wide = (mouth_track(phones, times, openness=lambda t, v=v: np.full(len(t), v))[:, 0] for v in (0.0, 1.0))
    assert wide[0] > alone[0] > shut[0] and wide[2] > alone[2] > shut[2]  # vowels follow the sound
    assert max(wide[1], shut[1]) < 0.02  # /m/: the lips meet however loud
    not_heard = mouth_track(phones, times, openness=lambda t: np.full(len(t), np.nan))
    np.testing.assert_allclose(not_heard, mouth_track(phones, times))


@pytest.mark.slow
def test_a_real_voice_moves_the_mouth_more_like_its_own_with_the_sound_heard(pocketsphinx):
    """selfscan_a's own speech (over music) drives the general mouth: its lip gap follows the
    clip's own better with the sound's openness than with the phones alone (bench: 0.38 vs 0.24)."""
    from engines.voice.audio import load_audio
    from engines.voice.bench import clip_lip_gaps, pearson
    from engines.voice.coarticulation import mouth_track
    from engines.voice.recognize import recognize_speech

    clip = shared_clip("selfscan_a.mp4")
    speech = recognize_speech(load_audio(clip))
    own, fps = clip_lip_gaps(clip)
    times = np.arange(len(own)) / fps
    heard = pearson(mouth_track(speech.phones, times, openness=speech.openness)[:, 0], own)
    phones_only = pearson(mouth_track(speech.phones, times)[:, 0], own)
    assert heard > 0.32 and heard > phones_only + 0.08, (heard, phones_only)

# ---- the commands ---------------------------------------------------------------------------
def run_cli(home, *argv) -> int:
    from server.cli import main
    return main(["--home", str(home), *argv])


def test_say_writes_a_marked_audited_video_with_its_audio(tmp_path, espeak, capsys):
    from engines.provenance.verify import verify_file
    from server.audit import AuditLog, audit_path

    out = tmp_path / "say.mp4"
    assert run_cli(tmp_path / "home", "say", "Hello there. Please bring me the blue map.", "-o", str(out)) == 0
    verdict = verify_file(out)
    assert verdict.found, verdict
    with av.open(str(out)) as container:
        assert container.streams.audio and container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.audio[0].duration * container.streams.audio[0].time_base > 2.0
    log = AuditLog(audit_path(tmp_path / "home"))
    try:
        uses = log.query(kind="render", identity="demo")
    finally:
        log.close()
    assert len(uses) == 1 and uses[0]["frames"] > 60
    assert verdict.payload.endswith(uses[0]["use_id"][:6])
    assert "C2PA manifest signed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["say", "", "-o", "OUT"], "the text to say is empty"),
    (["say", "x" * 2001, "-o", "OUT"], "at most 2000"),
    (["say", "hi", "--voice", "../x", "-o", "OUT"], "not an eSpeak NG voice name"),
    (["render", "--audio", "TEXTFILE", "-o", "OUT"], "not a readable audio file"),
    (["render", "-o", "OUT"], "either a driving video or --audio"),
])
def test_bad_input_exits_2_with_a_clear_error(tmp_path, capsys, argv, message):
    textfile = tmp_path / "speech.wav"
    textfile.write_text("hello\n")
    argv = [{"OUT": str(tmp_path / "out.mp4"), "TEXTFILE": str(textfile)}.get(a, a) for a in argv]
    assert run_cli(tmp_path / "home", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.mp4").exists()


def test_a_text_with_no_words_is_a_clear_error(tmp_path, capsys, espeak):
    assert run_cli(tmp_path / "home", "say", "...", "-o", str(tmp_path / "out.mp4")) == 2
    assert "nothing eSpeak NG can say" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------ an identity's own mouth shapes

def test_an_identitys_own_vowels_are_learned_from_its_speech_and_closures_are_not(demo):
    # A talker who opens wide on "a" and barely on "i": frames posed by the rig with those
    # shapes, phones heard at their times. The learned table follows them for the vowels,
    # towards the general shape while it has few moments, and keeps p b m shut.
    from engines.voice.coarticulation import mouth_track
    from engines.voice.learn import MIN_PHONES, learn_visemes, own_visemes
    from engines.voice.rig import FaceRig
    from engines.voice.visemes import VISEMES

    talker = {**VISEMES, "aa": VISEMES["aa"]._replace(gap=0.35), "ih": VISEMES["ih"]._replace(gap=0.01)}
    phones = [Phone(0.2 + 0.3 * i, 0.5 + 0.3 * i, ("AA", "M", "IY")[i % 3]) for i in range(60)]
    times = np.arange(0, 18.5, 1 / 30)
    rig = FaceRig(demo.neutral)
    frames = rig.pose(mouth_track(phones, times, visemes=talker))
    learned = learn_visemes(phones, times, frames, demo.neutral)
    aa, ih = learned["shapes"]["aa"][0], learned["shapes"]["ih"][0]
    assert learned["moments"]["aa"] == learned["moments"]["ih"] == 20
    assert VISEMES["aa"].gap < aa <= 0.36 and 0.0 <= ih < VISEMES["ih"].gap, learned["shapes"]
    assert "PP" not in learned["shapes"] and "sil" not in learned["shapes"] and "DD" not in learned["shapes"]
    assert learn_visemes(phones[:MIN_PHONES - 1], times, frames, demo.neutral) is None  # too little speech

    class Enrolled:
        manifest = {"visemes": learned}
    table = own_visemes(Enrolled)
    assert table["aa"].gap == aa and table["PP"] == VISEMES["PP"] and table["DD"] == VISEMES["DD"]
    assert table["aa"].hold_gap == VISEMES["aa"].hold_gap  # how strongly a sound holds stays general


def test_learned_shapes_in_a_manifest_are_checked_at_load(tmp_path):
    import json

    from engines.identity import IdentityError, IdentityStore

    store = IdentityStore(tmp_path / "identities")
    store.ensure_default()
    path = store.path("demo") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["visemes"] = {"shapes": {"aa": [0.3, float("nan"), 0.0]}}
    path.write_text(json.dumps(manifest))
    with pytest.raises(IdentityError, match="visemes.shapes"):
        store.load("demo")
    manifest["visemes"] = {"phones": 50, "shapes": {"aa": [0.3, 0.01, 0.0]}}
    path.write_text(json.dumps(manifest))
    assert store.load("demo").manifest["visemes"]["shapes"]["aa"][0] == 0.3


def test_a_scan_without_usable_speech_keeps_the_general_shapes(tmp_path, monkeypatch, demo):
    # A silent scan, or no recognizer on this machine: the enrollment goes on without its own
    # shapes (None), never fails for it.
    from engines.voice import learn, recognize

    silent = tmp_path / "silent.mp4"
    with av.open(str(silent), "w") as c:
        st = c.add_stream("mpeg4", rate=10)
        st.width = st.height = 64
        for _ in range(5):
            c.mux(st.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        c.mux(st.encode())
    points = np.repeat(demo.neutral[None], 5, axis=0)
    assert learn.learn_from_video(silent, np.arange(5), points, demo.neutral) is None  # no audio stream

    def no_recognizer(speech):
        raise SpeechError("speech recognition needs pocketsphinx")
    monkeypatch.setattr(recognize, "recognize_phones", no_recognizer)
    speaking = shared_clip("selfscan_a.mp4")
    assert learn.learn_from_video(speaking, np.arange(5), points, demo.neutral) is None
