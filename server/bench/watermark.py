"""`avatar bench watermark`: does the invisible mark survive what happens to a stream, is it
invisible, what does it cost, and does unmarked footage stay unmarked?

Each clip is cut to 256² (the avatar's size; --size for others, e.g. 512x512 or a 1280x720
call frame), marked as a session marks it (the luma of the I420 planes it encodes, timed as
the cost), and passed through the channels a
frame really meets: the VP8 and H.264 encoders the server sends with (aiortc's; VP8 at
the server's default speed, server/media/vp8.py) at the given bitrates (what a WebRTC viewer
receives), a 50% downscale and re-encode, and a screen-recording-style re-encode
(upscaled 2x, x264 CRF). Every 2-second segment is then decoded as `avatar verify` does.
Unmarked clips are read frame by frame at their own size for false positives. The
invisible-watermark package (dwtDct), if installed, is timed on the same frames as the
baseline the scheme was chosen against."""
from __future__ import annotations

import argparse
import json
import platform
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from tqdm import tqdm

from engines.provenance import watermark
from engines.measure import timing_summary
from engines.provenance.verify import SEGMENT_SECONDS
from engines.video import read_video
from ..camera import frame_size

SIZE = 256
FPS = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("clips", type=Path, nargs="+", help="talking-head videos (real footage)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per clip (default: %(default)s)")
    parser.add_argument("--size", type=frame_size, default=(SIZE, SIZE), metavar="WxH",
                        help="the marked frame: each clip's middle cut to its shape and scaled (default: 256x256)")
    parser.add_argument("--vp8-kbps", type=int, default=300, help="default: %(default)s")
    parser.add_argument("--h264-kbps", type=int, default=500, help="default: %(default)s")
    parser.add_argument("--json", type=Path, default=Path("bench-watermark.json"),
                        help="where to write the results (default: %(default)s)")


def run(args) -> int:
    report = bench(args.clips, args.seconds, args.vp8_kbps * 1000, args.h264_kbps * 1000, args.size)
    print(format_table(report))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


def channels(vp8_bps: int, h264_bps: int) -> dict:
    return {
        "none": lambda frames: frames,
        f"VP8 {vp8_bps // 1000} kbps (aiortc)": lambda frames: rtc_codec(frames, "video/VP8", vp8_bps),
        f"H.264 {h264_bps // 1000} kbps (aiortc)": lambda frames: rtc_codec(frames, "video/H264", h264_bps),
        "50% + H.264 250 kbps": lambda frames: file_codec([_scale(f, 0.5) for f in frames], {"b": "250k"}),
        "screen rec: 2x + x264 CRF 23": lambda frames: file_codec([_scale(f, 2.0) for f in frames], {"crf": "23"}),
    }


def bench(clips: list[Path], seconds: float, vp8_bps: int, h264_bps: int,
          size: tuple[int, int] = (SIZE, SIZE)) -> dict:
    marker = watermark.Marker(watermark.Payload.for_use("bench", "b0b0b0"))
    expected = str(marker.payload)
    chans = channels(vp8_bps, h264_bps)
    survived = {name: [0, 0] for name in chans}
    psnr, cost, false_pos, segments_clean = [], [], 0, 0
    for clip in tqdm(clips, desc="clips", unit="clip"):
        raw = list(read_video(clip, int(seconds * FPS)))
        # As a session sends them: I420 planes, marked in their luma rows (server/media/tracks.py).
        frames = [_as_sent(_cut(f, *size)) for f in raw]
        marked = []
        for f in frames:
            planes = cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420)
            t0 = time.perf_counter()
            marker.mark_i420(planes)
            cost.append((time.perf_counter() - t0) * 1e3)
            marked.append(cv2.cvtColor(planes, cv2.COLOR_YUV2RGB_I420))
        psnr += [_psnr(a, b) for a, b in zip(marked, frames)]
        for name, channel in chans.items():
            for payload in segment_payloads(channel(marked)):
                survived[name][0] += payload == expected
                survived[name][1] += 1
        for payload in segment_payloads(raw):
            false_pos += payload is not None
            segments_clean += 1
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "frame": f"{size[0]}x{size[1]}",
        "segment_seconds": SEGMENT_SECONDS,
        "clips": [str(c) for c in clips],
        "survival": {k: {"detected": d, "segments": n, "ratio": round(d / max(n, 1), 3)}
                     for k, (d, n) in survived.items()},
        "false_positives": {"segments": segments_clean, "marked": false_pos},
        "psnr_db": {"median": round(float(np.median(psnr)), 2), "min": round(float(np.min(psnr)), 2)},
        "mark_ms": timing_summary(cost, count_key="frames", digits=3),
        "baseline": baseline(frames[:30]),
    }


