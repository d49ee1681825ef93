"""Where a session's frames are computed: a process of its own, or two threads of this one.

Why processes: Python runs one thread at a time per process. With every session's compute
threads, aiortc's decoders and encoders and the event loop in one interpreter, the cheap
steps of a frame wait for the lock more than they run, and three sessions on 2 cores
delivered p50 84-128 / p95 154-210 ms where three servers of one session each delivered
25-30 / 43-86 ms, in the same hour (README). In a process of its own a session's compute
holds only its own lock, uses any core, and a crash in native code (mediapipe, ONNX
Runtime) ends that session, not the server.

Both kinds run the same FrameProcessor (server/media/tracks.py) on the same two single-thread
stages, "prepare" and "render", and both are driven by `await stages.call(stage, method,
*args)`. To a process, plain values travel pickled through a pipe; arrays (the camera
planes in, the avatar images out) travel through shared memory, one region per stage:
calls on one stage run one at a time, so its region holds one call's arrays at once.
Children are forked from multiprocessing's fork server, which imported the engines once
(server/media/preload.py), so a session's process is ready in ~0.7 s, most of it building its
mediapipe graph as a session on threads does too, not the seconds a fresh interpreter
takes; each costs ~200 MB (PSS) of memory.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from typing import NamedTuple

import numpy as np

log = logging.getLogger("avatar.stages")

STAGES = ("prepare", "render")
# Bytes of shared memory per stage: a 1920x1080 camera's I420 planes (3.1 MB) fit in
# prepare's; render returns two images as I420 planes (0.2 MB at 256², 0.8 MB at 512²). Larger
# arrays are pickled instead.
REGION_BYTES = {"prepare": 4 << 20, "render": 2 << 20}
JOIN_TIMEOUT = 5.0  # seconds a closing child has to finish its frame and exit
KINDS = ("process", "thread")


class ComputeDied(RuntimeError):
    """The session's compute process ended without being asked to."""


class ComputeError(RuntimeError):
    """A call failed in the session's compute process (the message names the exception)."""


def check_kind(kind: str) -> None:
    """Raises ValueError unless `kind` is one of KINDS (also the --compute setting's check)."""
    if kind not in KINDS:
        raise ValueError(f"unknown compute {kind!r} (use {', '.join(KINDS)})")


def make_stages(kind: str, name: str, opencv_threads: int = 0):
    check_kind(kind)
    return ProcessStages(name, opencv_threads) if kind == "process" else ThreadStages(name)


def _make_processor(*args):
    from .tracks import FrameProcessor  # the engines: imported where they run

    return FrameProcessor(*args)


# ---- the two stages, as threads -----------------------------------------------------------

class _StageThreads:
    """One single-thread executor per stage: calls on a stage run one at a time, in order."""

    def __init__(self, prefix: str):
        self._executors = {s: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{prefix}-{s}")
                           for s in STAGES}

    def submit(self, stage: str, fn, *args) -> Future:
        return self._executors[stage].submit(fn, *args)

    def close(self, processor) -> None:
        """Blocks until both stages are done; closes `processor` (if any) on prepare, which
        owns it, after render has drained, so nothing touches the pipeline once it is closed.
        Raises what processor.close raised."""
        self._executors["render"].shutdown(wait=True)
        closing = self.submit("prepare", processor.close) if processor is not None else None
        self._executors["prepare"].shutdown(wait=True)
        if closing is not None:
            closing.result()


class ThreadStages:
    """The FrameProcessor on two single-thread stages of the server's own process."""

    def __init__(self, name: str):
        self._threads = _StageThreads(f"avatar-{name}")
        self._processor = None

    async def start(self, *args) -> None:
        """Build the FrameProcessor(*args) on the prepare stage, which owns it."""
        self._processor = await self._run("prepare", _make_processor, *args)

    async def call(self, stage: str, method: str, *args):
        return await self._run(stage, getattr(self._processor, method), *args)

    async def _run(self, stage: str, fn, *args):
        return await asyncio.wrap_future(self._threads.submit(stage, fn, *args))

    async def close(self) -> None:
        processor, self._processor = self._processor, None
        await asyncio.get_running_loop().run_in_executor(None, self._threads.close, processor)


# ---- a process of its own ---------------------------------------------------------------

class _Shared(NamedTuple):
    """An array that waits in the stage's shared-memory region."""
    offset: int
    shape: tuple
    dtype: str


def _regions(shm: SharedMemory) -> dict[str, memoryview]:
    out, offset = {}, 0
    for stage in STAGES:
        out[stage] = shm.buf[offset:offset + REGION_BYTES[stage]]
        offset += REGION_BYTES[stage]
    return out


