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
from dataclasses import dataclass, replace
from typing import cast

import zstandard
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cvmfs_format.errors import CvmfsError, FormatError
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import is_hash, verify_stored
from cvmfs_format.pack import API, MISSING_LIMIT, PACK_LIMIT, iter_pack
from cvmfs_format.store import Storage
from repo_server import operations, revisions
from repo_server.access_log import set_user
from repo_server.api_errors import ApiError, UploadRefused, answer_for, guarded, unusable_head
from repo_server.errors import RepoError
from repo_server.leases import Lease, Leases, Outcome
from repo_server.metrics import Metrics
from repo_server.repository import LocalRepository, validate_tag
from repo_server.tokens import Token, TokenStore, check_path
from repo_server.upload_check import validate_upload

INT64 = 1 << 63
DRY_RUN_LIMIT = 256 << 20  # bytes a dry-run lease holds in memory (catalogs, mostly)


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
        raw, publisher, dry_run = body.get("path"), body.get("publisher"), body.get("dry_run")
        if not isinstance(raw, str):
            raise ApiError(400, 'give the path to publish at, e.g. {"path": "/sw/1.0"}')
        if publisher is not None and not (isinstance(publisher, str) and len(publisher) <= 64):
            raise ApiError(400, "publisher: a name of up to 64 characters for this request")
        if dry_run is not None and type(dry_run) is not bool:
            raise ApiError(400, "dry_run: true or false")
        try:
            path = check_path(raw)
        except RepoError as exc:
            raise ApiError(400, str(exc)) from exc
        if not token.allows(path):
            raise ApiError(403, f"token {token.name!r} may publish only under {token.path}")
        await run_in_threadpool(self._verified_head)  # no upload for a commit that must fail
        lease = self.leases.acquire(token, path, publisher, dry_run=bool(dry_run))
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
            if lease.held is not None:  # a dry run: kept for its preview, never stored
                if sum(map(len, lease.held.values())) + len(body) > DRY_RUN_LIMIT:
                    raise ApiError(413, f"a dry run uploads at most {DRY_RUN_LIMIT} bytes")
                lease.held[digest] = bytes(body)
                stored += 1
            elif self.repo.storage.put_object(digest, bytes(body)):
                stored += 1
            else:
                existing += 1
        lease.sizes.update(sizes)
        return stored, existing

    async def commit(self, request: Request) -> Response:
        """Run the lease's one commit, or wait for the outcome of the one running. The
        commit publishes the uploaded tree, or removes or rolls back the leased path
        (docs/PUBLISHING.md, "Commit")."""
        return await self._commit(request, dry_run=False)

    async def preview(self, request: Request) -> Response:
        """A commit's dry run: what it would change and refuse; it ends the lease."""
        return await self._commit(request, dry_run=True)

    async def _commit(self, request: Request, dry_run: bool) -> Response:
        token = self._token(request)
        self.leases.check(request.path_params["lease"], token)
        ask = replace(_commit_request(await self._json(request)), dry_run=dry_run)
        lease, once, runs = self.leases.start_commit(request.path_params["lease"], token)
        if runs:
            await run_in_threadpool(self._run_commit, lease, ask)
        outcome = await run_in_threadpool(once.wait)
        return JSONResponse(outcome.body, outcome.status)

    def _run_commit(self, lease: Lease, ask: _CommitRequest) -> None:
        outcome = Outcome(500, {"error": "the commit was interrupted; publish again"})
        intent = revisions.Intent(
            ask.kind,
            lease.path,
            ask.message,
            ask.tag,
            replace=ask.replace,
            force_tag=ask.force_tag,
            everything=ask.everything,
            dry_run=ask.dry_run,
        )
        author = revisions.Author(lease.token, "api", ask.tool)
        if ask.dry_run != (lease.held is not None):
            text = (
                "a preview needs a lease opened with dry_run"
                if ask.dry_run
                else "a dry run's lease cannot commit; take a lease without dry_run"
            )
            outcome = Outcome(400, {"error": text})
            self.leases.finish_commit(lease, outcome)
            return
        # A dry run sees its uploads through a scratch overlay of the storage.
        scratch = (
            revisions.ScratchSink(self.repo.storage, lease.held) if lease.held is not None else None
        )
        storage = self.repo.storage if scratch is None else cast(Storage, scratch)
        try:
            with self.repo.lock(wait_message=False):
                head = self._verified_head()
                if ask.kind == revisions.REMOVE:
                    new = revisions.remove_path(self.repo, intent, author, scratch=scratch)
                elif ask.kind == revisions.ROLLBACK:
                    new = operations.rollback_locked(
                        self.repo,
                        ask.to,
                        author,
                        path=lease.path,
                        message=ask.message or None,
                        dry_run=ask.dry_run,
                        scratch=scratch,
                    ).result
                else:
                    subtree = validate_upload(
                        storage,
                        head,
                        lease.path,
                        ask.catalog,
                        ask.mode,
                        ask.mtime_ns,
                        lease.sizes,
                        objects=not ask.dry_run,  # a dry run uploads only its catalogs
                    )
                    new = revisions.publish_subtree(
                        self.repo,
                        subtree,
                        intent,
                        author,
                        compressor=zstandard.ZstdCompressor(level=self.compressor_level),
                        scratch=scratch,
                    )
            body: dict[str, object] = {
                "revision": new.revision,
                "new_bytes": new.new_bytes,
                "changes": new.changes.to_json(),
                "refusals": list(new.refusals),
                "dry_run": ask.dry_run,
            }
            if new.manifest is not None:
                body["root_hash"] = new.manifest.root_hash
            outcome = Outcome(200, body)
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
                f"{API}/leases/{{lease}}/preview",
                guarded(self.preview, "previewing a commit"),
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


