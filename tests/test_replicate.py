"""Mirrors (Stratum 1): `repo-server replicate` copies a repository served over HTTP into
a directory that nginx serves and `cvmfs-client` mounts, fetching only what is new, and
refuses sources that lie, replay an old manifest or have lost what a client needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_format.objects import object_path
from repo_server.storage import LocalStorage
from tests.conftest import (
    MiB,
    Repo,
    Tree,
    mounted,
    open_reader,
    publish,
    read_files,
    read_tree,
    run_cli,
    serving,
    serving_nginx,
    write_build_tree,
)


@pytest.fixture
def source(repo: Repo, tmp_path: Path) -> Iterator[str]:
    """The repository, served by `repo-server serve` on loopback: the mirror's source."""
    with serving(repo.dir, tmp_path / "source.log") as url:
        yield url


def release(tmp_path: Path, repo: Repo, version: str, seed: int) -> Tree:
    """Build a release tree (small files, nested catalogs, one chunked file) and publish
    it at /sw/VERSION; returns its files."""
    src = tmp_path / f"build-{version}"
    files = write_build_tree(src, seed=seed, small_files=150, big_files=1, big_size=5 * MiB)
    publish(src, repo, f"/sw/{version}")
    return files


def replicate(url: str, mirror: Path, repo: Repo) -> subprocess.CompletedProcess[bytes]:
    return run_cli("repo-server", "replicate", url, mirror, "--key", repo.pub, check=False)


def fetched(result: subprocess.CompletedProcess[bytes]) -> int:
    """How many objects the summary line says were fetched."""
    assert result.returncode == 0, result.stderr.decode()
    found = re.search(r"fetched (\d+) objects", result.stdout.decode())
    assert found, result.stdout.decode()
    return int(found.group(1))


def objects(directory: Path) -> set[str]:
    return {digest for digest, _ in LocalStorage(directory).iter_objects()}


def mirror_repo(mirror: Path, repo: Repo) -> Repo:
    """The mirror as a Repo, for the verifying reader: its keys are the source's."""
    return Repo(mirror, repo.keys, repo.name)


def test_a_mirror_served_by_nginx_mounts_identically_and_updates_with_only_new_objects(
    repo: Repo, source: str, tmp_path: Path
) -> None:
    replaced_history = repo.open().head().history_hash  # unreferenced after a publish
    first = release(tmp_path, repo, "1.0", seed=1)
    mirror = tmp_path / "mirror"

    result = replicate(source, mirror, repo)
    assert objects(mirror) == objects(repo.dir) - {replaced_history}
    assert fetched(result) == len(objects(mirror))  # a new mirror: everything it needs
    assert "revision 1 (a new mirror)" in result.stdout.decode()
    assert (mirror / "manifest").read_bytes() == (repo.dir / "manifest").read_bytes()
    served = {p.name for p in mirror.iterdir()}
    assert served <= {"manifest", "whitelist", "data", "txn", ".lock"}  # no keys
    check = run_cli("repo-server", "check", mirror, "--keys", repo.keys).stdout.decode()
    assert "check ok" in check

    with serving_nginx(mirror, tmp_path / "nginx") as nginx:
        with mounted(nginx.url, tmp_path / "mnt", tmp_path / "cache", repo.pub) as mnt:
            assert read_files(mnt / "sw" / "1.0") == first
        assert '"GET /data/' in nginx.access_log.read_text()  # nginx served the mirror

    before = objects(repo.dir)
    second = release(tmp_path, repo, "2.0", seed=2)
    new = objects(repo.dir) - before
    result = replicate(source, mirror, repo)
    assert fetched(result) == len(new)  # only what the publish added
    assert "revision 2 (was revision 1)" in result.stdout.decode()
    assert objects(mirror) == objects(repo.dir) - {replaced_history}
    reader = open_reader(mirror_repo(mirror, repo))
    assert reader.manifest is not None and reader.manifest.revision == 2
    assert read_tree(reader, "/sw/1.0") == first
    assert read_tree(reader, "/sw/2.0") == second

    again = replicate(source, mirror, repo)
    assert fetched(again) == 0
    assert "up to date" in again.stdout.decode()


def test_a_tampered_object_fails_the_run_and_the_mirror_keeps_serving_its_revision(
    repo: Repo, source: str, tmp_path: Path
) -> None:
    release(tmp_path, repo, "1.0", seed=1)
    mirror = tmp_path / "mirror"
    fetched(replicate(source, mirror, repo))
    old_manifest = (mirror / "manifest").read_bytes()

    before = objects(repo.dir)
    release(tmp_path, repo, "2.0", seed=2)
    new = objects(repo.dir) - before
    # The largest new object: a chunk of the big file, fetched after the catalogs.
    victim = max((repo.dir / object_path(d) for d in new), key=lambda p: p.stat().st_size)
    original = victim.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    victim.write_bytes(bytes(tampered))

    result = replicate(source, mirror, repo)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith("error: ") and victim.name in err
    assert "unchanged (still revision 1)" in err
    assert (mirror / "manifest").read_bytes() == old_manifest
    reader = open_reader(mirror_repo(mirror, repo))
    assert reader.manifest is not None and reader.manifest.revision == 1

    victim.write_bytes(original)  # the operator repairs the source
    done = replicate(source, mirror, repo)
    assert fetched(done) < len(new)  # what the failed run stored is kept
    assert new <= objects(mirror)


