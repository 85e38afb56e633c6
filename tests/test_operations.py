"""The operator's day-to-day commands: tag, rollback, diff, gc and key rotate.

The story: releases are published week after week; the operator names the good ones,
rolls back a bad one without sending clients backwards, sees what a release changed,
reclaims the space old releases hold, and replaces the signing key, all while clients
that pin only the master key keep reading.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.objects import content_hash, encode_object, object_path
from cvmfs_format.signed import encode_public_key, key_fingerprint, load_public_key_pem
from repo_server import keys
from repo_server.storage import LocalStorage
from tests.conftest import BIN, Repo, backdate_history, open_reader, publish, run_cli

HOUR = 3600
WEEK = 7 * 24 * HOUR


def write_tree(src: Path, files: dict[str, bytes]) -> Path:
    """Make src hold exactly these files (relpath -> content)."""
    shutil.rmtree(src, ignore_errors=True)
    for relpath, content in files.items():
        (src / relpath).parent.mkdir(parents=True, exist_ok=True)
        (src / relpath).write_bytes(content)
    return src


def release(repo: Repo, src: Path, version: int, *extra: str, path: str = "/sw") -> bytes:
    """Publish release `version`: a VERSION file, a shared file and one file of its own
    big enough to matter for gc. Returns that file's content."""
    own = random.Random(version).randbytes(64 * 1024)
    write_tree(
        src,
        {"VERSION": f"{version}\n".encode(), "share/common.txt": b"same in every release\n",
         f"lib/release{version}.bin": own},
    )  # fmt: skip
    publish(src, repo, path, "--replace", *extra)  # each release replaces the one before
    return own


def cat(repo: Repo, path: str, *extra: str, check: bool = True) -> bytes:
    result = run_cli("cvmfs-client", "cat", repo.dir, path, "--key", repo.pub, *extra, check=check)
    return result.stdout if check else result.stderr


def repo_server(*args: object, check: bool = True) -> str:
    return run_cli("repo-server", *map(str, args), check=check).stdout.decode()


def stored_objects(repo: Repo) -> dict[str, int]:
    """Every object file on disk: hash -> stored size."""
    return {
        sub.name + f.name: f.stat().st_size
        for sub in (repo.dir / "data").iterdir()
        for f in sub.iterdir()
    }


def snapshot(repo: Repo) -> dict[str, bytes]:
    """Every file a client could read (publisher scratch space excluded)."""
    return {
        str(p.relative_to(repo.dir)): p.read_bytes()
        for p in repo.dir.rglob("*")
        if p.is_file() and p.name != ".lock" and "txn" not in p.relative_to(repo.dir).parts
    }


def orphan(repo: Repo, content: bytes, age: float = 0) -> Path:
    """An object no revision names, as a killed publish leaves behind, `age` seconds old."""
    digest = content_hash(content)
    LocalStorage(repo.dir).put_object(digest, encode_object(content, zstandard.ZstdCompressor()))
    path = repo.dir / object_path(digest)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def assert_check_all_green(repo: Repo, revisions: str) -> None:
    out = repo_server("check", repo.dir, "--all")
    assert out.startswith(f"check ok: revisions {revisions};"), out


# -- tags ----------------------------------------------------------------------------------


def test_a_tag_names_an_old_revision_that_clients_can_read_by_name(
    repo: Repo, tmp_path: Path
) -> None:
    release(repo, tmp_path / "src", 1)
    release(repo, tmp_path / "src", 2)
    before = manifest_mod.parse((repo.dir / "manifest").read_bytes())[0]

    out = repo_server("tag", repo.dir, "good-1", "--revision", 1)

    assert out == "tag 'good-1' names revision 1; manifest revision 2 re-signed\n"
    after = open_reader(repo).manifest
    assert after is not None
    assert (after.revision, after.root_hash) == (before.revision, before.root_hash)
    assert after.history_hash != before.history_hash
    assert cat(repo, "/sw/VERSION", "--tag", "good-1") == b"1\n"
    assert cat(repo, "/sw/VERSION") == b"2\n"
    assert repo_server("tags", repo.dir).startswith("good-1\trevision 1\t")
    # without --revision the head is named
    repo_server("tag", repo.dir, "latest")
    assert cat(repo, "/sw/VERSION", "--tag", "latest") == b"2\n"
    assert_check_all_green(repo, "0, 1, 2")


