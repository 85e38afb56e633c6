"""What a mount tells about itself: the statistics `cvmfs-client stat` shows, and the
extended attributes of its entries (user.revision, user.stats, user.hash...)."""

from __future__ import annotations

import json
import os
from typing import Any

from cvmfs_client.repository import RepositoryReader
from cvmfs_format.catalog import Chunk, Entry

ROOT_XATTRS = ["user.revision", "user.host", "user.proxy", "user.root_hash", "user.stats"]


def route(reader: RepositoryReader) -> tuple[str, str]:
    """(host, proxy) that the last fetch went through."""
    fetcher = reader.fetcher
    inner = getattr(fetcher, "inner", fetcher)
    current = getattr(inner, "current", None)
    return current if current is not None else (fetcher.describe(), "DIRECT")


def statistics(
    reader: RepositoryReader, io_errors: int, revision: int | None = None
) -> dict[str, Any]:
    """revision: the one the mount serves, when it differs from the reader's newest."""
    manifest = reader.manifest
    cache = reader.cache
    host, proxy = route(reader)
    inner = getattr(reader.fetcher, "inner", reader.fetcher)
    stats: dict[str, Any] = {
        "repository": manifest.name if manifest else "",
        "revision": revision if revision is not None else manifest.revision if manifest else 0,
        "host": host,
        "proxy": proxy,
        "offline": bool(getattr(reader.fetcher, "offline", False)),
        "pid": os.getpid(),  # the mount's daemon (its fetch workers are its children)
        "io_errors": io_errors,
        "fetch_failures": getattr(inner, "failures", 0),
        # as received over the network, compressed; a directory fetcher counts none
        "bytes_downloaded": getattr(inner, "bytes_downloaded", 0),
    }
    if cache is not None:
        stats.update(
            cache_dir=cache.directory,
            cache_bytes=cache.used,
            cache_quota=cache.quota,
            hits=cache.stats.hits,
            misses=cache.stats.misses,
            content_fetched=cache.stats.bytes_fetched,
            evictions=cache.stats.evictions,
            corrupt_entries=cache.stats.corrupt_entries,
            fetch_wait_s=round(cache.stats.fetch_wait_s, 3),
        )
    return stats


def xattr_names(entry: Entry) -> list[str]:
    names = list(ROOT_XATTRS) if entry.path == "/" else []
    if entry.is_file:
        names.append("user.hash" if not entry.chunked else "user.chunks")
    return names


def xattr(
    reader: RepositoryReader, entry: Entry, name: str, stats: dict[str, Any],
    chunks: list[Chunk] | None = None,
) -> str | None:  # fmt: skip
    """The value of attribute name of entry; None when it has none. stats: what
    statistics() gives now (user.stats and user.revision of the root); chunks: a
    chunked entry's, when known."""
    if entry.path == "/" and reader.manifest is not None:
        if name == "user.revision":
            return str(stats["revision"])
        if name in ("user.host", "user.proxy"):
            return route(reader)[name == "user.proxy"]
        if name == "user.root_hash":
            return reader.root_hash
        if name == "user.stats":
            return json.dumps(stats)
    if name == "user.hash" and entry.is_file and entry.hash is not None:
        return entry.hash
    if name == "user.chunks" and entry.chunked:
        return str(len(chunks if chunks is not None else reader.chunks(entry)))
    return None
