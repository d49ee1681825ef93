"""Browser enrollment jobs (issue #13): self-scan recordings queued for training, one at a
time, each in a child process (server/enroll/worker.py) at a lower priority with bounded
threads, so training never starves the live sessions of the same server.

Every job is a small JSON record in <home>/enrollments/, beside its recording
(<id>.upload, a name the server chose) and its worker's log (<id>.log). A server stopped
mid-job finds the record when it starts again and queues the job again; training resumes
from its checkpoint (engines/neural/train.py). The recording is deleted as soon as the job
ends, whichever way (done, failed, cancelled): a person's video is kept no longer than its
use, and a failed one (no face found, say) is recorded again rather than retried. The
record stays (the newest MAX_RECORDS of them).

    queued ──▶ running ──▶ done | failed | cancelled
       ▲          │
       └──────────┘  the server stopped mid-job (it resumes at the next start)

Each run of a job is on record in the audit log as an "enroll" use by the token that sent it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

from engines.identity import Consent, IdentityError, IdentityStore, check_name, default_home
from ..audit import AuditThread
from ..config import ServerConfig
from .worker import STAGE_SPAN

log = logging.getLogger("avatar.enrollment")

FINAL = ("done", "failed", "cancelled")
STAGES = tuple(STAGE_SPAN)  # what a worker may report
WORKER = [sys.executable, "-m", "server.enroll.worker"]
MAX_RECORDS = 200  # finished job records kept; older ones are deleted at start
TRAIN_MAX_FRAMES = 1200  # 40 s at 30 fps: the frames (and their warps) are held in memory while training
PROBE_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0  # seconds a stopped worker has to save its checkpoint before it is killed
SAVE_INTERVAL = 5.0  # seconds between writes of a running job's progress to its record
JOB_ID_LENGTH = 32


class Refused(Exception):
    """A request the queue turns down: HTTP status, error code, message for people."""

    def __init__(self, status: int, code: str, message: str, **headers):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


def enrollments_dir(config: ServerConfig) -> Path:
    """<home>/enrollments, beside the identities (and the audit log)."""
    home = config.identities_root.parent if config.identities_root else default_home()
    return home / "enrollments"


def owner_digest(token: str | None) -> str:
    """What a job remembers of the token that made it (in demo mode, of no token)."""
    return hashlib.sha256((token or "").encode("utf-8", "replace")).hexdigest()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Job:
    id: str
    name: str
    display_name: str
    consent: dict
    owner: str  # owner_digest of the token that sent it: only that token may see or cancel it
    who: str  # the audit log's name for that token
    address: str
    frames: int | None = None  # video frames, as the probe counted them
    seconds: float | None = None
    audio: str | None = None  # the recording's sound codec, as the probe read it; None: no sound
    state: str = "queued"
    stage: str | None = None
    done: int = 0
    total: int | None = None
    fraction: float = 0.0
    eta: float | None = None
    error: str | None = None
    created_at: str = dataclasses.field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    audit_use: str | None = None

    PUBLIC = ("id", "name", "display_name", "state", "stage", "done", "total", "fraction", "eta", "error",
              "seconds", "audio", "created_at", "started_at", "finished_at", "attempts")

    def public(self) -> dict:
        """What its owner is told (not the consent record, token digest or address)."""
        return {k: getattr(self, k) for k in self.PUBLIC}

    @classmethod
    def from_record(cls, record: object) -> "Job":
        """A job from its JSON record; ValueError if the record is not one."""
        if not isinstance(record, dict):
            raise ValueError("not an object")
        fields = {f.name for f in dataclasses.fields(cls)}
        job = cls(**{k: v for k, v in record.items() if k in fields})
        if not (isinstance(job.id, str) and len(job.id) == JOB_ID_LENGTH and job.id.isalnum()):
            raise ValueError("bad id")
        check_name(job.name)
        Consent.from_dict(job.consent)
        if job.state not in ("queued", "running", *FINAL):
            raise ValueError(f"bad state {job.state!r}")
        for key in ("owner", "who", "address", "created_at", "display_name"):
            if not isinstance(getattr(job, key), str):
                raise ValueError(f"{key} must be a string")
        if not isinstance(job.attempts, int):
            raise ValueError("attempts must be a number")
        if not (job.audio is None or isinstance(job.audio, str)):
            raise ValueError("audio must be a codec name or null")
        return job


class Enrollments:
    """The queue: admission (reserve/release/submit), the one training at a time, cancel,
    and change notification for the progress streams."""

    def __init__(self, folder: Path, store: IdentityStore, audit: AuditThread, config: ServerConfig,
                 command: list[str] | None = None):
        self.folder, self.store, self.audit, self.config = folder, store, audit, config
        self.command = command or WORKER
        self.jobs: dict[str, Job] = {}
        self.uploading: set[str] = set()  # names whose recordings are arriving or being checked
        self.claimed: set[str] = set()  # those of them whose recordings have arrived: they hold a queue place
        self.closed = False
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._cancelling: set[str] = set()
        self._saved_at: dict[str, float] = {}

    # ---- files ---------------------------------------------------------------------------
    def record_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def upload_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.upload"

    def log_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.log"

    def _write_record(self, job: Job) -> None:
        staged = self.folder / f".{job.id}.json.tmp"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(job), f, indent=1)
        os.replace(staged, self.record_path(job.id))

    async def _save(self, job: Job) -> None:
        self._saved_at[job.id] = asyncio.get_running_loop().time()
        await asyncio.to_thread(self._write_record, job)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Read the records a previous run left, queue again what it did not finish, and
        start the runner."""
        self.jobs = await asyncio.to_thread(self._load)
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="enrollments")
        waiting = sum(j.state == "queued" for j in self.jobs.values())
        if waiting:
            log.info("%d browser enrollment(s) queued from before the last stop", waiting)

    def _load(self) -> dict[str, Job]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for partial in self.folder.glob("*.part"):  # uploads cut off by the last stop
            partial.unlink(missing_ok=True)
        for staging in self.store.sweep_staging():  # bundles a killed training was writing
            log.info("removed %s, left by an enrollment that was killed while writing its identity", staging)
        jobs = {}
        for path in self.folder.glob("*.json"):
            try:
                job = Job.from_record(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, IdentityError) as e:
                log.warning("ignoring enrollment record %s: %s", path.name, e)
                continue
            if job.state not in FINAL:
                self._requeue(job)
            jobs[job.id] = job
        self._prune(jobs)
        return dict(sorted(jobs.items(), key=lambda item: item[1].created_at))

    def _requeue(self, job: Job) -> None:
        if not self.upload_path(job.id).is_file():
            job.state, job.error, job.finished_at = "failed", "the recording was lost while the server was stopped", now()
        elif job.state == "running":
            job.state, job.stage = "queued", "interrupted"  # its checkpoint resumes the training
        self._write_record(job)

    def _prune(self, jobs: dict[str, Job]) -> None:
        finished = sorted((j for j in jobs.values() if j.state in FINAL), key=lambda j: j.created_at)
        for job in finished[:max(0, len(finished) - MAX_RECORDS)]:
            for path in (self.record_path(job.id), self.log_path(job.id), self.upload_path(job.id)):
                path.unlink(missing_ok=True)
            del jobs[job.id]

    async def close(self) -> None:
        """Stop: a running training is told to stop (it saves its checkpoint) and its job
        stays queued for the next start."""
        self.closed = True
        self._notify()
        self._wake.set()
        await self._stop_worker()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._runner, STOP_TIMEOUT)

    # ---- admission -----------------------------------------------------------------------
    def check_free(self, name: str) -> None:
        """Refused (409) if the identity exists or is being enrolled: enrollment never
        replaces an identity (issue #15)."""
        if self.store.exists(name):
            raise Refused(409, "identity_exists", f"an identity named {name!r} exists already; choose another name "
                                                  "(enrollment never replaces an identity)")
        if name in self.uploading or any(j.name == name and j.state not in FINAL for j in self.jobs.values()):
            raise Refused(409, "name_pending", f"{name!r} is being enrolled already")

    def reserve(self, name: str) -> str:
        """Hold `name` while its recording arrives; the new job's id. Refused: the name is
        not free (409), the queue is full now (503: the recording is not worth sending). No
        await: check and reserve at once."""
        self.check_free(name)
        self._check_room()
        self.uploading.add(name)
        return secrets.token_hex(JOB_ID_LENGTH // 2)

    def claim(self, name: str) -> None:
        """A queue place for the reserved `name`, once its recording has arrived (Refused 503
        if none is left): an upload still arriving holds none, or clients sending slowly
        would hold them all for as long as they liked."""
        self._check_room()
        self.claimed.add(name)

    def _check_room(self) -> None:
        waiting = len(self.claimed) + sum(j.state == "queued" for j in self.jobs.values())
        if waiting >= self.config.enroll_queue:
            raise Refused(503, "queue_full", f"{waiting} enrollments are waiting already (the limit); try again "
                                             "in a few minutes", **{"Retry-After": "300"})

    def release(self, name: str) -> None:
        self.uploading.discard(name)
        self.claimed.discard(name)

    async def submit(self, job: Job) -> None:
        """Queue a job whose recording is in place (upload_path) and checked."""
        self.jobs[job.id] = job
        await self._save(job)
        self._notify()
        self._wake.set()

    # ---- queries -------------------------------------------------------------------------
    def find(self, job_id: str, owner: str) -> Job | None:
        """The job, if `owner` made it (no answer tells another token that it exists)."""
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None or not hmac.compare_digest(job.owner, owner):
            return None
        return job

    def owned(self, owner: str) -> list[Job]:
        return [j for j in self.jobs.values() if hmac.compare_digest(j.owner, owner)]

    def describe(self, job: Job) -> dict:
        """The job for its owner, with its place in the queue (1: next) while it waits."""
        info = job.public()
        if job.state == "queued":
            queued = [j for j in self.jobs.values() if j.state == "queued"]
            info["position"] = queued.index(job) + 1
        return info

    async def watch(self, job: Job, heartbeat: float):
        """Yield the job's description whenever it changes, None after `heartbeat` seconds
        without a change; end once the job has ended (after saying so) or the server stops."""
        last = None
        while True:
            changed = self._changed  # taken before looking, so no change is missed
            info = self.describe(job)
            if info != last:
                yield info
                last = info
            if job.state in FINAL or self.closed:
                return
            try:
                await asyncio.wait_for(changed.wait(), heartbeat)
            except asyncio.TimeoutError:
                yield None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- cancel --------------------------------------------------------------------------
    async def cancel(self, job: Job) -> None:
        """Cancel a queued or running job (Refused 409 once it has ended)."""
        if job.state in FINAL:
            raise Refused(409, "finished", f"the enrollment has ended already ({job.state})")
        if job.state == "queued":
            await self._finish(job, "cancelled", None)
            return
        self._cancelling.add(job.id)
        await self._stop_worker()
        while job.state not in FINAL and not self.closed:
            await self._wait_change(1.0)

    async def _wait_change(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ---- the runner ----------------------------------------------------------------------
    async def _run(self) -> None:
        while not self.closed:
            job = next((j for j in self.jobs.values() if j.state == "queued"), None)
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._train(job)
            except Exception:
                log.exception("enrollment %s failed in the server", job.id[:8])
                if job.state not in FINAL:
                    await self._finish(job, "failed", "internal error (logged on the server)")

    def _refusal(self, job: Job) -> str | None:
        """Why a queued job may no longer run: its consent lapsed or its name was taken."""
        try:
            Consent.from_dict(job.consent).check("enrollment")
        except IdentityError as e:
            return str(e)
        if self.store.exists(job.name):
            return f"an identity named {job.name!r} was created meanwhile"
        return None

    async def _train(self, job: Job) -> None:
        problem = self._refusal(job)
        if problem:
            await self._finish(job, "failed", problem)
            return
        try:
            job.audit_use = await self.audit.start("enroll", job.who, job.name, address=job.address)
        except Exception as e:  # a use that cannot be recorded does not happen
            log.error("audit log: cannot record enrollment %s: %s", job.id[:8], e)
            await self._finish(job, "failed", "the server cannot record the enrollment in its audit log")
            return
        job.state, job.started_at, job.error = "running", now(), None
        job.attempts += 1
        await self._save(job)
        self._notify()
        result = await self._run_worker(job)
        if job.id in self._cancelling:
            await self._finish(job, "cancelled", None, worked=True)
        elif result.get("result") == "done":
            summary = result.get("summary") if isinstance(result.get("summary"), dict) else {}
            log.info("enrollment %s trained %s steps in %s s (stopped by %s), %s s in all", job.id[:8],
                     summary.get("steps"), summary.get("train_seconds"), summary.get("stopped"),
                     summary.get("total_seconds"))
            await self._finish(job, "done", None)
        elif self.closed:  # stopped with the server: queued again at the next start
            job.state, job.stage = "queued", "interrupted"
            await self._save(job)
            await self.audit.end(job.audit_use, None, "abnormal", "server stopped; the enrollment resumes at its next start")
        else:
            await self._finish(job, "failed", result.get("error") or "training stopped unexpectedly", worked=True)

    def _spec(self, job: Job) -> dict:
        return {"identities_root": str(self.store.root), "video": str(self.upload_path(job.id)), "name": job.name,
                "display_name": job.display_name, "consent": job.consent, "preset": self.config.enroll_preset,
                "steps": self.config.enroll_steps, "max_frames": TRAIN_MAX_FRAMES, "frames": job.frames,
                "threads": self.config.enroll_threads, "max_memory": self.config.enroll_max_memory,
                "audit_use": job.audit_use}

    def _worker_env(self) -> dict:
        threads = str(self.config.enroll_threads)
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
                "PYTHONUNBUFFERED": "1"}

    async def _run_worker(self, job: Job) -> dict:
        """Run the training child to its end; its final message ({"result": ...}), or {} if
        it died without one or never started (the server is stopping)."""
        if self.closed:
            return {}
        with open_log(self.log_path(job.id)) as log_file:
            # Its own session: a Ctrl-C at the server's terminal is the server's to handle.
            self._process = proc = await asyncio.create_subprocess_exec(
                *self.command, "train", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_file, env=self._worker_env(), start_new_session=True)
        try:
            if self.closed or job.id in self._cancelling:  # stopped or cancelled while it started
                await self._stop_worker()
            result = await self._read_worker(proc, job)
        except asyncio.CancelledError:  # the server gave up waiting for it: never leave a training behind
            proc.kill()
            raise
        finally:
            # Not killed otherwise, even when its output has ended: a kill polls the process,
            # and reaping it there races asyncio's child watcher (a bogus exit code 255).
            code = await proc.wait()
            self._process = None
        if code != 0 and not result:
            log.error("enrollment %s: worker exited with %s (log: %s)", job.id[:8], code, self.log_path(job.id))
        return result

    async def _read_worker(self, proc: asyncio.subprocess.Process, job: Job) -> dict:
        """Send the job's spec, then follow its progress lines to the end; its result."""
        result: dict = {}
        try:
            proc.stdin.write(json.dumps(self._spec(job)).encode())
            await proc.stdin.drain()
            proc.stdin.close()
            async for line in proc.stdout:
                message = parse_line(line)
                if "result" in message:
                    result = message
                elif message:
                    await self._progress(job, message)
        except (ValueError, ConnectionError) as e:  # a line past the reader's limit, a broken pipe
            log.warning("enrollment %s: worker output unusable (%s)", job.id[:8], e)
            await self._stop_worker()
        return result

    async def _progress(self, job: Job, message: dict) -> None:
        job.stage = message["stage"]
        job.done, job.total, job.fraction, job.eta = message["done"], message["total"], message["fraction"], message["eta"]
        self._notify()
        if asyncio.get_running_loop().time() - self._saved_at.get(job.id, 0.0) > SAVE_INTERVAL:
            await self._save(job)

    async def _stop_worker(self) -> None:
        """Ask the training child to stop (SIGTERM: it saves its checkpoint); kill it if it
        has not ended after STOP_TIMEOUT."""
        proc = self._process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _finish(self, job: Job, state: str, error: str | None, worked: bool = False) -> None:
        """End a job: its recording goes; so does its checkpoint if it will never resume
        (`worked`: its worker ran, so a checkpoint may exist). On record before anyone is
        told it ended."""
        self.upload_path(job.id).unlink(missing_ok=True)
        if worked and state != "done":
            await asyncio.to_thread(shutil.rmtree, self.store.work_dir(job.name), True)
        if job.audit_use is not None and job.state == "running":
            await self.audit.end(job.audit_use, None, "error" if state == "failed" else "ok", error or state)
        job.state, job.error, job.finished_at, job.eta = state, error, now(), None
        if state == "done":
            job.fraction = 1.0
        await self._save(job)
        self._cancelling.discard(job.id)
        self._notify()
        log.info("enrollment %s of %r: %s%s", job.id[:8], job.name, state, f" ({error})" if error else "")


def open_log(path: Path):
    """A worker's log, for this server's user only (it names the person being enrolled)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # one an earlier version made, resumed, may be 0644
    return os.fdopen(fd, "wb")


def parse_line(line: bytes) -> dict:
    """A worker message: a result, or a progress line with checked fields; {} otherwise."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(message, dict):
        return {}
    if "result" in message:
        return message
    stage, done, total = message.get("stage"), message.get("done"), message.get("total")
    fraction, eta = message.get("fraction"), message.get("eta")
    if stage not in STAGES or not isinstance(done, int) or not (total is None or isinstance(total, int)):
        return {}
    if not isinstance(fraction, (int, float)) or not (eta is None or isinstance(eta, (int, float))):
        return {}
    return {"stage": stage, "done": done, "total": total, "fraction": min(1.0, max(0.0, float(fraction))),
            "eta": eta}


async def probe_upload(path: Path, command: list[str] | None = None) -> dict:
    """The probe's verdict on a recording (server/enroll/worker.py probe), run as a child:
    {"ok": True, facts...} or {"ok": False, "status", "error"}."""
    proc = await asyncio.create_subprocess_exec(
        *(command or WORKER), "probe", str(path), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "status": 415, "error": "the recording took too long to read"}
    try:
        verdict = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        verdict = None
    if not isinstance(verdict, dict) or "ok" not in verdict:
        log.warning("probe of %s ended with %s and no verdict", path.name, proc.returncode)
        return {"ok": False, "status": 415, "error": "the recording cannot be read"}
    return verdict
