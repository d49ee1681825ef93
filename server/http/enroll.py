"""Browser enrollment over HTTP (docs/PROTOCOL.md, "Enrollment"): the enroll page uploads a
self-scan with the consent its subject accepted, and follows the training.

    GET    /enrollments               this token's jobs, and the limits an upload must keep
    POST   /enrollments               multipart/form-data: the fields, then the recording -> 201, the job
    GET    /enrollments/{id}          the job
    GET    /enrollments/{id}/events   Server-Sent Events: the job at each change, until it ends
    DELETE /enrollments/{id}          cancel it

Who: a presenter token whose allow list holds the name (or '*'), from `Authorization:
Bearer` or `?token=` (EventSource cannot send headers); in demo mode a loopback client.
Only the token that made a job sees or cancels it. Errors are JSON {"error": code,
"message": text}.

The recording is streamed to disk in chunks, never held in memory and never past
enroll_max_bytes, under a name the server picks; every field is checked, and the name
reserved, before the first byte of it is accepted. The body must keep a pace
(enroll_min_rate, enroll_idle_timeout) and each client address may send only
enroll_uploads_per_address at once; an upload takes a queue place only once its recording
has arrived, so slow senders cannot hold the queue. A child process then reads it
(server/enroll/worker.py probe: container, codec, frame size, duration; sound is optional,
and the job says whether it has any) before the job is queued (server/enroll/queue.py).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import os
import re
import shutil

from aiohttp import BodyPartReader, ClientError, web
from aiohttp.http_exceptions import HttpProcessingError

from engines.identity import USES, Consent, IdentityError, check_label, check_name
from ..enroll.worker import MAX_SECONDS, MIN_SECONDS
from ..enroll.queue import Enrollments, Job, Refused, enrollments_dir, now, owner_digest, probe_upload
from ..security import identity_allowed, is_loopback

log = logging.getLogger("avatar.enroll_http")

ENROLLMENTS = web.AppKey("enrollments", Enrollments)
FIELDS = {"name": 63, "display_name": 100, "subject": 200, "statement": 4000, "accepted": 10}
REQUIRED = ("name", "subject", "statement", "accepted")
FORM_OVERHEAD = 64 * 1024  # the fields and multipart framing around the recording
CHUNK = 256 * 1024
WRITE_BATCH = 4 * 1024 * 1024  # bytes gathered before one write on a worker thread
MAX_STREAMS = 64  # open progress streams, all clients together
HEARTBEAT = 15.0
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # newlines and tabs are fine in a statement
# How aiohttp says a form is broken or its sender went away mid-body.
BROKEN_BODY = (ValueError, AssertionError, KeyError, ConnectionError, ClientError, HttpProcessingError,
               asyncio.IncompleteReadError)


def add_routes(app: web.Application, state_key, token_of) -> None:
    """The routes, and the queue's start and stop with the app. token_of(request): the
    request's token (app.bearer_token)."""
    http = Endpoints(state_key, token_of)
    app.router.add_get("/enrollments", http.overview)
    app.router.add_post("/enrollments", http.create)
    app.router.add_get("/enrollments/{id}", http.get)
    app.router.add_get("/enrollments/{id}/events", http.events)
    app.router.add_delete("/enrollments/{id}", http.cancel)

    state = app[state_key]
    app[ENROLLMENTS] = Enrollments(enrollments_dir(state.config), state.store, state.audit, state.config)

    async def start(app: web.Application) -> None:
        await app[ENROLLMENTS].start()

    async def stop(app: web.Application) -> None:
        await app[ENROLLMENTS].close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)


def enabled(config) -> bool:
    """browser_enrollment: on or off as set; unset, on in demo mode only."""
    if config.browser_enrollment is not None:
        return config.browser_enrollment
    return not (config.tokens or config.viewer_tokens)


def refusals(route):
    """A route whose Refused becomes its JSON error; the connection closes if the request's
    body was left unread (an upload refused early is not worth receiving)."""
    @functools.wraps(route)
    async def answer(self, request: web.Request) -> web.StreamResponse:
        try:
            return await route(self, request)
        except Refused as e:
            response = web.json_response({"error": e.code, "message": str(e)}, status=e.status, headers=e.headers)
            if request.body_exists and not request.content.at_eof():
                response.force_close()
            return response
    return answer