@dataclass(frozen=True)
class _CommitRequest:
    kind: str
    message: str
    tag: str | None
    tool: str
    replace: bool
    force_tag: bool
    everything: bool
    dry_run: bool = False
    catalog: str = ""  # publish: the uploaded tree
    mode: int = 0
    mtime_ns: int = 0
    to: str = ""  # rollback: a revision number or tag


def _commit_request(body: dict[str, object]) -> _CommitRequest:
    """A commit's JSON body checked: ApiError(400) saying what is wrong."""
    kind = body.get("operation", revisions.PUBLISH)
    message, tag, tool = body.get("message", ""), body.get("tag"), body.get("tool", "unknown")
    flags = {k: body.get(k, False) for k in ("replace", "force_tag", "everything")}
    if kind not in (revisions.PUBLISH, revisions.REMOVE, revisions.ROLLBACK):
        raise ApiError(400, "operation: publish, remove or rollback")
    if not (
        isinstance(message, str)
        and (tag is None or isinstance(tag, str))
        and isinstance(tool, str)
        and len(tool) <= 100
        and all(type(v) is bool for v in flags.values())
    ):
        raise ApiError(
            400, "commit takes message, tag, tool (text) and replace, force_tag, everything "
            "(true or false)"
        )  # fmt: skip
    if not _is_utf8(message) or not _is_utf8(tool) or not tool.isprintable():
        raise ApiError(400, "the message and tool must be valid UTF-8 text")
    if tag is not None:
        try:
            validate_tag(tag)
        except RepoError as exc:
            raise ApiError(400, str(exc)) from exc
    ask = _CommitRequest(str(kind), message, tag, tool, **flags)  # type: ignore[arg-type]
    if kind == revisions.ROLLBACK:
        to = body.get("to")
        if not isinstance(to, str) or not to:
            raise ApiError(400, 'rollback needs "to": a revision number or tag')
        return replace(ask, to=to)
    if kind == revisions.REMOVE:
        return ask
    catalog, mode, mtime = body.get("catalog"), body.get("mode"), body.get("mtime_ns")
    if not (
        isinstance(catalog, str)
        and type(mode) is int
        and type(mtime) is int
        and -INT64 <= mtime < INT64
    ):
        raise ApiError(400, "commit needs catalog, mode, mtime_ns, and optionally message, tag")
    return replace(ask, catalog=catalog, mode=mode, mtime_ns=mtime)


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