def test_a_deleted_tag_is_gone_for_clients(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1, "--tag", "v1")

    out = repo_server("tag", repo.dir, "--delete", "v1")

    assert out == "tag 'v1' (revision 1) deleted; manifest revision 1 re-signed\n"
    assert repo_server("tags", repo.dir) == ""
    assert "no tag named 'v1'" in cat(repo, "/sw/VERSION", "--tag", "v1", check=False).decode()
    assert_check_all_green(repo, "0, 1")


def test_a_tag_is_never_moved_silently(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1, "--tag", "v1")
    release(repo, tmp_path / "src", 2)
    before = snapshot(repo)

    result = run_cli("repo-server", "tag", repo.dir, "v1", check=False)

    assert result.returncode == 1
    assert result.stderr.decode() == (
        "error: tag 'v1' already names revision 1; delete it first with "
        "`repo-server tag DIR --delete v1`\n"
    )
    assert snapshot(repo) == before
    # naming the same revision again changes nothing either
    assert "nothing changed" in repo_server("tag", repo.dir, "v1", "--revision", 1)
    assert snapshot(repo) == before


# -- rollback ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["1", "v1"])
def test_rollback_publishes_a_new_revision_with_the_old_content(
    repo: Repo, tmp_path: Path, target: str
) -> None:
    own1 = release(repo, tmp_path / "src", 1, "--tag", "v1")
    release(repo, tmp_path / "src", 2)
    seen_revision_2 = open_reader(repo)
    root_of_1 = seen_revision_2.history().revision(1).root_hash

    out = repo_server("rollback", repo.dir, "--to", target, "--yes")

    assert out == "published revision 3 with the content of revision 1\n"
    # a client that has seen revision 2 moves forward to 3, which holds release 1
    manifest = seen_revision_2.load_manifest()
    assert (manifest.revision, manifest.root_hash) == (3, root_of_1)
    assert cat(repo, "/sw/VERSION") == b"1\n"
    assert cat(repo, "/sw/lib/release1.bin") == own1
    assert b"no such file" in cat(repo, "/sw/lib/release2.bin", check=False)
    record = seen_revision_2.history().revision(3)
    assert (record.path, record.message) == ("/", "rollback to revision 1")
    assert_check_all_green(repo, "0, 1, 2, 3")


def test_rollback_takes_a_message_for_the_history(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1)
    release(repo, tmp_path / "src", 2)

    repo_server("rollback", repo.dir, "--to", 1, "--message", "2 breaks the trigger", "--yes")

    assert open_reader(repo).history().revision(3).message == "2 breaks the trigger"


# -- diff ----------------------------------------------------------------------------------


