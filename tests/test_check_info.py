"""The operator's commands: init, check, info, resign and whitelist renew.

The story: an operator creates a repository, publishes into it, inspects it, finds
damage with `check`, and keeps its signatures fresh without republishing anything.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.errors import VerificationError
from cvmfs_format.objects import object_path
from cvmfs_format.signed import load_public_key_pem
from tests.conftest import Repo, open_reader, run_cli

DAY = 86400
MiB = 1024 * 1024


@pytest.fixture
def release(repo: Repo, tmp_path: Path) -> dict[str, bytes]:
    """Release 1.0 published at /sw/1.0; returns repository path -> content."""
    rng = random.Random(3)
    files = {
        "bin/reco": b'#!/bin/sh\nexec python3 -m reco "$@"\n',
        "lib/geometry.xml": b"<detector>" + b"<layer r='12.5'/>" * 300 + b"</detector>",
        "lib/libfit.so": rng.randbytes(5 * MiB),  # chunked
        "share/empty": b"",
    }
    for relpath, content in files.items():
        (tmp_path / "src" / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / relpath).write_bytes(content)
    run_cli("cvmbuild", "publish", tmp_path / "src", "--repo", repo.dir, "--path", "/sw/1.0")
    return {f"/sw/1.0/{k}": v for k, v in files.items()}


def cat(repo: Repo, path: str) -> bytes:
    return run_cli("cvmfs-client", "cat", repo.dir, path, "--key", repo.pub).stdout


def stored_file_of(repo: Repo, digest: str) -> Path:
    return repo.dir / object_path(digest)


def fields(output: bytes) -> dict[str, str]:
    """`key: value` lines of a command's output."""
    pairs = (line.partition(":") for line in output.decode().splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


# -- check ---------------------------------------------------------------------------------


def test_check_passes_on_a_healthy_repository(repo: Repo, release: dict[str, bytes]) -> None:
    result = run_cli("repo-server", "check", repo.dir)
    assert result.stdout.decode().startswith("check ok")
    assert "0 problems" in result.stdout.decode()


def test_check_reports_a_deleted_object_as_missing(repo: Repo, release: dict[str, bytes]) -> None:
    digest = open_reader(repo).lookup("/sw/1.0/bin/reco").hash
    assert digest is not None
    stored_file_of(repo, digest).unlink()

    result = run_cli("repo-server", "check", repo.dir, check=False)

    assert result.returncode == 1
    out = result.stdout.decode()
    assert f"object {digest}: missing" in out
    assert "check FAILED" in out and "1 problems" in out


def test_check_reports_a_corrupted_catalog(repo: Repo, release: dict[str, bytes]) -> None:
    catalog = open_reader(repo).catalog_for_dir("/sw/1.0").digest
    stored = stored_file_of(repo, catalog)
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))

    result = run_cli("repo-server", "check", repo.dir, check=False)

    assert result.returncode == 1
    assert f"catalog {catalog}" in result.stdout.decode()
    assert "check FAILED" in result.stdout.decode()


def test_check_reports_a_corrupted_chunk_of_a_large_file(
    repo: Repo, release: dict[str, bytes]
) -> None:
    reader = open_reader(repo)
    chunks = reader.catalog_for_dir("/sw/1.0/lib").chunks("/sw/1.0/lib/libfit.so")
    assert len(chunks) > 1
    stored = stored_file_of(repo, chunks[1].hash)
    stored.write_bytes(b"\0" * len(stored.read_bytes()))

    result = run_cli("repo-server", "check", repo.dir, check=False)

    assert result.returncode == 1
    assert f"object {chunks[1].hash}" in result.stdout.decode()


# -- info ----------------------------------------------------------------------------------


def test_info_reports_what_was_published(repo: Repo, release: dict[str, bytes]) -> None:
    info = fields(run_cli("repo-server", "info", repo.dir).stdout)

    assert info["name"] == repo.name
    assert info["revision"] == "1"
    assert int(info["files"].split()[0]) == len(release)
    assert int(info["logical bytes"].split()[0]) == sum(map(len, release.values()))
    on_disk = [
        (Path(d) / f).stat().st_size for d, _, names in os.walk(repo.dir / "data") for f in names
    ]
    stored = info["stored bytes"].split()
    assert int(stored[0]) == sum(on_disk)
    assert stored[-2:] == [str(len(on_disk)), "objects"]


# -- keeping signatures fresh --------------------------------------------------------------


