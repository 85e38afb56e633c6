"""An operator finds a damaged repository, learns which files it affects, and repairs it.

The story: a disk error (or an old publisher's fault) left an object whose bytes do not
match its name, or lost one. `repo-server check` names the files that use it and in
which revisions; `check --repair` moves corrupt objects out of the served tree (kept in
quarantine/, never deleted); publishing the named files again stores them, the stat
cache notwithstanding; check is green and every file reads back verified.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cvmfs_format.objects import object_path
from tests.conftest import MiB, Repo, open_reader, read_tree, run_cli

COPIES = 7  # more than check names per object: the rest are counted


@pytest.fixture
def released(repo: Repo, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """One build tree published as revision 1 at /sw/1.0 and revision 2 at /sw/1.1."""
    rng = random.Random(16)
    tree = {
        "bin/reco": b'#!/bin/sh\nexec python3 -m reco "$@"\n',
        "lib/libfit.so": rng.randbytes(6 * MiB),  # chunked
        "README": b"reconstruction 1.0\n",
    }
    tree.update({f"share/calib{i}.dat": b"calibration constants\n" * 40 for i in range(COPIES)})
    src = tmp_path / "src"
    for relpath, content in tree.items():
        (src / relpath).parent.mkdir(parents=True, exist_ok=True)
        (src / relpath).write_bytes(content)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.1")
    return src, tree


def check(repo: Repo, *options: str) -> tuple[int, list[str]]:
    result = run_cli("repo-server", "check", repo.dir, "--all", *options, check=False)
    return result.returncode, result.stdout.decode().splitlines()


def line_about(lines: list[str], digest: str) -> str:
    found = [line for line in lines if line.startswith(f"object {digest}")]
    assert len(found) == 1, lines
    return found[0]


def test_a_corrupt_object_is_named_quarantined_and_stored_again_by_a_publish(
    repo: Repo, released: tuple[Path, dict[str, bytes]]
) -> None:
    src, tree = released
    reader = open_reader(repo)
    shared = reader.lookup("/sw/1.0/share/calib0.dat").hash
    chunk = reader.catalog_for_dir("/sw/1.0/lib").chunks("/sw/1.0/lib/libfit.so")[1].hash
    assert shared is not None
    for digest in (shared, chunk):  # a disk flips bytes in two objects
        stored = repo.dir / object_path(digest)
        damaged = bytearray(stored.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        stored.write_bytes(bytes(damaged))
    corrupt_bytes = (repo.dir / object_path(shared)).read_bytes()

    code, lines = check(repo)

    assert code == 1
    about_shared = line_about(lines, shared)
    named = ", ".join(f"/sw/1.0/share/calib{i}.dat (revisions 1, 2)" for i in range(5))
    assert about_shared.endswith(f"; used by {named} and {2 * COPIES - 5} more paths")
    assert line_about(lines, chunk).endswith("; used by /sw/1.0/lib/libfit.so (revisions 1, 2), "
                                             "/sw/1.1/lib/libfit.so (revision 2)")  # fmt: skip

    code, lines = check(repo, "--repair")

    assert code == 1
    quarantine = repo.dir / "quarantine"
    assert f"moved to {quarantine / shared}" in lines
    assert f"moved to {quarantine / chunk}" in lines
    assert (quarantine / shared).read_bytes() == corrupt_bytes  # kept, not deleted
    assert not (repo.dir / object_path(shared)).exists()
    assert "repair: 2 objects that fail verification moved out of the served tree" in lines
    assert any(line.startswith("repair: publish the files named above again") for line in lines)

    # The stat cache remembers every file of the tree as published: the re-publish must
    # still store what is missing now.
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")

    code, lines = check(repo)
    assert code == 0, lines
    reader = open_reader(repo)
    expected = {relpath: content for relpath, content in tree.items()}
    assert read_tree(reader, "/sw/1.0") == expected
    assert read_tree(reader, "/sw/1.1") == expected  # the same objects, so repaired too
    cat = run_cli("cvmfs-client", "cat", repo.dir, "/sw/1.1/lib/libfit.so", "--key", repo.pub)
    assert cat.stdout == tree["lib/libfit.so"]


def test_a_missing_object_is_named_and_a_publish_stores_it_again(
    repo: Repo, released: tuple[Path, dict[str, bytes]]
) -> None:
    src, tree = released
    digest = open_reader(repo).lookup("/sw/1.1/bin/reco").hash
    assert digest is not None
    (repo.dir / object_path(digest)).unlink()

    code, lines = check(repo, "--repair")

    assert code == 1
    assert line_about(lines, digest) == (
        f"object {digest}: missing; used by /sw/1.0/bin/reco (revisions 1, 2), "
        "/sw/1.1/bin/reco (revision 2)"
    )
    assert not any("moved" in line for line in lines)
    assert any(line.startswith("repair: publish the files named above again") for line in lines)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.1")
    code, lines = check(repo)
    assert code == 0, lines
    assert read_tree(open_reader(repo), "/sw/1.1") == tree


def test_check_repair_on_a_healthy_repository_moves_nothing(
    repo: Repo, released: tuple[Path, dict[str, bytes]]
) -> None:
    code, lines = check(repo, "--repair")
    assert code == 0, lines
    assert lines[-1].startswith("check ok")
    assert not (repo.dir / "quarantine").exists()