def test_diff_lists_added_removed_and_modified_paths(repo: Repo, tmp_path: Path) -> None:
    src = write_tree(
        tmp_path / "src",
        {"bin/app": b"v1", "bin/run": b"#!/bin/sh\n", "lib/keep.so": b"same",
         "lib/old.so": b"old", "share/doc/README": b"read me",
         "lib/calib.db": random.Random(7).randbytes(5 * 1024 * 1024)},  # chunked
    )  # fmt: skip
    os.symlink("bin/app", src / "link")
    publish(src, repo, "/sw", "--tag", "v1")
    (src / "bin/app").write_bytes(b"v2")
    (src / "bin/run").chmod(0o755)
    (src / "lib/old.so").unlink()
    shutil.rmtree(src / "share")
    (src / "link").unlink()
    os.symlink("lib/keep.so", src / "link")
    (src / "new").mkdir()
    (src / "new/tool").write_bytes(b"tool")
    with open(src / "lib/calib.db", "r+b") as calib:  # same size, one chunk differs
        calib.seek(3 * 1024 * 1024)
        calib.write(b"recalibrated")
    publish(src, repo, "/sw", "--replace")

    out = repo_server("diff", repo.dir, "v1", 2)

    assert out.splitlines() == [
        "M /sw/bin/app",
        "M /sw/bin/run",
        "M /sw/lib/calib.db",
        "- /sw/lib/old.so",
        "M /sw/link",
        "+ /sw/new",
        "+ /sw/new/tool",
        "- /sw/share",
        "- /sw/share/doc",
        "- /sw/share/doc/README",
    ]
    backwards = repo_server("diff", repo.dir, 2, 1).splitlines()
    assert "+ /sw/share/doc/README" in backwards and "- /sw/new/tool" in backwards
    assert repo_server("diff", repo.dir, 1, "v1") == ""
    assert repo_server("diff", repo.dir, 0, 1).splitlines()[:2] == ["+ /sw", "+ /sw/bin"]


def test_diff_never_reads_a_nested_catalog_that_did_not_change(repo: Repo, tmp_path: Path) -> None:
    big = {f"pkg/mod{i}.py": b"x = %d\n" % i for i in range(50)}
    publish(write_tree(tmp_path / "big", {".cvmfscatalog": b"", **big}), repo, "/sw/big")
    publish(write_tree(tmp_path / "small", {"file": b"1"}), repo, "/sw/small")
    publish(write_tree(tmp_path / "small", {"file": b"2"}), repo, "/sw/small")
    big_catalog = open_reader(repo).catalog_for_dir("/sw/big/pkg").digest
    # the unchanged subtree's catalog is gone: reading it would fail the diff
    (repo.dir / object_path(big_catalog)).unlink()

    assert repo_server("diff", repo.dir, 2, 3) == "M /sw/small/file\n"
    assert f"catalog {big_catalog}" in repo_server("check", repo.dir, check=False)


# -- gc ------------------------------------------------------------------------------------


def test_gc_after_several_revisions_keeps_check_green_and_removes_the_rest(
    repo: Repo, tmp_path: Path
) -> None:
    own = {n: release(repo, tmp_path / "src", n) for n in (1, 2, 3, 4)}
    backdate_history(repo.open(), WEEK)  # no client reads the old ones any more
    before = stored_objects(repo)

    out = repo_server("gc", repo.dir, "--keep-revisions", 2, "--grace", 0)

    after = stored_objects(repo)
    removed = before.keys() - after.keys()
    assert not after.keys() - before.keys() - {open_reader(repo).history().digest}
    lines = out.splitlines()
    assert lines[0] == "gc: kept 2 revisions (3-4), dropped 3 (0-2)"
    assert lines[1].startswith(
        f"gc: removed {len(removed)} objects, {sum(before[d] for d in removed)} bytes ("
    )
    assert_check_all_green(repo, "3, 4")
    for n in (1, 2):  # what only the dropped releases held is gone, and so is their history
        assert content_hash(own[n]) in removed
        assert (
            "not in the repository's history"
            in cat(repo, "/sw/VERSION", "--revision", str(n), check=False).decode()
        )
    assert cat(repo, "/sw/lib/release3.bin", "--revision", "3") == own[3]
    assert cat(repo, "/sw/lib/release4.bin") == own[4]
    manifest = open_reader(repo).manifest
    assert manifest is not None and manifest.revision == 4


def test_gc_keeps_tagged_revisions(repo: Repo, tmp_path: Path) -> None:
    own1 = release(repo, tmp_path / "src", 1, "--tag", "stable")
    release(repo, tmp_path / "src", 2)
    release(repo, tmp_path / "src", 3)
    backdate_history(repo.open(), WEEK)

    out = repo_server("gc", repo.dir, "--keep-revisions", 1, "--grace", 0)

    assert out.splitlines()[0] == "gc: kept 2 revisions (1, 3), dropped 2 (0, 2)"
    assert cat(repo, "/sw/lib/release1.bin", "--tag", "stable") == own1
    assert b"not in the repository's history" in cat(
        repo, "/sw/VERSION", "--revision", "2", check=False
    )
    assert_check_all_green(repo, "1, 3")


