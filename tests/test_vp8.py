"""server/media/vp8.py: the VP8 settings of what the server sends take effect, through aiortc's own
sender, and a changed aiortc is refused loudly rather than silently left at its defaults."""
from fractions import Fraction

import aiortc.rtcrtpsender
import av
import numpy as np
import pytest
from aiortc.codecs import get_decoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from server.media import vp8
from server.bench.runner import RunConfig
from server.config import ServerConfig
from server.security import ConfigError

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=97,
                             parameters={"packetization-mode": "1"})


@pytest.fixture(autouse=True)
def restore_aiortc(monkeypatch):
    """install() is process-wide: give every test aiortc's own lookup and speed back."""
    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", aiortc.rtcrtpsender.get_encoder)
    monkeypatch.setattr(vp8, "_speed", vp8._speed)


def frames(n=8, size=128):
    """A bright square moving over a grainy gradient: enough detail for the settings to differ."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, size)[None, :, None] + rng.normal(0, 6, (size, size, 3))
    base = np.clip(ramp, 0, 255).astype(np.uint8)
    for i in range(n):
        img = base.copy()
        img[20 + 3 * i:60 + 3 * i, 30:70] = 250
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts, f.time_base = i * 3000, Fraction(1, 90000)
        yield img, f


def encode(encoder):
    """Bitstream bytes per frame and the mean PSNR of their decode."""
    from aiortc.codecs import depayload

    decoder, streams, psnrs = get_decoder(VP8), [], []
    for i, (img, f) in enumerate(frames()):
        payloads, ts = encoder.encode(f, force_keyframe=i == 0)
        data = b"".join(depayload(VP8, p) for p in payloads)
        streams.append(data)
        for out in decoder.decode(JitterFrame(data=data, timestamp=ts)):
            err = ((out.to_ndarray(format="rgb24").astype(float) - img) ** 2).mean()
            psnrs.append(10 * np.log10(255 ** 2 / max(err, 1e-9)))
    return streams, float(np.mean(psnrs))


def test_the_speed_reaches_libvpx_and_frames_still_decode():
    stock, stock_psnr = encode(Vp8Encoder())
    tuned, tuned_psnr = encode(vp8.TunedVp8Encoder(16))
    again, _ = encode(vp8.TunedVp8Encoder(16))
    assert tuned == again  # deterministic, so the difference below is the settings'
    assert tuned != stock  # libvpx was opened with other options
    assert tuned_psnr > 25 and stock_psnr > 25  # and both are real pictures


def test_install_routes_aiortc_senders_to_the_tuned_encoder():
    vp8.install(12)
    lookup = aiortc.rtcrtpsender.get_encoder  # what RTCRtpSender calls
    assert isinstance(lookup(VP8), vp8.TunedVp8Encoder)
    assert lookup(VP8)._override == {"cpu-used": "-12", "noise-sensitivity": "0"}
    assert type(lookup(H264)).__name__ == "H264Encoder"  # other codecs stay aiortc's
    vp8.install(vp8.AIORTC_SPEED)  # aiortc's own settings, exactly
    assert type(aiortc.rtcrtpsender.get_encoder(VP8)) is Vp8Encoder


def test_an_aiortc_that_no_longer_sets_options_is_refused(monkeypatch):
    def encode_without_options(self, frame, force_keyframe=False):  # a future aiortc, say
        if self.codec is None:
            self.codec = av.CodecContext.create("libvpx", "w")
            self.codec.width, self.codec.height, self.codec.pix_fmt = frame.width, frame.height, "yuv420p"
            self.codec.time_base = Fraction(1, 90000)
        return [bytes(p) for p in self.codec.encode(frame)], 0

    monkeypatch.setattr(Vp8Encoder, "encode", encode_without_options)
    with pytest.raises(vp8.IncompatibleAiortc, match="--vp8-speed 6"):
        vp8.install(10)
    vp8.install(vp8.AIORTC_SPEED)  # aiortc's own settings need nothing of its internals


def test_speed_settings_are_validated():
    with pytest.raises(ConfigError, match="vp8-speed must be 4..16"):
        ServerConfig(vp8_speed=3).validate()
    assert RunConfig.parse("vp8-speed=6").server_flags() == ("--vp8-speed", "6")
    assert RunConfig.parse("marker=off,vp8-speed=12").server_flags() == ("--no-marker-completion",
                                                                         "--vp8-speed", "12")
    for bad in ("vp8-speed=3", "vp8-speed=17", "vp8-speed=x"):
        with pytest.raises(ValueError, match="vp8-speed=4..16"):
            RunConfig.parse(bad)


@pytest.mark.parametrize("size, start", [((256, 256), 500_000), ((384, 384), 1_125_000), ((640, 360), 1_500_000),
                                          ((1280, 720), 1_500_000)])
def test_a_stream_starts_at_a_bitrate_for_its_size_then_follows_the_receiver(size, start):
    """A call frame's mark needs more than aiortc's 500 kbps start (server/media/vp8.py)."""
    encoder = vp8.TunedVp8Encoder()
    frame = av.VideoFrame(*size, "yuv420p")
    frame.pts, frame.time_base = 0, Fraction(1, 90000)
    encoder.encode(frame, force_keyframe=True)
    assert encoder.target_bitrate == start and encoder.codec.bit_rate == start
    encoder.target_bitrate = 400_000  # the receiver's REMB: it rules from then on
    frame.pts = 3000
    encoder.encode(frame)
    assert encoder.target_bitrate == 400_000 and encoder.codec.bit_rate == 400_000