def _pack(values: tuple, region: memoryview) -> tuple:
    """`values` with each array that fits copied into `region` and replaced by where it is."""
    out, offset = [], 0
    for value in values:
        if isinstance(value, np.ndarray) and offset + value.nbytes <= len(region):
            np.ndarray(value.shape, value.dtype, buffer=region, offset=offset)[...] = value
            out.append(_Shared(offset, value.shape, value.dtype.str))
            offset += -(-value.nbytes // 64) * 64  # cache-line aligned
        else:
            out.append(value)
    return tuple(out)


def _unpack(values: tuple, region: memoryview, copy: bool) -> tuple:
    """The inverse of _pack: views into `region`, or copies that outlive the next call."""
    def get(v):
        if not isinstance(v, _Shared):
            return v
        view = np.ndarray(v.shape, np.dtype(v.dtype), buffer=region, offset=v.offset)
        return view.copy() if copy else view
    return tuple(get(v) for v in values)


class ProcessStages:
    """The FrameProcessor in a child process, on the same two single-thread stages there."""

    def __init__(self, name: str, opencv_threads: int = 0):
        self.name = name
        self.opencv_threads = opencv_threads
        self._proc = self._conn = self._shm = None
        self._regions: dict[str, memoryview] = {}
        self._locks = {s: asyncio.Lock() for s in STAGES}
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._dead = False
        self._closing = False

    async def start(self, *args) -> None:
        """Start the child and build the FrameProcessor(*args) in it."""
        loop = asyncio.get_running_loop()
        context = fork_server()
        self._shm = SharedMemory(create=True, size=sum(REGION_BYTES.values()))
        self._regions = _regions(self._shm)
        self._conn, child_end = context.Pipe()
        self._proc = context.Process(target=_child_main, name=f"avatar-{self.name[:8]}",
                                     args=(child_end, self._shm.name, self.opencv_threads), daemon=True)
        try:
            # The first start also starts the fork server (it imports the engines: ~1 s).
            await loop.run_in_executor(None, self._proc.start)
        finally:
            child_end.close()
        loop.add_reader(self._conn.fileno(), self._on_readable)
        await self.call("prepare", "__init__", *args)

    async def call(self, stage: str, method: str, *args):
        """FrameProcessor.<method>(*args) on the child's `stage` thread; "__init__" builds it."""
        async with self._locks[stage]:  # the stage's region is this call's until it returns
            if self._dead:
                raise self._died()
            region = self._regions[stage]
            call_id = next(self._ids)
            future = self._pending[call_id] = asyncio.get_running_loop().create_future()
            try:
                self._conn.send((call_id, stage, method, _pack(args, region)))
            except OSError:  # its end of the pipe is closed: it has exited
                self._pending.pop(call_id)
                raise self._died() from None
            ok, value = await future
            if not ok:
                raise ComputeError(value)
            is_tuple, packed = value
            results = _unpack(packed, region, copy=True)
            return results if is_tuple else results[0]

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                call_id, ok, value = self._conn.recv()
                future = self._pending.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result((ok, value))
        except (EOFError, OSError):
            self._ended()

    def _ended(self) -> None:
        if self._dead:
            return
        self._dead = True
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        if not self._closing:
            log.error("session %s: its compute process ended unasked", self.name[:8])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._died())
        self._pending.clear()

    def _died(self) -> ComputeDied:
        return ComputeDied(f"the compute process of session {self.name[:8]} has ended")

    async def close(self) -> None:
        """Let the child finish its frame and exit (killed if it will not); release the pipe
        and the shared memory. Also cleans up after a start() that failed half-way."""
        self._closing = True
        loop = asyncio.get_running_loop()
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.pid is not None:
                if not self._dead:
                    try:
                        self._conn.send(None)  # finish what is queued, close the pipeline, exit
                    except OSError:
                        pass
                await loop.run_in_executor(None, proc.join, JOIN_TIMEOUT)
                if proc.is_alive():
                    log.warning("session %s: compute process did not exit; killing it", self.name[:8])
                    proc.kill()
                    await loop.run_in_executor(None, proc.join, JOIN_TIMEOUT)
                proc.close()
        finally:
            if self._conn is not None:
                self._ended()
                self._conn.close()
            for region in self._regions.values():
                region.release()
            if self._shm is not None:
                self._shm.close()
                self._shm.unlink()
            self._conn = self._shm = None
            self._regions = {}


def single_threaded_blas() -> None:
    """One BLAS thread for this process. Our numpy linear algebra is on tiny matrices (4x4
    poses, per-triangle 2x2s), which gain nothing from threads, while OpenBLAS's idle worker
    spins on sched_yield after every call: in a live neural session that worker burned a
    fifth of this 2-core machine, and one thread took the session from 22.6 to 28.5 fps."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


_fork_server_lock = threading.Lock()


def warm_up() -> None:
    """Start the fork server now (it imports the engines: a second or two), so that the
    first session does not wait for it."""
    fork_server()
    multiprocessing.forkserver.ensure_running()


def fork_server():
    """multiprocessing's fork-server context, preloaded with the engines. Forking the
    server itself would copy its threads' locks mid-use; the fork server is a clean
    single-threaded process that children are forked from."""
    with _fork_server_lock:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["server.media.preload"])
        return context


def _child_main(conn, shm_name: str, opencv_threads: int) -> None:
    """The child: runs FrameProcessor calls on their stage's thread until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; it closes us
    single_threaded_blas()
    if opencv_threads:
        import cv2

        cv2.setNumThreads(opencv_threads)
    shm = SharedMemory(shm_name)  # the parent created it and unlinks it
    regions = _regions(shm)
    threads = _StageThreads("avatar")
    send_lock = threading.Lock()
    processor = None

    def run(call_id: int, stage: str, method: str, args: tuple) -> None:
        nonlocal processor
        try:
            args = _unpack(args, regions[stage], copy=False)
            if method == "__init__":
                processor, result = _make_processor(*args), None
            else:
                result = getattr(processor, method)(*args)
            is_tuple = isinstance(result, tuple)
            reply = (True, (is_tuple, _pack(result if is_tuple else (result,), regions[stage])))
        except Exception as e:
            log.exception("compute call %s failed", method)
            reply = (False, f"{type(e).__name__}: {e}")
        with send_lock:
            conn.send((call_id, *reply))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        if message is None:
            break
        threads.submit(message[1], run, *message)
    try:
        threads.close(processor)
    finally:
        for region in regions.values():
            region.release()
        shm.close()