def test_whitelist_renew_extends_what_clients_accept(repo: Repo, release: dict[str, bytes]) -> None:
    master = load_public_key_pem(repo.pub.read_bytes(), str(repo.pub))
    old = (repo.dir / "whitelist").read_bytes()
    in_60_days = time.time() + 60 * DAY
    with pytest.raises(VerificationError, match="expired"):
        whitelist_mod.verify(old, master, in_60_days)

    result = run_cli("repo-server", "whitelist", "renew", repo.dir, "--days", "90")

    assert "renewed" in result.stdout.decode()
    new = (repo.dir / "whitelist").read_bytes()
    renewed = whitelist_mod.verify(new, master, in_60_days)
    assert renewed.expires > whitelist_mod.parse(old)[0].expires
    assert abs(renewed.expires - (time.time() + 90 * DAY)) < 60
    assert cat(repo, "/sw/1.0/bin/reco") == release["/sw/1.0/bin/reco"]
    run_cli("repo-server", "check", repo.dir)


def test_resign_keeps_revision_and_content_and_moves_the_expiry(
    repo: Repo, release: dict[str, bytes]
) -> None:
    before = manifest_mod.parse((repo.dir / "manifest").read_bytes())[0]
    time.sleep(1.1)  # expiries have one-second resolution

    result = run_cli("repo-server", "resign", repo.dir)

    assert "revision 1 re-signed" in result.stdout.decode()
    after = open_reader(repo).load_manifest()  # verifies the new signature
    assert after.revision == before.revision
    assert after.root_hash == before.root_hash
    assert after.history_hash == before.history_hash
    assert after.expires > before.expires
    for path, content in release.items():
        assert cat(repo, path) == content
    run_cli("repo-server", "check", repo.dir)


# -- init refusals -------------------------------------------------------------------------


def test_init_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "notes.txt").write_text("mine")

    result = run_cli("repo-server", "init", tmp_path / "repo", "--name", "a.org", check=False)

    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: ")
    assert "not empty" in result.stderr.decode()
    assert os.listdir(tmp_path / "repo") == ["notes.txt"]
    assert not (tmp_path / "repo.keys").exists()


def test_init_refuses_a_key_directory_inside_the_served_directory(tmp_path: Path) -> None:
    result = run_cli(
        "repo-server", "init", tmp_path / "repo", "--name", "a.org",
        "--keys", tmp_path / "repo" / "keys", check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: ")
    assert "inside the served directory" in result.stderr.decode()
    assert not (tmp_path / "repo").exists()


def test_init_refuses_to_overwrite_an_existing_key(repo: Repo, tmp_path: Path) -> None:
    signing_key = repo.keys / f"{repo.name}.key"
    original = signing_key.read_bytes()

    result = run_cli(
        "repo-server", "init", tmp_path / "second", "--name", repo.name, "--keys", repo.keys,
        check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: ")
    assert "already exists" in result.stderr.decode()
    assert signing_key.read_bytes() == original
    assert not (tmp_path / "second").exists()
    run_cli("repo-server", "check", repo.dir)


# -- clear errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["check"], ["info"], ["tags"], ["resign"], ["whitelist", "renew"], ["serve"]],
    ids=lambda c: " ".join(c),
)
@pytest.mark.parametrize("kind", ["empty directory", "missing directory"])
def test_commands_on_something_that_is_not_a_repository_say_so(
    tmp_path: Path, command: list[str], kind: str
) -> None:
    target = tmp_path / "not-a-repo"
    if kind == "empty directory":
        target.mkdir()

    result = run_cli("repo-server", *command, target, check=False, timeout=30)

    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "not a repository" in stderr and "repo-server init" in stderr


def test_publishing_into_something_that_is_not_a_repository_says_so(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_text("x")
    (tmp_path / "elsewhere").mkdir()

    result = run_cli(
        "cvmbuild", "publish", tmp_path / "src", "--repo", tmp_path / "elsewhere",
        "--path", "/sw", check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: ")
    assert "not a repository" in result.stderr.decode()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate", "DIR"],
        ["check"],
        ["init", "DIR"],
        ["whitelist"],
        ["whitelist", "renew", "DIR", "--days", "soon"],
        ["info", "DIR", "--no-such-option"],
    ],
    ids=lambda a: " ".join(a) or "(nothing)",
)
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    args = [str(tmp_path / "r") if a == "DIR" else a for a in argv]

    result = run_cli("repo-server", *args, check=False)

    assert result.returncode == 2
    assert b"usage: repo-server" in result.stderr
    assert not (tmp_path / "r").exists()