def test_gc_by_default_keeps_every_revision_and_removes_leftovers(
    repo: Repo, tmp_path: Path
) -> None:
    for n in (1, 2, 3):
        release(repo, tmp_path / "src", n)
    leftover = orphan(repo, b"written by a publish that was killed", age=2 * HOUR)

    out = repo_server("gc", repo.dir)

    assert out.splitlines()[0] == "gc: kept 4 revisions (0-3), dropped 0 (none)"
    assert not leftover.exists()
    for n in (1, 2, 3):
        assert cat(repo, "/sw/VERSION", "--revision", str(n)) == f"{n}\n".encode()
    assert_check_all_green(repo, "0, 1, 2, 3")


def test_gc_spares_objects_younger_than_the_grace_period(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1)
    old = orphan(repo, b"left two hours ago", age=2 * HOUR)
    uploading = orphan(repo, b"an HTTP publisher uploaded this a minute ago", age=60)

    out = repo_server("gc", repo.dir)

    assert not old.exists()
    assert uploading.exists()
    assert "spared" in out and "younger than 3600 s" in out
    repo_server("gc", repo.dir, "--grace", 30)
    assert not uploading.exists()


def test_gc_waits_for_a_running_publish(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1)
    leftover = orphan(repo, b"old leftover", age=2 * HOUR)

    with repo.open().lock():  # a publish is running
        gc = subprocess.Popen(
            [BIN / "repo-server", "gc", repo.dir, "--grace", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert gc.stderr is not None
        assert gc.stderr.readline().startswith(b"waiting for another publish")
        assert leftover.exists() and gc.poll() is None
    out, _ = gc.communicate(timeout=60)

    assert gc.returncode == 0
    assert not leftover.exists()
    assert b"removed" in out


def test_gc_dry_run_changes_nothing_and_predicts_the_real_run(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1)
    release(repo, tmp_path / "src", 2)
    backdate_history(repo.open(), WEEK)
    before = snapshot(repo)

    dry = repo_server("gc", repo.dir, "--keep-revisions", 1, "--grace", 0, "--dry-run")

    assert snapshot(repo) == before
    assert dry.splitlines()[0] == "gc: would keep 1 revisions (2), would drop 2 (0-1)"
    assert dry.splitlines()[-1] == "gc: dry run, nothing changed"
    real = repo_server("gc", repo.dir, "--keep-revisions", 1, "--grace", 0)
    predicted = dry.splitlines()[1].removeprefix("gc: would remove ")
    assert real.splitlines()[1].removeprefix("gc: removed ") == predicted
    assert_check_all_green(repo, "2")


def test_gc_refuses_to_sweep_when_a_kept_catalog_is_unreadable(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1)
    sw_catalog = open_reader(repo).catalog_for_dir("/sw").digest
    (repo.dir / object_path(sw_catalog)).unlink()
    leftover = orphan(repo, b"old leftover", age=2 * HOUR)
    before = snapshot(repo)

    result = run_cli("repo-server", "gc", repo.dir, check=False)

    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: gc stopped before deleting anything")
    assert leftover.exists() and snapshot(repo) == before


# -- key rotation --------------------------------------------------------------------------


def test_key_rotation_keeps_clients_verifying(repo: Repo, tmp_path: Path) -> None:
    release(repo, tmp_path / "src", 1)
    signing_file = repo.keys / f"{repo.name}.key"
    old_key_pem = signing_file.read_bytes()
    old_manifest = (repo.dir / "manifest").read_bytes()

    out = repo_server("key", "rotate", repo.dir)

    new_key = keys.load_private_key(signing_file)
    assert signing_file.read_bytes() != old_key_pem
    archived = list(repo.keys.glob(f"{repo.name}.key.*"))
    assert len(archived) == 1 and archived[0].read_bytes() == old_key_pem
    assert str(archived[0]) in out
    master = load_public_key_pem(repo.pub.read_bytes(), str(repo.pub))
    whitelist = whitelist_mod.verify((repo.dir / "whitelist").read_bytes(), master, time.time())
    old_key = keys.load_private_key(archived[0])
    assert set(whitelist.keys) == {encode_public_key(k.public_key()) for k in (new_key, old_key)}
    # the manifest is signed by the new key; one the old key signed still verifies
    manifest = open_reader(repo).manifest
    assert manifest is not None and manifest.revision == 1
    assert manifest.signer == key_fingerprint(new_key.public_key())
    assert manifest_mod.verify(old_manifest, whitelist, time.time()).revision == 1
    assert cat(repo, "/sw/VERSION") == b"1\n"
    release(repo, tmp_path / "src", 2)  # the publisher finds the new key by itself
    republished = open_reader(repo).manifest
    assert republished is not None
    assert republished.signer == key_fingerprint(new_key.public_key())
    assert cat(repo, "/sw/VERSION") == b"2\n"
    repo_server("check", repo.dir)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["tag", "DIR", "v9", "--revision", "99"], "revision 99 is not in the repository's"),
        (["tag", "DIR", "--delete", "nope"], "no tag named 'nope'"),
        (["tag", "DIR", "2024"], "digits alone would read as a revision number"),
        (["tag", "DIR", "bad name"], "use up to 128 letters"),
        (["rollback", "DIR", "--to", "nope"], "no tag named 'nope'"),
        (["rollback", "DIR", "--to", "99"], "revision 99 is not in the repository's"),
        (["rollback", "DIR", "--to", "2"], "revision 2 is the head already"),
        (["diff", "DIR", "1", "99"], "revision 99 is not in the repository's"),
        (["diff", "DIR", "nope", "1"], "no tag named 'nope'"),
        (["gc", "DIR", "--keep-revisions", "0"], "--keep-revisions must be at least 1"),
        (["gc", "DIR", "--grace", "-5"], "--grace must be 0 or more seconds"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_input_is_one_error_line_and_changes_nothing(
    repo: Repo, tmp_path: Path, argv: list[str], says: str
) -> None:
    release(repo, tmp_path / "src", 1, "--tag", "v1")
    release(repo, tmp_path / "src", 2)
    before = snapshot(repo)

    result = run_cli("repo-server", *[repo.dir if a == "DIR" else a for a in argv], check=False)

    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert says in stderr
    assert snapshot(repo) == before


@pytest.mark.parametrize(
    "argv",
    [["tag", "DIR"], ["tag", "DIR", "v1", "--delete", "v2"], ["diff", "DIR", "1"],
     ["rollback", "DIR"], ["gc", "DIR", "--keep-revisions", "some"], ["key"],
     ["key", "rotate"]],
    ids=lambda a: " ".join(a),
)  # fmt: skip
def test_usage_errors_exit_2(repo: Repo, argv: list[str]) -> None:
    before = snapshot(repo)

    result = run_cli("repo-server", *[repo.dir if a == "DIR" else a for a in argv], check=False)

    assert result.returncode == 2
    assert b"usage: repo-server" in result.stderr
    assert snapshot(repo) == before


@pytest.mark.parametrize(
    "command",
    [["tag", "v1"], ["rollback", "--to", "1"], ["diff", "0", "1"], ["gc"], ["key", "rotate"]],
    ids=lambda c: c[0] if c[0] != "key" else "key rotate",
)
def test_commands_on_something_that_is_not_a_repository_say_so(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "empty").mkdir()
    if command[0] == "key":
        argv = [*command, tmp_path / "empty"]
    else:
        argv = [command[0], tmp_path / "empty", *command[1:]]

    result = run_cli("repo-server", *argv, check=False)

    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: ")
    assert "not a repository" in result.stderr.decode()
    assert os.listdir(tmp_path / "empty") == []