def segment_payloads(frames: list[np.ndarray]) -> list[str | None]:
    per = int(SEGMENT_SECONDS * FPS)
    out = []
    for i in range(0, len(frames) - per // 2, per):
        projections = np.array([watermark.project(watermark.luma(f)) for f in frames[i:i + per]])
        detection = watermark.detect(projections)
        out.append(str(detection.payload) if detection.found else None)
    return out


def rtc_codec(frames: list[np.ndarray], mime: str, bitrate: int) -> list[np.ndarray]:
    """Through the server's encoder (realtime VP8 at its default speed, zerolatency x264) and
    aiortc's decoder."""
    from ..config import VP8_SPEED_DEFAULT
    from ..media.vp8 import encoder_for

    codec = RTCRtpCodecParameters(mimeType=mime, clockRate=90000, payloadType=96,
                                  parameters={"packetization-mode": "1"} if mime == "video/H264" else {})
    encoder, decoder = encoder_for(codec, VP8_SPEED_DEFAULT), get_decoder(codec)
    encoder.target_bitrate = bitrate
    from aiortc.codecs import depayload

    out = []
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts, vf.time_base = i * 3000, Fraction(1, 90000)
        payloads, timestamp = encoder.encode(vf, force_keyframe=i == 0)
        data = b"".join(depayload(codec, p) for p in payloads)
        out += [d.to_ndarray(format="rgb24") for d in decoder.decode(JitterFrame(data=data, timestamp=timestamp))]
    return out


def file_codec(frames: list[np.ndarray], options: dict) -> list[np.ndarray]:
    """Through libx264 as a file recorder would (veryfast preset)."""
    import io

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as sink:
        stream = sink.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", **options}
        for f in frames:
            sink.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        sink.mux(stream.encode(None))
    buf.seek(0)
    with av.open(buf) as source:
        return [f.to_ndarray(format="rgb24") for f in source.decode(video=0)]


def baseline(frames: list[np.ndarray]) -> dict:
    """invisible-watermark's dwtDct on the same frames, if that package is installed."""
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        return {"dwtDct": "not installed (pip install --no-deps invisible-watermark PyWavelets)"}
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"avtr")
    cost, psnr = [], []
    for f in frames:
        bgr = np.ascontiguousarray(f[..., ::-1])
        t0 = time.perf_counter()
        marked = encoder.encode(bgr, "dwtDct")
        cost.append((time.perf_counter() - t0) * 1e3)
        psnr.append(_psnr(marked, bgr))
    return {"dwtDct": {"mark_ms": timing_summary(cost, count_key="frames", digits=3),
                       "psnr_db_median": round(float(np.median(psnr)), 2)}}


def format_table(r: dict) -> str:
    lines = [f"watermark on {r['frame']} frames, {r['segment_seconds']:.0f}-second segments, "
             f"{len(r['clips'])} clip(s); {r['machine']['cpu']}",
             f"{'channel':<34}{'segments detected':>20}"]
    for name, s in r["survival"].items():
        lines.append(f"{name:<34}{s['detected']:>9} / {s['segments']:<4} ({s['ratio']:.0%})")
    fp = r["false_positives"]
    lines.append(f"{'unmarked clips (false positives)':<34}{fp['marked']:>9} / {fp['segments']:<4}")
    lines.append(f"PSNR marked vs unmarked: median {r['psnr_db']['median']} dB, min {r['psnr_db']['min']} dB")
    ms = r["mark_ms"]
    line = f"cost per frame: median {ms['median_ms']:.2f} ms, p95 {ms['p95_ms']:.2f} ms"
    base = r["baseline"]["dwtDct"]
    if isinstance(base, dict):
        ratio = base["mark_ms"]["median_ms"] / max(ms["median_ms"], 1e-6)
        line += (f"; invisible-watermark dwtDct: {base['mark_ms']['median_ms']:.1f} ms ({ratio:.0f}x), "
                 f"PSNR {base['psnr_db_median']} dB")
    lines.append(line)
    return "\n".join(lines)


def _cut(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """The frame's middle of the shape width:height, scaled to width x height."""
    h, w = rgb.shape[:2]
    k = min(w / width, h / height)
    cw, ch = round(width * k), round(height * k)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    part = rgb[y0:y0 + ch, x0:x0 + cw]
    return cv2.resize(part, (width, height), interpolation=cv2.INTER_AREA if k > 1 else cv2.INTER_CUBIC)


def _as_sent(rgb: np.ndarray) -> np.ndarray:
    """The frame as a viewer would see it unmarked: through I420 and back (chroma halved),
    so that PSNR measures the mark alone."""
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), cv2.COLOR_YUV2RGB_I420)


def _scale(rgb: np.ndarray, k: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (int(w * k) // 2 * 2, int(h * k) // 2 * 2)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)
