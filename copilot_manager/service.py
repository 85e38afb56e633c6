"""Protocol v1 over HTTP (docs/COPILOT.md): the agents' endpoints, the submitters' and
operators' endpoints, and health. The process holds no state: the queue is in Redis,
outputs in the output store, so several managers may serve one Redis.

Every body is size-bounded; every error is `{"error": "one line saying what to do"}`.
Upload URLs and manager-served input URLs are built from the address the agent itself
used (or --public-url), so an agent behind NAT or in a VM gets addresses it can reach.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from copilot_manager.adapters import Adapter
from copilot_manager.auth import Tokens
from copilot_manager.errors import ApiError, ManagerError
from copilot_manager.jobs import API, SHA256_RE, parse_jobs, parse_resources
from copilot_manager.outputs import OutputStore, discard, input_key, output_key
from copilot_manager.queue import RedisQueue

JSON_LIMIT = 1 << 20
SUBMIT_LIMIT = 64 << 20
IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Settings:
    max_upload: int = 4 << 30
    retry_after_s: int = 5
    redirect: str | None = None  # answer agents with 307 to this manager instead
    public_url: str | None = None


class Service:
    def __init__(
        self,
        queue: RedisQueue,
        adapter: Adapter,
        tokens: Tokens,
        store: OutputStore,
        settings: Settings | None = None,
    ):
        self.queue, self.adapter, self.tokens, self.store = queue, adapter, tokens, store
        self.settings = settings or Settings()

    # -- helpers ------------------------------------------------------------------------

    def _base(self, request: Request) -> str:
        return (self.settings.public_url or str(request.base_url)).rstrip("/")

    async def _body(self, request: Request, limit: int = JSON_LIMIT) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes")
        try:
            return json.loads(body) if body else {}
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON ({exc})") from exc

    async def _object(self, request: Request, limit: int = JSON_LIMIT) -> dict[str, Any]:
        value = await self._body(request, limit)
        if not isinstance(value, dict):
            raise ApiError(400, "request body must be a JSON object")
        return value

    @staticmethod
    def _job_id(request: Request) -> str:
        job_id = str(request.path_params["id"])
        if not job_id.isdigit():
            raise ApiError(404, f"no job {job_id!r}: job ids are numbers")
        return job_id

    @staticmethod
    def _lease(value: object) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= 64:
            raise ApiError(400, 'give the lease you were handed: {"lease": "L", ...}')
        return value

    @staticmethod
    def _gone(job_id: str) -> ApiError:
        return ApiError(
            409,
            f"job {job_id}: your lease is no longer current (it expired and the job went "
            "back to the queue, or it was cancelled); stop the job and ask for another",
        )

    # -- agents -------------------------------------------------------------------------

    async def get_job(self, request: Request) -> Response:
        self.tokens.check(request.headers.get("authorization"), "agent")
        body = await self._object(request)
        agent = body.get("agent")
        if not (isinstance(agent, str) and 0 < len(agent) <= 128):
            raise ApiError(400, 'name the agent: {"agent": "NAME", "resources": {...}}')
        resources = body.get("resources", {})
        if not isinstance(resources, dict):
            raise ApiError(400, '"resources" must be an object: cpus, memory_mb, disk_mb')
        try:
            offered = parse_resources(resources, "resources")
        except ManagerError as exc:
            raise ApiError(400, str(exc)) from exc
        leased = await self.adapter.get_job(agent, offered)
        if leased is None:
            headers = {"Retry-After": str(self.settings.retry_after_s)}
            return Response(status_code=204, headers=headers)
        job = dict(leased.spec)
        base = self._base(request)
        job["inputs"] = [
            {**i, "url": i.get("url") or f"{base}{API}/inputs/{i['sha256']}"} for i in job["inputs"]
        ]
        job = {"id": leased.id, **job, "attempt": leased.attempts}
        lease = {"id": leased.lease, "expires_in_s": leased.lease_s}
        return JSONResponse({"job": job, "lease": lease})

    async def heartbeat(self, request: Request) -> Response:
        self.tokens.check(request.headers.get("authorization"), "agent")
        job_id = self._job_id(request)
        body = await self._object(request)
        progress = body.get("progress")
        if progress is not None and not (
            isinstance(progress, int | float) and math.isfinite(progress) and 0 <= progress <= 1
        ):
            raise ApiError(400, '"progress" must be a number from 0 to 1')
        renewed = await self.queue.heartbeat(
            job_id, self._lease(body.get("lease")), None if progress is None else float(progress)
        )
        if renewed is None:
            raise self._gone(job_id)
        return JSONResponse({"expires_in_s": renewed})

    async def output_location(self, request: Request) -> Response:
        self.tokens.check(request.headers.get("authorization"), "agent")
        job_id = self._job_id(request)
        body = await self._object(request)
        names = await self.adapter.output_location(job_id, self._lease(body.get("lease")))
        if names is None:
            raise self._gone(job_id)
        base = f"{self._base(request)}{API}/jobs/{job_id}/outputs"
        return JSONResponse({"uploads": [{"name": n, "url": f"{base}/{n}"} for n in names]})

    async def upload_output(self, request: Request) -> Response:
        # The lease (random, handed only to the agent) is the capability; a token, if
        # the agent sends one, must be an agent's.
        if request.headers.get("authorization"):
            self.tokens.check(request.headers.get("authorization"), "agent")
        job_id, name = self._job_id(request), str(request.path_params["name"])
        lease = self._lease(request.headers.get("x-copilot-lease"))
        spec = await self.queue.current_spec(job_id, lease)
        if spec is None:
            raise self._gone(job_id)
        if name not in spec["outputs"]:
            raise ApiError(400, f"{name!r} is not an output of job {job_id}")
        key = output_key(job_id, lease, name)
        sha, size = await self._receive(request, key)
        if not await self.queue.record_upload(job_id, lease, name, sha, size):
            await run_in_threadpool(self.store.delete, key)
            raise self._gone(job_id)
        return JSONResponse({"name": name, "sha256": sha, "size": size}, 201)

    async def _receive(self, request: Request, key: str) -> tuple[str, int]:
        """Stream an upload to a staging file, check its length and hash, then commit it
        under key; a cut or mismatched upload stores nothing."""
        sha = request.headers.get("x-content-sha256", "")
        if not SHA256_RE.fullmatch(sha):
            raise ApiError(400, "send X-Content-SHA256: the 64 lower-case hex digits")
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            raise ApiError(411, "send Content-Length: the upload's size in bytes")
        if int(declared) > self.settings.max_upload:
            raise ApiError(413, f"upload over the manager's limit of {self.settings.max_upload}")
        digest, size = hashlib.sha256(), 0
        staged = self.store.staging()
        try:
            with staged:
                try:
                    async for part in request.stream():
                        digest.update(part)
                        size += len(part)
                        staged.write(part)
                except ClientDisconnect:
                    pass
            if size != int(declared):
                raise ApiError(400, f"upload cut short: {size} of {declared} bytes; send it again")
            if digest.hexdigest() != sha:
                raise ApiError(400, "the bytes do not match X-Content-SHA256; nothing stored")
            await run_in_threadpool(self.store.commit, staged.name, key)
        finally:
            discard(staged.name)
        return sha, size

    async def done(self, request: Request) -> Response:
        self.tokens.check(request.headers.get("authorization"), "agent")
        job_id = self._job_id(request)
        body = await self._object(request)
        lease, exit_code = self._lease(body.get("lease")), body.get("exit_code")
        outputs, message = body.get("outputs", {}), body.get("message", "")
        if type(exit_code) is not int or not -(1 << 31) <= exit_code < 1 << 31:
            raise ApiError(400, '"exit_code" must be a whole number')
        if not isinstance(outputs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in outputs.items()
        ):
            raise ApiError(400, '"outputs" maps output names to their sha256')
        if not isinstance(message, str):
            raise ApiError(400, '"message" must be a string')
        finished = await self.adapter.job_done(job_id, lease, exit_code, outputs, message[:4096])
        if finished is None:
            raise self._gone(job_id)
        for stale_lease, name in finished.stale_uploads:
            await run_in_threadpool(self.store.delete, output_key(job_id, stale_lease, name))
        return JSONResponse({"state": finished.state})

    # -- submitters and operators ---------------------------------------------------------

    def _submitter(self, request: Request) -> None:
        self.tokens.check(request.headers.get("authorization"), "submitter")

    async def submit(self, request: Request) -> Response:
        self._submitter(request)
        try:
            specs = parse_jobs(await self._body(request, SUBMIT_LIMIT))
        except ManagerError as exc:
            raise ApiError(400, str(exc)) from exc
        for spec in specs:
            for item in spec.inputs:
                if item.url is None and not await run_in_threadpool(
                    self.store.exists, input_key(item.sha256)
                ):
                    raise ApiError(
                        400,
                        f"input {item.name!r}: the manager has no file with sha256 "
                        f"{item.sha256}; upload it first (PUT {API}/inputs/SHA256) or give a url",
                    )
        key = request.headers.get("idempotency-key", "")
        if key and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise ApiError(400, "Idempotency-Key: 1 to 128 letters, digits, '-' or '_'")
        submitted = await self.queue.submit(specs, key)
        if submitted is None:
            raise ApiError(
                409, f"Idempotency-Key {key} was used for other jobs; use a new key per submission"
            )
        return JSONResponse({"ids": submitted.ids}, 201 if submitted.first_time else 200)

    async def upload_input(self, request: Request) -> Response:
        self._submitter(request)
        sha = str(request.path_params["sha"])
        if request.headers.get("x-content-sha256") != sha:
            raise ApiError(400, "X-Content-SHA256 must be the SHA-256 in the URL")
        _, size = await self._receive(request, input_key(sha))
        return JSONResponse({"sha256": sha, "size": size}, 201)

    async def get_input(self, request: Request) -> Response:
        # No token: the SHA-256 in the URL is what the agent knows from its job.
        sha = str(request.path_params["sha"])
        if not SHA256_RE.fullmatch(sha):
            raise ApiError(404, "inputs are named by their SHA-256")
        return await self._stream(input_key(sha), f"no input with sha256 {sha}")

    async def _stream(self, key: str, missing: str) -> Response:
        chunks = await run_in_threadpool(self.store.read, key)
        if chunks is None:
            raise ApiError(404, missing)
        return StreamingResponse(
            iterate_in_threadpool(chunks), media_type="application/octet-stream"
        )

    async def show(self, request: Request) -> Response:
        self._submitter(request)
        job_id = self._job_id(request)
        job = await self.queue.show(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id} (see `copilot-manager status`)")
        job.pop("output_lease")
        return JSONResponse(job)

    async def get_output(self, request: Request) -> Response:
        self._submitter(request)
        job_id, name = self._job_id(request), str(request.path_params["name"])
        job = await self.queue.show(job_id)
        if job is None or name not in job["outputs"]:
            raise ApiError(404, f"job {job_id} has no stored output {name!r}")
        key = output_key(job_id, job["output_lease"], name)
        return await self._stream(key, f"output {name!r} of job {job_id} is missing from the store")

    async def requeue(self, request: Request) -> Response:
        self._submitter(request)
        job_id = self._job_id(request)
        before = await self.queue.requeue(job_id)
        if before == "missing":
            raise ApiError(404, f"no job {job_id}")
        if before == "done":
            raise ApiError(409, f"job {job_id} is done; submit it again to run it again")
        return JSONResponse({"id": job_id, "state": "queued", "was": before})

    async def cancel(self, request: Request) -> Response:
        self._submitter(request)
        job_id = self._job_id(request)
        before = await self.queue.cancel(job_id)
        if before == "missing":
            raise ApiError(404, f"no job {job_id}")
        if before not in ("queued", "running"):
            raise ApiError(409, f"job {job_id} is already {before}")
        return JSONResponse({"id": job_id, "state": "cancelled", "was": before})

    async def status(self, request: Request) -> Response:
        self._submitter(request)
        return JSONResponse(await self.queue.status())

    async def health(self, request: Request) -> Response:
        try:
            await self.queue.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            return JSONResponse({"error": f"Redis does not answer: {exc}"}, 503)
        return JSONResponse({"redis": "ok"})

    # -- routing ------------------------------------------------------------------------

    def _guarded(self, handler: Handler, doing: str, agent: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            response = await answer(request)
            # The time spent in the manager, apart from the network and the client's own
            # scheduling: what an operator (and the benchmark) compares with the latency
            # agents see.
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.headers["Server-Timing"] = f"app;dur={elapsed_ms:.2f}"
            return response

        async def answer(request: Request) -> Response:
            if agent and self.settings.redirect:
                target = self.settings.redirect.rstrip("/") + request.url.path
                return RedirectResponse(target, status_code=307)
            try:
                return await handler(request)
            except ApiError as exc:
                return JSONResponse({"error": str(exc)}, exc.status)
            except ClientDisconnect:
                return Response(status_code=400)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                return JSONResponse(
                    {"error": f"the manager's Redis does not answer ({exc}); retry later"}, 503
                )
            except Exception as exc:
                reference = secrets.token_hex(4)
                log.error("unexpected error %s while %s", reference, doing, exc_info=exc)
                text = f"unexpected error while {doing} ({type(exc).__name__}); see {reference}"
                return JSONResponse({"error": text + " in the manager's log"}, 500)

        return endpoint

    def routes(self) -> list[Route]:
        j = f"{API}/jobs"
        table: list[tuple[str, Handler, str, str, bool]] = [
            (f"{j}/get", self.get_job, "POST", "handing out a job", True),
            (f"{j}/{{id}}/heartbeat", self.heartbeat, "POST", "renewing a lease", True),
            (f"{j}/{{id}}/output-location", self.output_location, "POST", "placing outputs", True),
            (f"{j}/{{id}}/outputs/{{name}}", self.upload_output, "PUT", "storing an output", True),
            (f"{j}/{{id}}/done", self.done, "POST", "recording a job's end", True),
            (j, self.submit, "POST", "submitting jobs", False),
            (f"{j}/{{id}}", self.show, "GET", "showing a job", False),
            (f"{j}/{{id}}/outputs/{{name}}", self.get_output, "GET", "reading an output", False),
            (f"{j}/{{id}}/requeue", self.requeue, "POST", "requeueing a job", False),
            (f"{j}/{{id}}/cancel", self.cancel, "POST", "cancelling a job", False),
            (f"{API}/inputs/{{sha}}", self.upload_input, "PUT", "storing an input", False),
            (f"{API}/inputs/{{sha}}", self.get_input, "GET", "serving an input", False),
            (f"{API}/status", self.status, "GET", "reporting status", False),
            (f"{API}/health", self.health, "GET", "checking health", False),
        ]
        return [
            Route(path, self._guarded(handler, doing, agent), methods=[method])
            for path, handler, method, doing, agent in table
        ]

    def app(self) -> Starlette:
        async def not_found(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            text = "no such endpoint or method (protocol v1: docs/COPILOT.md)"
            return JSONResponse({"error": text}, status)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await self.queue.close()

        return Starlette(
            routes=self.routes(),
            exception_handlers={404: not_found, 405: not_found},
            lifespan=lifespan,
        )
