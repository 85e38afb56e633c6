"""What the client keeps for a revision goes with it: an old revision's catalogs are
closed and unpinned in the cache once nothing uses them, the per-object fetch locks
exist only while a fetch is in flight, and the bundle bookkeeping starts afresh at a
switch, so a mount's memory and open files stay bounded over a week of revisions."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

from cvmfs_client.bundles import BundleFetcher
from cvmfs_client.cache import ObjectCache
from cvmfs_client.repository import RepositoryReader
from tests.conftest import Repo, open_reader, run_cli

SWITCHES = 30


def publish(repo: Repo, src: Path, revision: int) -> None:
    (src / "lib" / "plugins").mkdir(parents=True, exist_ok=True)
    (src / "lib" / "plugins" / ".cvmfscatalog").touch()  # a nested catalog
    (src / "lib" / "plugins" / "muon.py").write_text(f"REVISION = {revision}\n")
    (src / "bin").mkdir(exist_ok=True)
    (src / "bin" / "setup.sh").write_text(f"export REVISION={revision}\n")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw")


def read_all(reader: RepositoryReader) -> None:
    for path in ("/sw/lib/plugins/muon.py", "/sw/bin/setup.sh"):
        b"".join(reader.iter_content(reader.lookup(path)))


def pinned(cache: ObjectCache) -> set[str]:
    return {digest for digest, count in cache._pins.items() if count > 0}


def in_use(reader: RepositoryReader) -> set[str]:
    """The catalogs of the revision the reader serves now: root, /sw and its plugins."""
    return set(reader._view.opened)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_old_revisions_catalogs_are_closed_and_unpinned_once_unused(
    repo: Repo, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    publish(repo, src, 1)
    cache = ObjectCache(str(tmp_path / "cache"))
    reader = open_reader(repo, cache=cache)
    read_all(reader)
    first_root = reader.root_hash
    held = reader.catalog_for_dir("/sw/lib/plugins")  # a request still using revision 1
    assert first_root in pinned(cache)
    publish(repo, src, 2)
    reader.load_manifest()
    read_all(reader)
    gc.collect()
    assert first_root not in pinned(cache)  # nothing uses revision 1's root any more
    assert held.digest in pinned(cache)  # but its nested catalog is still in use
    del held
    gc.collect()
    assert pinned(cache) == in_use(reader) and len(in_use(reader)) == 3

    fds = open_fds()
    for revision in range(3, 3 + SWITCHES):
        publish(repo, src, revision)
        reader.load_manifest()
        read_all(reader)
    gc.collect()
    assert pinned(cache) == in_use(reader) and len(in_use(reader)) == 3
    assert open_fds() <= fds + 2  # the SQLite files of old revisions were closed


def test_fetch_locks_exist_only_while_fetches_are_in_flight(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    publish(repo, src, 1)
    cache = ObjectCache(str(tmp_path / "cache"))
    reader = open_reader(repo, cache=cache)
    threads = [threading.Thread(target=read_all, args=(reader,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.stats.misses >= 2
    assert cache._fetching == {}


def test_bundle_bookkeeping_starts_afresh_at_a_switch(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    publish(repo, src, 1)
    reader = open_reader(repo, cache=ObjectCache(str(tmp_path / "cache")))
    bundles = BundleFetcher(reader)
    for path in ("/sw/bin/setup.sh", "/sw/lib/plugins/muon.py"):
        bundles.on_lookup(path, reader.lookup(path))
    assert len(bundles._seen) == 2
    publish(repo, src, 2)
    reader.load_manifest()
    bundles.on_lookup("/sw/bin/setup.sh", reader.lookup("/sw/bin/setup.sh"))
    assert bundles._seen == {"/sw/bin/setup.sh"}