def test_a_replayed_older_manifest_is_refused(repo: Repo, source: str, tmp_path: Path) -> None:
    release(tmp_path, repo, "1.0", seed=1)
    old = (repo.dir / "manifest").read_bytes()
    release(tmp_path, repo, "2.0", seed=2)
    mirror = tmp_path / "mirror"
    fetched(replicate(source, mirror, repo))
    current = (mirror / "manifest").read_bytes()

    (repo.dir / "manifest").write_bytes(old)  # validly signed, but revision 1
    result = replicate(source, mirror, repo)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "revision 1 is older than revision 2 already seen" in err
    assert "replayed" in err and "unchanged (still revision 2)" in err
    assert (mirror / "manifest").read_bytes() == current


@pytest.mark.parametrize("lie", ["another object's bytes", "endless bytes", "a forged catalog"])
def test_a_source_that_lies_about_an_object_is_caught(
    repo: Repo, source: str, tmp_path: Path, lie: str
) -> None:
    replaced_history = repo.open().head().history_hash
    release(tmp_path, repo, "1.0", seed=1)
    head = repo.open().head()
    others = sorted(objects(repo.dir) - {head.root_hash, head.history_hash, replaced_history})
    victim = repo.dir / object_path(others[0])
    if lie == "another object's bytes":
        shutil.copyfile(repo.dir / object_path(others[1]), victim)
    elif lie == "endless bytes":
        with open(victim, "ab") as f:
            f.write(os.urandom(32 * MiB))
    else:  # the root catalog, same size, one byte changed
        victim = repo.dir / object_path(head.root_hash)
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0x01
        victim.write_bytes(bytes(data))
    mirror = tmp_path / "mirror"

    result = replicate(source, mirror, repo)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert victim.name in err, err
    assert any(w in err for w in ("hashes to", "larger than", "corrupt", "expected")), err
    assert "unchanged (no revision yet)" in err
    assert not (mirror / "manifest").exists()  # nothing for a web server to serve


def test_a_garbage_collected_revision_is_skipped_unless_tagged(
    repo: Repo, source: str, tmp_path: Path
) -> None:
    release(tmp_path, repo, "1.0", seed=1)
    run_cli("repo-server", "tag", repo.dir, "v1")
    release(tmp_path, repo, "2.0", seed=2)
    release(tmp_path, repo, "3.0", seed=3)
    opened = repo.open()
    records = {r.revision: r for r in opened.history(opened.head()).revisions()}
    # Revision 2's root catalog is gone from the source, its history still lists it.
    (repo.dir / object_path(records[2].root_hash)).unlink()

    mirror = tmp_path / "mirror"
    result = replicate(source, mirror, repo)
    assert fetched(result) > 0
    assert "warning: revision 2 skipped" in result.stderr.decode()
    assert "mirror holds revisions 0-1, 3" in result.stdout.decode()
    reader = open_reader(mirror_repo(mirror, repo))
    reader.select_revision(tag="v1")
    assert read_tree(reader, "/sw/1.0")

    (repo.dir / object_path(records[1].root_hash)).unlink()  # the tagged revision's
    shutil.rmtree(mirror)
    result = replicate(source, mirror, repo)
    assert result.returncode == 1
    assert "tagged revision 1" in result.stderr.decode()
    assert not (mirror / "manifest").exists()


def check_of(target: str | Path, repo: Repo) -> subprocess.CompletedProcess[bytes]:
    """`repo-server check` as a mirror's operator runs it: with the master public key
    that clients pin, no key directory."""
    return run_cli("repo-server", "check", target, "--key", repo.pub, check=False)


def test_a_corrupt_mirror_is_found_by_check_over_http_and_mended_by_replicate_repair(
    repo: Repo, source: str, tmp_path: Path
) -> None:
    release(tmp_path, repo, "1.0", seed=1)
    mirror = tmp_path / "mirror"
    fetched(replicate(source, mirror, repo))
    reader = open_reader(mirror_repo(mirror, repo))
    file_object = reader.lookup("/sw/1.0/lib001/mod101.py").hash
    nested = reader.catalog_for_dir("/sw/1.0/lib000").digest
    assert file_object is not None and nested != reader.root_hash
    damaged = {d: mirror / object_path(d) for d in (file_object, nested)}
    for path in damaged.values():  # a disk error on the mirror host
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))

    with serving(mirror, tmp_path / "mirror.log") as mirror_url:
        result = check_of(mirror_url, repo)
        assert result.returncode == 1, result.stderr.decode()
        for digest in damaged:
            assert digest in result.stdout.decode(), result.stdout.decode()
        assert "check FAILED" in result.stdout.decode()
        assert check_of(mirror, repo).returncode == 1  # the directory, by the same key

        again = replicate(source, mirror, repo)  # the manifest did not change: no walk
        assert fetched(again) == 0 and check_of(mirror_url, repo).returncode == 1

        repaired = run_cli(
            "repo-server", "replicate", source, mirror, "--key", repo.pub, "--repair"
        ).stdout.decode()

        assert "repaired 2 objects that failed verification" in repaired, repaired
        for digest, path in damaged.items():
            assert path.read_bytes() == (repo.dir / object_path(digest)).read_bytes()
            assert (mirror / "quarantine" / digest).exists()  # kept for a look
        healthy = check_of(mirror_url, repo)
        assert healthy.returncode == 0, healthy.stdout.decode() + healthy.stderr.decode()
        assert healthy.stdout.decode().startswith("check ok")
    assert check_of(mirror, repo).returncode == 0
    assert (
        "repaired"
        not in run_cli(
            "repo-server", "replicate", source, mirror, "--key", repo.pub, "--repair"
        ).stdout.decode()
    )


def test_check_of_a_url_needs_the_public_key(repo: Repo, source: str) -> None:
    result = run_cli("repo-server", "check", source, check=False)

    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1 and "--key" in err, err
    assert check_of(source, repo).returncode == 0
