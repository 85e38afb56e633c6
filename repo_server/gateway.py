"""The publish API: token-checked leases on path prefixes, object uploads, commits.

A publisher takes a lease on its prefix (leases.py), asks which objects the repository
lacks, uploads those in packs (each object verified against its name, streamed, before
it is stored), and commits once: the gateway checks the uploaded catalogs as readers
would (upload_check.py), then grafts and signs the new revision under the repository's
publish lock. Every failure is answered with a status and a message saying what to do
(api_errors.py). Private keys never leave this process's host.
"""

from __future__ import annotations

import json
import time

import zstandard
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cvmfs_format.errors import CvmfsError, FormatError
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import is_hash, verify_stored
from cvmfs_format.pack import API, MISSING_LIMIT, PACK_LIMIT, iter_pack
from repo_server.access_log import set_user
from repo_server.api_errors import ApiError, UploadRefused, answer_for, guarded, unusable_head
from repo_server.errors import RepoError
from repo_server.leases import Lease, Leases, Outcome
from repo_server.metrics import Metrics
from repo_server.repository import LocalRepository, validate_tag
from repo_server.tokens import Token, TokenStore, check_path
from repo_server.upload_check import validate_upload

INT64 = 1 << 63


class Gateway:
    def __init__(
        self,
        repo: LocalRepository,
        tokens: TokenStore,
        leases: Leases | None = None,
        metrics: Metrics | None = None,
    ):
        self.repo = repo
        self.tokens = tokens
        self.leases = leases or Leases()
        self.metrics = metrics or Metrics()
        self.compressor_level = 4

    def _token(self, request: Request) -> Token:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "no token: pass --token-file FILE or set CVMBUILD_TOKEN")
        token = self.tokens.authenticate(value.strip())
        if token is None:
            raise ApiError(401, "token not known to this server (revoked, or a typo?)")
        set_user(request, token.name)
        return token

    async def _json(self, request: Request, limit: int = 1 << 20) -> dict[str, object]:
        body = await _read_body(request, limit)
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON ({exc})") from exc
        if not isinstance(value, dict):
            raise ApiError(400, "request body must be a JSON object")
        return value

    def _verified_head(self) -> Manifest:
        try:
            return self.repo.head()
        except CvmfsError as exc:
            raise unusable_head(exc) from exc

    # -- endpoints ------------------------------------------------------------------

    async def open_lease(self, request: Request) -> Response:
        token = self._token(request)
        body = await self._json(request)
        raw, publisher = body.get("path"), body.get("publisher")
        if not isinstance(raw, str):
            raise ApiError(400, 'give the path to publish at, e.g. {"path": "/sw/1.0"}')
        if publisher is not None and not (isinstance(publisher, str) and len(publisher) <= 64):
            raise ApiError(400, "publisher: a name of up to 64 characters for this request")
        try:
            path = check_path(raw)
        except RepoError as exc:
            raise ApiError(400, str(exc)) from exc
        if not token.allows(path):
            raise ApiError(403, f"token {token.name!r} may publish only under {token.path}")
        await run_in_threadpool(self._verified_head)  # no upload for a commit that must fail
        lease = self.leases.acquire(token, path, publisher)
        return JSONResponse({"lease": lease.id, "path": path, "ttl": self.leases.ttl}, 201)

    async def missing(self, request: Request) -> Response:
        self._token(request)
        body = await self._json(request, 128 * MISSING_LIMIT)
        digests = body.get("digests")
        if not isinstance(digests, list) or len(digests) > MISSING_LIMIT:
            raise ApiError(400, f'give up to {MISSING_LIMIT} digests as {{"digests": [...]}}')
        if not all(isinstance(d, str) and is_hash(d) for d in digests):
            raise ApiError(400, "every digest must be 64 lower-case hex digits")
        missing = await run_in_threadpool(self.repo.storage.missing, digests)
        return JSONResponse({"missing": sorted(missing)})

    async def upload(self, request: Request) -> Response:
        token = self._token(request)
        lease = self.leases.use(request.path_params["lease"], token)
        data = await _read_body(request, PACK_LIMIT + (1 << 20))
        stored, existing = await run_in_threadpool(self._store_pack, lease, data)
        self.leases.use(lease.id, token)  # a long upload keeps it alive
        return JSONResponse({"stored": stored, "existing": existing})

    def _store_pack(self, lease: Lease, data: bytearray) -> tuple[int, int]:
        """Verify every object of a pack, then store them; their content sizes are
        remembered on the lease for the commit's checks. Content is only ever held a
        piece at a time (the decompression-bomb defence)."""
        try:
            objects = list(iter_pack(data))
        except FormatError as exc:
            raise ApiError(400, str(exc)) from exc
        sizes: dict[str, int] = {}
        for digest, body in objects:
            try:
                sizes[digest] = verify_stored(body, digest)
            except CvmfsError as exc:
                raise UploadRefused(f"rejected upload: {exc}") from exc
        stored = existing = 0
        for digest, body in objects:
            if self.repo.storage.put_object(digest, bytes(body)):
                stored += 1
            else:
                existing += 1
        lease.sizes.update(sizes)
        return stored, existing

    async def commit(self, request: Request) -> Response:
        """Run the lease's one commit, or wait for the outcome of the one running."""
        token = self._token(request)
        self.leases.check(request.path_params["lease"], token)
        body = await self._json(request)
        catalog, mode, mtime = body.get("catalog"), body.get("mode"), body.get("mtime_ns")
        message, tag = body.get("message", ""), body.get("tag")
        if not (
            isinstance(catalog, str)
            and type(mode) is int
            and type(mtime) is int
            and -INT64 <= mtime < INT64
            and isinstance(message, str)
            and (tag is None or isinstance(tag, str))
        ):
            raise ApiError(400, "commit needs catalog, mode, mtime_ns, and optionally message, tag")
        if not _is_utf8(message):
            raise ApiError(400, "the message is not valid UTF-8")
        if tag is not None:
            try:
                validate_tag(tag)
            except RepoError as exc:
                raise ApiError(400, str(exc)) from exc
        lease, once, runs = self.leases.start_commit(request.path_params["lease"], token)
        if runs:
            await run_in_threadpool(self._run_commit, lease, catalog, mode, mtime, message, tag)
        outcome = await run_in_threadpool(once.wait)
        return JSONResponse(outcome.body, outcome.status)

    def _run_commit(
        self, lease: Lease, catalog: str, mode: int, mtime: int, message: str, tag: str | None
    ) -> None:
        outcome = Outcome(500, {"error": "the commit was interrupted; publish again"})
        try:
            with self.repo.lock(wait_message=False):
                head = self._verified_head()
                subtree = validate_upload(
                    self.repo.storage, head, lease.path, catalog, mode, mtime, lease.sizes
                )
                result = self.repo.commit(
                    subtree,
                    message=message,
                    tag=tag,
                    compressor=zstandard.ZstdCompressor(level=self.compressor_level),
                )
            outcome = Outcome(
                200,
                {
                    "revision": result.manifest.revision,
                    "root_hash": result.manifest.root_hash,
                    "new_bytes": result.new_bytes,
                },
            )
        except Exception as exc:
            status, text = answer_for(exc, "committing")
            outcome = Outcome(status, {"error": text})
        finally:
            self.leases.finish_commit(lease, outcome)
            done = "committed" if outcome.status == 200 else "failed"
            self.metrics.publish(time.time() - lease.since, done)

    async def renew_lease(self, request: Request) -> Response:
        self.leases.use(request.path_params["lease"], self._token(request))
        return Response(status_code=204)

    async def drop_lease(self, request: Request) -> Response:
        self.leases.use(request.path_params["lease"], self._token(request))
        self.leases.release(request.path_params["lease"])
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        return [
            Route(f"{API}/leases", guarded(self.open_lease, "granting a lease"), methods=["POST"]),
            Route(
                f"{API}/objects/missing",
                guarded(self.missing, "looking for objects"),
                methods=["POST"],
            ),
            Route(
                f"{API}/leases/{{lease}}/objects",
                guarded(self.upload, "storing uploaded objects"),
                methods=["POST"],
            ),
            Route(
                f"{API}/leases/{{lease}}/commit",
                guarded(self.commit, "committing"),
                methods=["POST"],
            ),
            Route(
                f"{API}/leases/{{lease}}/renew",
                guarded(self.renew_lease, "renewing a lease"),
                methods=["POST"],
            ),
            Route(
                f"{API}/leases/{{lease}}",
                guarded(self.drop_lease, "dropping a lease"),
                methods=["DELETE"],
            ),
        ]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        if len(body) + len(part) > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        body += part
    return body
