"""Child processes of browser enrollment (server/enroll/queue.py starts them): the probe that
checks an uploaded recording, and the training of one job.

Both run outside the server's process. Training holds the GIL and the cores for minutes,
and the live sessions need them; FFmpeg parsing a file a client sent must not be able to
take the server down with it. So each is a process of its own, at a lower priority, with
bounded threads, speaking JSON lines on stdout:

    python -m server.enroll_worker probe FILE
        -> {"ok": true, "seconds", "width", "height", "frames", "codec", "container",
            "audio" (the sound's codec, or null: recorded without sound)}
           or {"ok": false, "status": 415 | 400, "error": "..."}
    python -m server.enroll_worker train  < {"identities_root", "video", "name", "display_name",
                                             "consent", "preset", "steps", "max_frames", "threads",
                                             "max_memory" (bytes, RLIMIT_DATA),
                                             "audit_use" (its watermark marks the eval report)}
        -> {"stage", "done", "total", "fraction", "eta"} lines, then
           {"result": "done", "summary": {...}} | {"result": "failed", "error": "..."}
           | {"result": "interrupted"} (SIGTERM: the checkpoint is saved, a rerun resumes)

Training reads every frame's size again (a stream may change it after the first frame, which
is all the probe decodes) and keeps only 256² crops of them, so its memory does not grow with
the recording's resolution; past max_memory an allocation fails and the job fails "out of
memory" rather than the kernel's OOM killer ending some process on the machine.

The environment (OMP_NUM_THREADS and friends) is set by the parent before this starts:
thread pools read it at import, before any code here could change it.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import time

NICE = 10  # CFS gives a nice-10 process about a tenth of a nice-0 one's share when they compete
CONTAINERS = {"matroska,webm": "webm", "mov,mp4,m4a,3gp,3g2,mj2": "mp4"}
CODECS = ("vp8", "vp9", "h264", "av1")
MIN_SECONDS, MAX_SECONDS = 5.0, 120.0
MIN_SIDE, MAX_PIXELS = 128, 1920 * 1080
MAX_FPS = 120  # packets counted past MAX_SECONDS at this rate: the file is too long
PROBE_CPU_SECONDS = 60
# Where each stage's share of the whole job lies, for one progress bar (training dominates).
STAGE_SPAN = {"extracting": (0.0, 0.15), "preparing": (0.15, 0.2), "training": (0.2, 0.88),
              "evaluating": (0.88, 0.92), "writing": (0.92, 1.0)}
REPORT_INTERVAL = 0.25  # seconds between progress lines within a stage


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def lower_priority() -> None:
    """Yield the CPU to live sessions: every thread started after this inherits the nice value."""
    try:
        os.nice(NICE)
    except OSError:
        pass


# ---- probe -------------------------------------------------------------------------------
class Unusable(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def probe(path: str) -> dict:
    """The facts of a recording the server accepts; Unusable (415: not a video it reads,
    400: a video it will not train on) otherwise. Sound is welcome but never required: the
    checks are of the video stream alone."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError):
        raise Unusable(415, "not a video file the server can read (send WebM or MP4)")
    with container:
        kind = CONTAINERS.get(container.format.name)
        if kind is None:
            raise Unusable(415, f"unsupported container {container.format.name!r} (send WebM or MP4)")
        if not container.streams.video:
            raise no_video(container)
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in CODECS:
            raise Unusable(415, f"unsupported video codec {codec!r} (use {', '.join(CODECS)})")
        width, height = stream.codec_context.width, stream.codec_context.height
        check_size(width, height)
        frames, seconds = count_packets(container, stream)
    check_decodes(path)
    if seconds < MIN_SECONDS:
        raise Unusable(400, f"the recording is {seconds:.1f} s long; record at least {MIN_SECONDS:.0f} s")
    return {"ok": True, "seconds": round(seconds, 2), "width": width, "height": height, "frames": frames,
            "codec": codec, "container": kind, "audio": sound(path)}


def no_video(container) -> Unusable:
    if container.streams.audio:  # the camera was off, or a sound file sent by mistake
        return Unusable(415, "the recording has sound but no video: the avatar is learned from your face, "
                             "so record with the camera on")
    return Unusable(415, "the file has no video stream")


def check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE or width * height > MAX_PIXELS:
        raise Unusable(400, f"frame size {width}x{height} is outside {MIN_SIDE} px per side to "
                            f"{MAX_PIXELS} pixels (1920x1080)")


def count_packets(container, stream) -> tuple[int, float]:
    """Video packets and seconds from the first to the last timestamp, by demuxing (no
    decoding): a browser's MediaRecorder writes WebM without a duration in its header."""
    limit = int(MAX_SECONDS * MAX_FPS)
    count, first, last = 0, None, None
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            count += 1
            if count > limit:
                break
            first = packet.pts if first is None else min(first, packet.pts)
            last = packet.pts if last is None else max(last, packet.pts)
    except av_errors() as e:
        raise Unusable(400, f"the recording is damaged ({str(e)[:120]})")
    if count == 0 or stream.time_base is None:
        raise Unusable(400, "the recording has no video frames")
    span = float((last - first) * stream.time_base)
    seconds = span * count / (count - 1) if count > 1 else 0.0  # the last frame lasts one interval too
    if count > limit or seconds > MAX_SECONDS:
        raise Unusable(400, f"the recording is longer than {MAX_SECONDS:.0f} s")
    return count, seconds