class Endpoints:
    def __init__(self, state_key, token_of):
        self.key, self.token_of = state_key, token_of
        self.streams = 0
        self.uploads: collections.Counter[str] = collections.Counter()  # client address -> uploads arriving

    # ---- who -----------------------------------------------------------------------------
    def _allow(self, request: web.Request):
        """(presenter allow list, token) of the request (token None in demo mode); Refused otherwise."""
        state = request.app[self.key]
        if not enabled(state.config):
            raise Refused(403, "disabled", "browser enrollment is turned off on this server "
                                           "(avatar serve --browser-enrollment turns it on)")
        address = request.remote or "unknown"
        if state.auth.demo_mode and not is_loopback(address):
            raise Refused(403, "forbidden", "in demo mode only this machine may enroll")
        if state.addresses.auth_blocked(address):
            raise Refused(429, "rate_limited", "too many wrong tokens from this address; wait a little",
                          **{"Retry-After": "10"})
        token = self.token_of(request)
        allow = state.auth.allowed(token)
        if allow is None:
            if state.auth.role(token) == "viewer":
                raise Refused(403, "forbidden", "a viewer token cannot enroll; use a presenter token")
            state.addresses.auth_failed(address)
            state.metrics.reject("unauthorized")
            raise Refused(401, "unauthorized", "missing or invalid token", **{"WWW-Authenticate": "Bearer"})
        return allow, None if state.auth.demo_mode else token

    def _job(self, request: web.Request) -> Job:
        _, token = self._allow(request)
        job = request.app[ENROLLMENTS].find(request.match_info["id"], owner_digest(token))
        if job is None:
            raise Refused(404, "not_found", "no such enrollment (or it is not yours)")
        return job

    # ---- routes --------------------------------------------------------------------------
    @refusals
    async def overview(self, request: web.Request) -> web.Response:
        allow, token = self._allow(request)
        queue = request.app[ENROLLMENTS]
        config = request.app[self.key].config
        answer = {"jobs": [queue.describe(j) for j in queue.owned(owner_digest(token))],
                  "limits": {"max_bytes": config.enroll_max_bytes, "min_seconds": MIN_SECONDS,
                             "max_seconds": MAX_SECONDS, "min_rate": config.enroll_min_rate,
                             "preset": config.enroll_preset, "scope": list(USES)}}
        if "name" in request.query:  # before recording: will this name be accepted?
            answer["name"] = name_verdict(queue, allow, request.query["name"])
        return web.json_response(answer)

    @refusals
    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(request.app[ENROLLMENTS].describe(self._job(request)))

    @refusals
    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        await request.app[ENROLLMENTS].cancel(job)
        return web.json_response(request.app[ENROLLMENTS].describe(job))

    @refusals
    async def events(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        if self.streams >= MAX_STREAMS:
            raise Refused(503, "busy", "too many progress streams are open; poll GET /enrollments/{id}",
                          **{"Retry-After": "5"})
        self.streams += 1
        try:
            return await self._stream(request, job)
        finally:
            self.streams -= 1

    async def _stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        try:
            async for info in request.app[ENROLLMENTS].watch(job, HEARTBEAT):
                await response.write(b": keep-alive\n\n" if info is None else sse(info))
        except ConnectionError:  # the page went away
            pass
        return response

    @refusals
    async def create(self, request: web.Request) -> web.Response:
        state = request.app[self.key]
        allow, token = self._allow(request)
        check_upload_request(request, state.config.enroll_max_bytes)
        address = request.remote or "unknown"
        limit = state.config.enroll_uploads_per_address
        if self.uploads[address] >= limit:
            raise Refused(429, "too_many_uploads", f"{limit} uploads from this address are arriving already "
                                                   "(the limit); send one when they have ended",
                          **{"Retry-After": "30"})
        self.uploads[address] += 1
        try:
            return await Upload(request, state, request.app[ENROLLMENTS], allow, token).receive()
        finally:
            self.uploads[address] -= 1
            if not self.uploads[address]:
                del self.uploads[address]


def name_verdict(queue: Enrollments, allow, name: str) -> dict:
    """{"ok": true}, or {"ok": false, "error", "message"}: what POST would say of the name."""
    try:
        check_identity_name(name, allow)
        queue.check_free(name)
    except Refused as e:
        return {"ok": False, "error": e.code, "message": str(e)}
    return {"ok": True}


def check_identity_name(name: str, allow) -> None:
    try:
        check_name(name)
    except IdentityError as e:
        raise Refused(400, "bad_name", str(e)[:200])
    if not identity_allowed(allow, name):
        raise Refused(403, "forbidden_identity", f"this token may not use the name {name!r}")


def sse(info: dict) -> bytes:
    return f"data: {json.dumps(info)}\n\n".encode()


def check_upload_request(request: web.Request, max_bytes: int) -> None:
    if request.content_type != "multipart/form-data":
        raise Refused(415, "unsupported_media", "send the enrollment as multipart/form-data")
    if request.content_length is not None and request.content_length > max_bytes + FORM_OVERHEAD:
        raise Refused(413, "too_large", f"the recording is over the limit of {max_bytes // 2**20} MB")


class BodyPace:
    """An upload's body must keep a pace: every read brings something within `idle` seconds,
    and from then on the body averages at least `min_rate` bytes a second (Refused 408
    otherwise). A client trickling its recording would otherwise hold its connection, its
    name and the server's disk for days (1 KB/s of 200 MiB: 58 hours)."""

    def __init__(self, min_rate: int, idle: float):
        self.min_rate, self.idle = min_rate, idle
        self.start = asyncio.get_running_loop().time()
        self.received = 0

    async def read(self, reading):
        """What the awaitable `reading` gives, if it comes in time."""
        try:
            data = await asyncio.wait_for(reading, self.idle)
        except asyncio.TimeoutError:
            raise Refused(408, "too_slow", f"nothing of the upload arrived for {self.idle:g} s") from None
        if isinstance(data, (bytes, bytearray)):
            self._count(len(data))
        return data

    def _count(self, size: int) -> None:
        self.received += size
        elapsed = asyncio.get_running_loop().time() - self.start
        if elapsed > self.idle and self.received < self.min_rate * elapsed:
            raise Refused(408, "too_slow", f"the upload arrives at {self.received / elapsed / 1024:.1f} KiB/s, "
                                           f"under this server's minimum of {self.min_rate / 1024:g} KiB/s")


class Upload:
    """One POST /enrollments: fields first, checked and the name reserved; then the
    recording, streamed to a file; then a queue place, its probe and the job."""

    def __init__(self, request: web.Request, state, queue: Enrollments, allow, token: str | None):
        self.request, self.state, self.queue = request, state, queue
        self.allow, self.token = allow, token
        self.fields: dict[str, str] = {}
        self.pace = BodyPace(state.config.enroll_min_rate, state.config.enroll_idle_timeout)

    async def receive(self) -> web.Response:
        try:
            part = await self._read_fields(await self.request.multipart())
        except BROKEN_BODY as e:
            raise Refused(400, "bad_form", f"cannot read the form ({str(e)[:100]})")
        consent = self._consent()
        name = self.fields["name"]
        job_id = self.queue.reserve(name)
        path = self.queue.upload_path(job_id)
        try:
            self._check_space()
            size = await self._save_recording(part, path)
            self.queue.claim(name)
            facts = await probe_upload(path)
            if not facts.get("ok"):
                raise Refused(int(facts.get("status", 415)), "bad_video", str(facts.get("error"))[:300])
            job = self._new_job(job_id, consent, facts)
            await self.queue.submit(job)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            self.queue.release(name)
        log.info("enrollment %s of %r queued: %.1f s of %s, sound: %s, %d bytes", job_id[:8], name,
                 job.seconds or 0, facts.get("codec"), job.audio or "none", size)
        return web.json_response(self.queue.describe(job), status=201, headers={"Location": f"/enrollments/{job_id}"})

    def _new_job(self, job_id: str, consent: Consent, facts: dict) -> Job:
        name = self.fields["name"]
        return Job(job_id, name, self.fields.get("display_name", "").strip() or name, consent.__dict__,
                   owner_digest(self.token), self.state.who(self.token), self.request.remote or "unknown",
                   frames=facts.get("frames"), seconds=facts.get("seconds"), audio=facts.get("audio"))

    async def _read_fields(self, reader) -> BodyPartReader:
        """Read the text fields up to the recording (the part named 'video'); that part."""
        while True:
            part = await self.pace.read(reader.next())
            if part is None:
                raise Refused(400, "bad_form", "no recording: the form needs a 'video' part after its fields")
            if not isinstance(part, BodyPartReader):
                raise Refused(400, "bad_form", "nested multipart parts are not accepted")
            if part.name == "video":
                self._check_fields()
                return part
            if part.name not in FIELDS or part.name in self.fields:
                raise Refused(400, "bad_form", f"unexpected or repeated field {str(part.name)[:40]!r}")
            self.fields[part.name] = await read_text(part, FIELDS[part.name], self.pace)

    def _check_fields(self) -> None:
        missing = [f for f in REQUIRED if not self.fields.get(f, "").strip()]
        if missing:
            raise Refused(400, "bad_field", f"missing: {', '.join(missing)} (send the fields before the video)")
        check_identity_name(self.fields["name"], self.allow)
        if self.fields["accepted"] not in ("true", "on", "1", "yes"):
            raise Refused(400, "no_consent", "the subject's consent must be accepted before enrolling")
        if CONTROL.search(self.fields["statement"]):
            raise Refused(400, "bad_field", "statement has control characters")
        try:  # names people read: one line, nothing that reorders it (engines/identity.py says what)
            check_label(self.fields.get("display_name", ""), "display_name")
            check_label(self.fields["subject"], "subject")
        except IdentityError as e:
            raise Refused(400, "bad_field", str(e))

    def _consent(self) -> Consent:
        """The consent record: the statement the subject accepted on the page, all uses,
        recorded by the token that sent it; it must cover enrollment now."""
        consent = Consent(statement=self.fields["statement"].strip(), subject=self.fields["subject"].strip(),
                          recorded_by=f"browser enrollment ({self.state.who(self.token)})",
                          granted_at=now(), scope=list(USES))
        try:
            Consent.from_dict(consent.__dict__)
            consent.check("enrollment")
        except IdentityError as e:
            raise Refused(400, "bad_consent", str(e)[:300])
        return consent

    def _check_space(self) -> None:
        if shutil.disk_usage(self.queue.folder).free < 2 * self.state.config.enroll_max_bytes:
            raise Refused(507, "no_space", "the server is short of disk space for recordings; try later")

    async def _save_recording(self, part: BodyPartReader, path) -> int:
        """Stream the part to `path` (through a .part file), in batches written on a
        thread; its size. Refused past the cap, when empty, or when the body breaks off."""
        limit = self.state.config.enroll_max_bytes
        partial = path.with_name(path.name + ".part")
        size = 0
        try:
            with await asyncio.to_thread(open_private, partial) as f:
                batch = bytearray()
                while chunk := await self.pace.read(part.read_chunk(CHUNK)):
                    size += len(chunk)
                    if size > limit:
                        raise Refused(413, "too_large", f"the recording is over the limit of {limit // 2**20} MB")
                    batch += chunk
                    if len(batch) >= WRITE_BATCH:
                        await asyncio.to_thread(f.write, bytes(batch))
                        batch.clear()
                await asyncio.to_thread(f.write, bytes(batch))
            if size == 0:
                raise Refused(400, "bad_video", "the recording is empty")
            partial.rename(path)
        except BROKEN_BODY as e:
            raise Refused(400, "bad_form", f"the upload broke off ({str(e)[:100]})")
        finally:
            partial.unlink(missing_ok=True)
        return size


def open_private(path):
    """A new file only this server's user can read (a person's face and voice)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


async def read_text(part: BodyPartReader, limit: int, pace: BodyPace) -> str:
    """A text field of at most `limit` characters (UTF-8)."""
    data = bytearray()
    while chunk := await pace.read(part.read_chunk(1024)):
        data += chunk
        if len(data) > 4 * limit:
            break
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "bad_field", f"{part.name} is not UTF-8 text")
    if len(text) > limit:
        raise Refused(400, "bad_field", f"{part.name} is longer than {limit} characters")
    return text
