"""The publish API: token-checked leases on path prefixes, object uploads, commits.

A publisher takes a lease on its prefix, asks which objects the repository lacks,
uploads those in packs (each object verified against its name before it is stored),
and commits: the gateway checks that the uploaded catalogs stay inside the prefix and
that everything they name is stored, then grafts and signs the new revision under the
repository's publish lock. Private keys never leave this process's host.
"""

from __future__ import annotations

import json
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zstandard
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cvmfs_format import paths
from cvmfs_format.catalog import Catalog
from cvmfs_format.catalog_writer import StoredCatalog, Subtree
from cvmfs_format.errors import CvmfsError
from cvmfs_format.objects import decode_object, is_hash
from cvmfs_format.pack import API, MISSING_LIMIT, PACK_LIMIT, iter_pack
from repo_server.errors import RepoError
from repo_server.repository import LocalRepository
from repo_server.tokens import Token, TokenStore, check_path

LEASE_TTL_S = 120  # a lease not renewed for this long is given up (its publisher died)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Lease:
    id: str
    path: str
    token: str  # name of the token that holds it
    expires: float


class Leases:
    """Who is publishing where. Overlapping prefixes exclude each other."""

    def __init__(self, ttl: float = LEASE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = self.clock()
        for lease_id in [k for k, v in self._leases.items() if v.expires < now]:
            del self._leases[lease_id]

    def acquire(self, token: Token, path: str) -> Lease:
        with self._lock:
            self._expire()
            for other in self._leases.values():
                if paths.is_within(path, other.path) or paths.is_within(other.path, path):
                    raise ApiError(
                        409, f"{other.path} is being published by {other.token!r}; waiting"
                    )
            lease = Lease(secrets.token_hex(16), path, token.name, self.clock() + self.ttl)
            self._leases[lease.id] = lease
            return lease

    def use(self, lease_id: str, token: Token) -> Lease:
        with self._lock:
            self._expire()
            lease = self._leases.get(lease_id)
            if lease is None:
                raise ApiError(410, "lease unknown or expired; start the publish again")
            if lease.token != token.name:
                raise ApiError(403, "this lease belongs to another token")
            lease.expires = self.clock() + self.ttl
            return lease

    def release(self, lease_id: str) -> None:
        with self._lock:
            self._leases.pop(lease_id, None)


def validate_subtree(
    repo: LocalRepository, path: str, digest: str, mode: int, mtime_ns: int
) -> Subtree:
    """The uploaded catalog tree rooted at digest, checked to lie wholly inside path and
    to name only stored objects; RepoError says what is wrong."""
    if not is_hash(digest):
        raise RepoError(f"catalog {digest!r}: not an object name")
    if not stat.S_ISDIR(mode):
        raise RepoError(f"{path}: the published top must be a directory")
    storage = repo.storage
    stack, seen, needed = [digest], set(), set()
    top: StoredCatalog | None = None
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stored = storage.get_object(current)
        except FileNotFoundError as exc:
            raise RepoError(f"catalog {current} was not uploaded; publish again") from exc
        try:
            catalog = Catalog.from_bytes(decode_object(stored, current), current)
        except CvmfsError as exc:
            raise RepoError(f"uploaded catalog {current}: {exc}") from exc
        try:
            if current == digest and catalog.root != path:
                raise RepoError(f"uploaded catalog is rooted at {catalog.root}, not {path}")
            if not paths.is_within(catalog.root, path):
                raise RepoError(f"uploaded catalog {current} lies outside {path}")
            for entry in catalog.all_entries():
                if (
                    paths.normalize(entry.path) != entry.path
                    or not paths.is_within(entry.path, catalog.root)
                    or entry.path == catalog.root
                ):
                    raise RepoError(f"uploaded catalog names {entry.path!r} outside {catalog.root}")
                if entry.is_file and entry.hash is not None:
                    needed.add(entry.hash)
            needed.update(h for h, _ in catalog.all_chunk_hashes())
            for ref in catalog.nested.values():
                if not paths.is_within(ref.path, catalog.root) or ref.path == catalog.root:
                    raise RepoError(f"uploaded catalog nests {ref.path} outside {catalog.root}")
                stack.append(ref.hash)
            if current == digest:
                top = StoredCatalog(digest, len(stored), catalog.stats(), 0)
        except CvmfsError as exc:
            raise RepoError(f"uploaded catalog {current}: {exc}") from exc
        finally:
            catalog.close()
    missing = storage.missing(needed)
    if missing:
        raise RepoError(
            f"{len(missing)} objects the upload names are not stored (e.g. {min(missing)}); "
            "publish again to upload them"
        )
    assert top is not None
    return Subtree(path, top, mode, mtime_ns)


class Gateway:
    def __init__(self, repo: LocalRepository, tokens: TokenStore, leases: Leases | None = None):
        self.repo = repo
        self.tokens = tokens
        self.leases = leases or Leases()
        self.compressor_level = 4

    def _token(self, request: Request) -> Token:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "no token: pass --token-file FILE or set CVMBUILD_TOKEN")
        token = self.tokens.authenticate(value.strip())
        if token is None:
            raise ApiError(401, "token not known to this server (revoked, or a typo?)")
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

    # -- endpoints ------------------------------------------------------------------

    async def open_lease(self, request: Request) -> Response:
        token = self._token(request)
        body = await self._json(request)
        raw = body.get("path")
        if not isinstance(raw, str):
            raise ApiError(400, 'give the path to publish at, e.g. {"path": "/sw/1.0"}')
        try:
            path = check_path(raw)
        except RepoError as exc:
            raise ApiError(400, str(exc)) from exc
        if not token.allows(path):
            raise ApiError(403, f"token {token.name!r} may publish only under {token.path}")
        lease = self.leases.acquire(token, path)
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
        lease = self.leases.use(request.path_params["lease"], self._token(request))
        data = await _read_body(request, PACK_LIMIT + (1 << 20))
        stored, existing = await run_in_threadpool(self._store_pack, data)
        self.leases.use(lease.id, self._token(request))  # a long upload keeps it alive
        return JSONResponse({"stored": stored, "existing": existing})

    def _store_pack(self, data: bytes) -> tuple[int, int]:
        stored = existing = 0
        try:
            objects = list(iter_pack(data))
        except CvmfsError as exc:
            raise ApiError(400, str(exc)) from exc
        for digest, body in objects:
            try:
                decode_object(body, digest)
            except CvmfsError as exc:
                raise ApiError(422, f"rejected upload: {exc}") from exc
        for digest, body in objects:
            if self.repo.storage.put_object(digest, body):
                stored += 1
            else:
                existing += 1
        return stored, existing

    async def commit(self, request: Request) -> Response:
        token = self._token(request)
        lease = self.leases.use(request.path_params["lease"], token)
        body = await self._json(request)
        catalog, mode, mtime = body.get("catalog"), body.get("mode"), body.get("mtime_ns")
        message, tag = body.get("message", ""), body.get("tag")
        if not (
            isinstance(catalog, str)
            and isinstance(mode, int)
            and isinstance(mtime, int)
            and isinstance(message, str)
            and (tag is None or isinstance(tag, str))
        ):
            raise ApiError(400, "commit needs catalog, mode, mtime_ns, and optionally message, tag")
        try:
            result = await run_in_threadpool(
                self._commit, lease.path, catalog, mode, mtime, message, tag
            )
        finally:
            self.leases.release(lease.id)
        return JSONResponse(result)

    def _commit(
        self, path: str, catalog: str, mode: int, mtime: int, message: str, tag: str | None
    ) -> dict[str, object]:
        with self.repo.lock(wait_message=False):
            subtree = validate_subtree(self.repo, path, catalog, mode, mtime)
            result = self.repo.commit(
                subtree,
                message=message,
                tag=tag,
                compressor=zstandard.ZstdCompressor(level=self.compressor_level),
            )
        return {
            "revision": result.manifest.revision,
            "root_hash": result.manifest.root_hash,
            "new_bytes": result.new_bytes,
        }

    async def renew_lease(self, request: Request) -> Response:
        self.leases.use(request.path_params["lease"], self._token(request))
        return Response(status_code=204)

    async def drop_lease(self, request: Request) -> Response:
        self.leases.use(request.path_params["lease"], self._token(request))
        self.leases.release(request.path_params["lease"])
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., object]:
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as exc:
                    return JSONResponse({"error": str(exc)}, exc.status)
                except RepoError as exc:  # the upload or the request cannot be used
                    return JSONResponse({"error": str(exc)}, 422)

            return endpoint

        return [
            Route(f"{API}/leases", guarded(self.open_lease), methods=["POST"]),
            Route(f"{API}/objects/missing", guarded(self.missing), methods=["POST"]),
            Route(f"{API}/leases/{{lease}}/objects", guarded(self.upload), methods=["POST"]),
            Route(f"{API}/leases/{{lease}}/commit", guarded(self.commit), methods=["POST"]),
            Route(f"{API}/leases/{{lease}}/renew", guarded(self.renew_lease), methods=["POST"]),
            Route(f"{API}/leases/{{lease}}", guarded(self.drop_lease), methods=["DELETE"]),
        ]


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        parts.append(part)
    return b"".join(parts)