def check_decodes(path: str) -> None:
    """The first frame decodes: a stream that only looks like video is refused now, not
    minutes into a job."""
    import av

    try:
        with av.open(path) as container:
            for _ in container.decode(video=0):
                return
    except av_errors() as e:
        raise Unusable(415, f"the video cannot be decoded ({str(e)[:120]})")
    raise Unusable(400, "the recording has no decodable video frame")


def sound(path: str) -> str | None:
    """The codec of the recording's sound if its first stretch decodes; None without sound.
    Sound that cannot be read makes a recording without sound, not a refused one: the
    microphone is never what stops an enrollment."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            for _ in container.decode(audio=0):
                return container.streams.audio[0].codec_context.name
    except av_errors():
        pass
    return None


def av_errors() -> tuple:
    import av

    return (av.error.FFmpegError, ValueError, EOFError)


def run_probe(path: str) -> int:
    # A hostile file may make FFmpeg spin: the CPU limit ends it (the parent also times out).
    resource.setrlimit(resource.RLIMIT_CPU, (PROBE_CPU_SECONDS, PROBE_CPU_SECONDS))
    try:
        emit(probe(path))
    except Unusable as e:
        emit({"ok": False, "status": e.status, "error": str(e)})
    return 0


# ---- train -------------------------------------------------------------------------------
class Progress:
    """enroll()'s report callback as JSON lines: one bar over the stages, with the training
    stage's time left. At most one line per REPORT_INTERVAL within a stage."""

    def __init__(self, expected_frames: int | None, budget_seconds: float):
        self.expected_frames, self.budget = expected_frames, budget_seconds
        self.stage, self.last = None, 0.0
        self.train_start: tuple[float, int] | None = None  # (time, step) when this run began training

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if stage == self.stage and now - self.last < REPORT_INTERVAL and done != total:
            return
        if stage == "extracting" and total is None:
            total = self.expected_frames
        if stage == "training" and self.train_start is None:
            self.train_start = (now, done)
        self.stage, self.last = stage, now
        low, high = STAGE_SPAN.get(stage, (0.0, 1.0))
        part = min(1.0, done / total) if total else 0.0
        emit({"stage": stage, "done": done, "total": total, "fraction": round(low + (high - low) * part, 4),
              "eta": self.eta(stage, done, total, now)})

    def eta(self, stage: str, done: int, total: int | None, now: float) -> float | None:
        """Seconds of training left, from this run's pace, within its time budget."""
        if stage != "training" or not total or self.train_start is None:
            return None
        t0, step0 = self.train_start
        if done <= step0:
            return None
        pace = (now - t0) / (done - step0)
        return round(max(0.0, min((total - done) * pace, self.budget - (now - t0))), 1)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # training's `finally` saves the checkpoint on the way out


def limit_memory(limit: int | None) -> None:
    """Cap this process's data memory: RLIMIT_DATA counts the heap and private writable
    mappings, not the address space torch and onnxruntime reserve without using (RLIMIT_AS
    would count that too). Past it an allocation fails in this process alone."""
    if limit:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


# How torch ("can't allocate memory"), OpenCV ("Failed to allocate", "Insufficient memory")
# and onnxruntime ("bad_alloc") say an allocation failed; numpy and Python raise MemoryError.
OUT_OF_MEMORY = ("allocate memory", "Failed to allocate", "Insufficient memory", "bad_alloc")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(words in str(e) for words in OUT_OF_MEMORY)


def run_train(spec: dict) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    limit_memory(spec.get("max_memory"))
    import torch

    torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
    from engines.identity import Consent, IdentityError, IdentityStore
    from engines.neural.config import PRESETS
    from engines.neural.enroll import enroll
    from engines.provenance.watermark import Marker, Payload

    preset = spec["preset"]
    progress = Progress(spec.get("frames"), PRESETS[preset].max_minutes * 60)
    try:
        identity, summary = enroll(
            IdentityStore(spec["identities_root"]), spec["video"], spec["name"], Consent.from_dict(spec["consent"]),
            spec.get("display_name"), preset=preset, steps=spec.get("steps"), max_frames=spec.get("max_frames"),
            progress=False, report=progress, max_pixels=MAX_PIXELS,
            marker=Marker(Payload.here(spec["audit_use"])) if spec.get("audit_use") else None)
    except KeyboardInterrupt:
        emit({"result": "interrupted"})
        return 3
    except IdentityError as e:  # what the person can act on: no face found, name taken, ...
        emit({"result": "failed", "error": str(e).replace(spec["video"], "the recording")})
        return 1
    except Exception as e:
        if not out_of_memory(e):
            raise
        logging.exception("out of memory")
        limit = spec.get("max_memory")
        emit({"result": "failed", "error": "out of memory: the training needs more than "
                                           + (f"the {limit / 2**30:.1f} GiB this server gives it" if limit else
                                              "this machine has")})
        return 1
    emit({"result": "done", "identity": identity.name, "summary": summary})
    return 0


def main(argv: list[str]) -> int:
    lower_priority()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) == 2 and argv[0] == "probe":
        return run_probe(argv[1])
    if argv == ["train"]:
        return run_train(json.loads(sys.stdin.read()))
    print("usage: python -m server.enroll_worker probe FILE | train < spec.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
