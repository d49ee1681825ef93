"""The VP8 encoder settings of the video this process sends: faster, and no denoiser.

Why: aiortc's Vp8Encoder (aiortc/codecs/vpx.py) opens libvpx with `cpu-used -6` and
`noise-sensitivity 4`, fixed. The denoiser is there for camera sensor noise, but what the
server sends is rendered: it has none, and on a rendered talking head the denoiser costs
about a third of the encode and 1 dB of PSNR at the same bitrate. A higher speed (cpu-used
-10) halves the rest at 0.2 dB. VP8 encoding runs once per sent frame, per session and per
viewer, on the same cores as landmarks and the generator (README, "VP8 encoder speed").

How: install() makes aiortc's RTCRtpSender get TunedVp8Encoder for VP8 (it looks the
encoder up through `aiortc.rtcrtpsender.get_encoder`, a name it imports). TunedVp8Encoder is
aiortc's own encoder, whose `codec` attribute is wrapped so that the options aiortc gives
libvpx pass through `options()` first; everything else (bitrate control, packetization,
keyframes) is aiortc's. check_aiortc() encodes one frame and raises IncompatibleAiortc if
aiortc no longer sets its options that way, so the setting never silently does nothing.
"""
from __future__ import annotations

import fractions

import aiortc.rtcrtpsender
from aiortc.codecs import get_encoder
from aiortc.codecs.vpx import DEFAULT_BITRATE, MAX_BITRATE, Vp8Encoder

from ..config import VP8_SPEED_AIORTC as AIORTC_SPEED, VP8_SPEED_DEFAULT as DEFAULT_SPEED
from .jitter import IncompatibleAiortc  # one error for "aiortc's internals changed"


def options(speed: int) -> dict[str, str]:
    """The libvpx options replaced on top of aiortc's (none at AIORTC_SPEED)."""
    return {} if speed == AIORTC_SPEED else {"cpu-used": str(-speed), "noise-sensitivity": "0"}


class _Context:
    """A libvpx CodecContext whose `options` are overridden as they are set."""

    def __init__(self, context, override: dict[str, str]):
        object.__setattr__(self, "_context", context)
        object.__setattr__(self, "_override", override)
        object.__setattr__(self, "overridden", False)

    def __getattr__(self, name):
        return getattr(self._context, name)

    def __setattr__(self, name, value):
        if name == "options":
            value = {**value, **self._override}
            object.__setattr__(self, "overridden", True)
        setattr(self._context, name, value)


def start_bitrate(width: int, height: int) -> int:
    """The bitrate a stream of this size starts at: aiortc's 500 kbps per 256² of picture,
    within its bounds. aiortc starts every stream at 500 kbps and climbs only as fast as the
    receiver's REMB allows (it does not probe): right for the 256² avatar, too little for a
    call frame's detail and its watermark (the demo's scene at 640x360 through aiortc's VP8:
    2-second segments found 14/16 at 300 kbps, 16/16 from 500 kbps on)."""
    return int(min(MAX_BITRATE, max(DEFAULT_BITRATE, DEFAULT_BITRATE * width * height / 256 ** 2)))


class TunedVp8Encoder(Vp8Encoder):
    """aiortc's VP8 encoder with options(speed) applied to every codec it opens, starting at
    start_bitrate() for the size of its first frame."""

    def __init__(self, speed: int = DEFAULT_SPEED):
        self._override = options(speed)
        self._started = False
        super().__init__()

    def encode(self, frame, force_keyframe: bool = False):
        if not self._started:  # before the receiver has said anything: its REMB rules from then on
            self.target_bitrate = start_bitrate(frame.width, frame.height)
        return super().encode(frame, force_keyframe)

    @property
    def target_bitrate(self) -> int:
        return Vp8Encoder.target_bitrate.fget(self)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        """A bitrate set before the first frame (a REMB, a benchmark's) is kept, not the start's."""
        self._started = True
        Vp8Encoder.target_bitrate.fset(self, bitrate)

    @property
    def codec(self):
        return self.__dict__.get("_codec")

    @codec.setter
    def codec(self, context):
        self.__dict__["_codec"] = None if context is None else _Context(context, self._override)


_speed = AIORTC_SPEED


def install(speed: int = DEFAULT_SPEED) -> None:
    """Every VP8 track this process sends from now on encodes at `speed` (AIORTC_SPEED:
    aiortc's own settings). Raises IncompatibleAiortc if the installed aiortc cannot be tuned."""
    global _speed
    if speed != AIORTC_SPEED:
        check_aiortc()
    _speed = speed
    aiortc.rtcrtpsender.get_encoder = encoder_for


def encoder_for(codec, speed: int | None = None):
    """The encoder a sender of `codec` uses: TunedVp8Encoder for VP8 at `speed` (default: the
    installed one), aiortc's own otherwise."""
    speed = _speed if speed is None else speed
    if codec.mimeType.lower() == "video/vp8" and speed != AIORTC_SPEED:
        return TunedVp8Encoder(speed)
    return get_encoder(codec)


def check_aiortc() -> None:
    """Encode one small frame and check that aiortc set its options through the wrapper."""
    import av

    encoder = TunedVp8Encoder(DEFAULT_SPEED)
    frame = av.VideoFrame(64, 64, "yuv420p")
    frame.pts, frame.time_base = 0, fractions.Fraction(1, 30)
    try:
        payloads, _ = encoder.encode(frame)
    except Exception as e:  # noqa: BLE001 - any failure means this aiortc is not what we read
        raise IncompatibleAiortc(f"aiortc {aiortc.__version__}: its VP8 encoder fails when tuned ({e!r})") from e
    if not (isinstance(encoder.codec, _Context) and encoder.codec.overridden and payloads):
        raise IncompatibleAiortc(f"aiortc {aiortc.__version__} no longer sets libvpx's options on "
                                 "Vp8Encoder.codec: the VP8 speed cannot be set (use --vp8-speed 6)")
