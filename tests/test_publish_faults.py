"""A build tree that changes under a local publish never damages the repository.

The story: a build is still writing (or someone swaps files) while `cvmbuild publish`
reads the tree, or the repository's disk fills up. The publish either stores exactly
the bytes it names, or stops with one line that names the file and says what to do;
`repo-server check` stays green and clients read every published file verified.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_format.objects import decode_object
from repo_server.repository import LocalRepository
from tests.conftest import BIN, MiB, Repo, open_reader, read_tree, run_cli, small_tmpfs

CHANGED = "changed while publishing"

# `cvmbuild publish` with one step added: the swap a hostile or careless user makes,
# done deterministically either between the scan and the reading of files, or while
# the scan runs, right after it listed `path` in its parent directory.
SWAP = """
import os, sys
import cvmbuild.publish, cvmbuild.scan
from cvmbuild.cli import main

moment, action, path, target = sys.argv[1:5]

def swap():
    if action == "symlink":
        os.unlink(path)
        os.symlink(target, path)
    elif action == "fifo":
        os.unlink(path)
        os.mkfifo(path)
    elif action == "directory-symlink":
        os.rename(path, path + ".moved")
        os.symlink(target, path)

scan, entry = cvmbuild.publish.scan, cvmbuild.scan._entry

def scan_then_swap(*args, **kwargs):
    entries = scan(*args, **kwargs)
    swap()
    return entries

def listed_then_swap(relpath, abspath, st):
    listed = entry(relpath, abspath, st)
    if abspath == path:
        swap()
    return listed

if moment == "after-scan":
    cvmbuild.publish.scan = scan_then_swap
else:
    cvmbuild.scan._entry = listed_then_swap
sys.exit(main(sys.argv[5:]))
"""

# Rewrites files in place (no truncation, no rename) with version A, then B, then A...
# until told to stop; `ready` appears after the first round.
REWRITER = """
import os, random, sys
ready, stop, *specs = sys.argv[1:]
files = []
for spec in specs:
    path, size, seed = spec.split(",")
    versions = [random.Random(int(seed) + v).randbytes(int(size)) for v in (0, 1)]
    files.append((os.open(path, os.O_WRONLY), versions))
n = 0
while not os.path.exists(stop):
    for fd, versions in files:
        os.pwrite(fd, versions[n % 2], 0)
    n += 1
    if n == 2:
        open(ready, "w").close()
"""

# Told the publisher's pid on stdin (after it said "ready"), waits until the publisher
# holds `path` open (or mapped), then truncates it to half and restores it, again and
# again, until the publisher exits.
TRUNCATOR = """
import os, sys, time
path = sys.argv[1]
original = open(path, "rb").read()
half = len(original) // 2
print("ready", flush=True)
pid = int(sys.stdin.readline())
deadline = time.monotonic() + 120

def holds_it():
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
            except OSError:
                pass
        with open(f"/proc/{pid}/maps") as maps:
            return any(line.rstrip().endswith(path) for line in maps)
    except OSError:
        return False

def alive():
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False

while alive() and not holds_it() and time.monotonic() < deadline:
    time.sleep(0.001)
print("caught" if alive() else "missed", flush=True)
fd = os.open(path, os.O_WRONLY)
while alive() and time.monotonic() < deadline:
    os.ftruncate(fd, half)
    time.sleep(0.002)
    os.pwrite(fd, original[half:], half)
    time.sleep(0.002)
"""


def versions(size: int, seed: int) -> tuple[bytes, bytes]:
    """The two versions REWRITER alternates between."""
    return random.Random(seed).randbytes(size), random.Random(seed + 1).randbytes(size)


def make_tree(src: Path, files: dict[str, bytes]) -> None:
    for relpath, content in files.items():
        (src / relpath).parent.mkdir(parents=True, exist_ok=True)
        (src / relpath).write_bytes(content)


def publish_args(src: Path, repo: Repo, path: str) -> list[str]:
    return ["publish", str(src), "--repo", str(repo.dir), "--path", path]


def assert_repository_sound(repo: Repo, revision: int) -> None:
    """check is green and the head is `revision`."""
    check = run_cli("repo-server", "check", repo.dir, "--all", "--keys", repo.keys, check=False)
    assert check.returncode == 0, check.stdout.decode()
    reader = open_reader(repo)
    assert reader.manifest is not None and reader.manifest.revision == revision


def every_content_stored(repo: Repo) -> list[bytes]:
    """The content of every object on disk, verified against its name."""
    contents = []
    for sub in (repo.dir / "data").iterdir():
        for obj in sub.iterdir():
            contents.append(decode_object(obj.read_bytes(), sub.name + obj.name))
    return contents


def refused_with(stderr: str, *paths: Path) -> bool:
    """One `error:` line saying which file changed while publishing."""
    lines = stderr.strip().splitlines()
    return (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and CHANGED in lines[0]
        and any(str(p) in lines[0] for p in paths)
    )


# -- fault 1: a file rewritten in place while it is read -------------------------------


def test_files_rewritten_during_a_publish_are_refused_or_published_whole(
    tmp_path: Path, repo: Repo
) -> None:
    src = tmp_path / "src"
    big_a, big_b = versions(24 * MiB, 10)
    small_a, small_b = versions(96 * 1024, 20)
    steady = {f"lib/mod{i}.py": f"print({i})\n".encode() * 50 for i in range(40)}
    make_tree(src, {"data/calib.bin": big_a, "etc/geometry.xml": small_a, **steady})
    big, small = src / "data/calib.bin", src / "etc/geometry.xml"
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    specs = [f"{big},{24 * MiB},10", f"{small},{96 * 1024},20"]
    writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(ready), str(stop), *specs])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.01)
        result = run_cli("cvmbuild", *publish_args(src, repo, "/sw/1.0"), check=False)
    finally:
        stop.touch()
        writer.wait(timeout=60)

    stderr = result.stderr.decode()
    if result.returncode == 0:
        published = read_tree(open_reader(repo), "/sw/1.0")
        assert published["data/calib.bin"] in (big_a, big_b)
        assert published["etc/geometry.xml"] in (small_a, small_b)
        assert all(published[k] == v for k, v in steady.items())
        assert_repository_sound(repo, 1)
    else:
        assert result.returncode == 1
        assert refused_with(stderr, big, small), stderr
        assert "publish again" in stderr
        assert_repository_sound(repo, 0)
    every_content_stored(repo)  # every object holds exactly the bytes it is named for

    # Once the build has stopped writing, the same publish goes through.
    run_cli("cvmbuild", *publish_args(src, repo, "/sw/1.0"))
    published = read_tree(open_reader(repo), "/sw/1.0")
    assert published["data/calib.bin"] == big.read_bytes()
    assert published["etc/geometry.xml"] == small.read_bytes()
    check = run_cli("repo-server", "check", repo.dir, "--all", check=False)
    assert check.returncode == 0, check.stdout.decode()


# -- fault 14: a file truncated while it is chunked -------------------------------------


def test_a_file_truncated_while_it_is_chunked_is_refused_not_a_crash(
    tmp_path: Path, repo: Repo
) -> None:
    src = tmp_path / "src"
    original = random.Random(14).randbytes(64 * MiB)
    make_tree(src, {"data/events.root": original, "README": b"read me\n"})
    big = src / "data/events.root"

    truncator = subprocess.Popen(
        [sys.executable, "-c", TRUNCATOR, str(big)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert truncator.stdout is not None and truncator.stdin is not None
    assert truncator.stdout.readline().strip() == "ready"
    build = subprocess.Popen(
        [str(BIN / "cvmbuild"), *publish_args(src, repo, "/sw/1.0")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    truncator.stdin.write(f"{build.pid}\n")
    truncator.stdin.close()
    _, err = build.communicate(timeout=300)
    caught = truncator.stdout.read()
    truncator.wait(timeout=60)
    assert caught.strip() == "caught", "the publisher finished before the file was truncated"

    stderr = err.decode()
    assert build.returncode in (0, 1), f"publisher died of signal {-build.returncode}: {stderr}"
    if build.returncode == 0:
        published = read_tree(open_reader(repo), "/sw/1.0")
        assert published["data/events.root"] in (original, original[: len(original) // 2])
        assert_repository_sound(repo, 1)
    else:
        assert refused_with(stderr, big), stderr
        assert_repository_sound(repo, 0)


# -- fault 3: a file swapped between the scan and the read ------------------------------


def publish_with_swap(
    action: str, path: Path, target: Path | str, src: Path, repo: Repo, moment: str = "after-scan"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", SWAP, moment, action, str(path), str(target),
         *publish_args(src, repo, "/sw/1.0")],
        capture_output=True,
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["small", "chunked"])
def test_a_file_swapped_for_a_symlink_never_publishes_the_link_target(
    tmp_path: Path, repo: Repo, size: int
) -> None:
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    line = b"root:$6$secret-hash:19000:0:99999:7:::\n"
    secret.write_bytes((line * (size // len(line) + 1))[:size])  # the size the scan saw
    src = tmp_path / "src"
    make_tree(src, {"etc/passwd": b"x" * size, "README": b"read me\n"})

    result = publish_with_swap("symlink", src / "etc/passwd", secret, src, repo)

    assert result.returncode == 1, result.stderr.decode()
    assert refused_with(result.stderr.decode(), src / "etc/passwd"), result.stderr.decode()
    assert not any(b"secret-hash" in c for c in every_content_stored(repo))
    assert_repository_sound(repo, 0)


@pytest.mark.parametrize("moment", ["after-scan", "while-scanning"])
def test_a_directory_swapped_for_a_symlink_never_publishes_what_it_points_to(
    tmp_path: Path, repo: Repo, moment: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root:$6$secret-hash:19000\n".ljust(100))
    src = tmp_path / "src"
    make_tree(src, {"etc/passwd": b"x" * 100, "README": b"read me\n"})

    result = publish_with_swap("directory-symlink", src / "etc", outside, src, repo, moment)

    assert result.returncode == 1, result.stderr.decode()
    named = src / "etc/passwd" if moment == "after-scan" else src / "etc"
    assert refused_with(result.stderr.decode(), named), result.stderr.decode()
    assert not any(b"secret-hash" in c for c in every_content_stored(repo))
    assert_repository_sound(repo, 0)


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["small", "chunked"])
def test_a_file_swapped_for_a_fifo_fails_fast_and_releases_the_lock(
    tmp_path: Path, repo: Repo, size: int
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"run/app.log": b"l" * size, "README": b"read me\n"})

    start = time.monotonic()
    try:
        result = publish_with_swap("fifo", src / "run/app.log", "-", src, repo)
    except subprocess.TimeoutExpired:
        pytest.fail("the publish hung on a fifo while holding the repository lock")

    assert time.monotonic() - start < 30
    assert result.returncode == 1
    assert refused_with(result.stderr.decode(), src / "run/app.log"), result.stderr.decode()
    assert_repository_sound(repo, 0)
    os.unlink(src / "run/app.log")
    run_cli("cvmbuild", *publish_args(src, repo, "/sw/1.0"), timeout=60)  # the lock is free
    assert_repository_sound(repo, 1)


# -- fault 15: the repository's disk fills up --------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for the test (needs root)."""
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        yield disk


def test_a_full_disk_stops_the_publish_with_one_line_and_keeps_the_last_revision(
    tmp_path: Path, small_disk: Path
) -> None:
    LocalRepository.init(small_disk / "repo", "full.example.org", tmp_path / "keys")
    repo = Repo(small_disk / "repo", tmp_path / "keys", "full.example.org")
    first, second = tmp_path / "release-1", tmp_path / "release-2"
    release1 = {f"bin/tool{i}": f"#!/bin/sh\necho {i}\n".encode() for i in range(20)}
    make_tree(first, release1)
    run_cli("cvmbuild", *publish_args(first, repo, "/sw/1"), "--keys", repo.keys)
    rng = random.Random(15)
    make_tree(second, {f"data/run{i}.bin": rng.randbytes(6 * MiB) for i in range(4)})

    result = run_cli(
        "cvmbuild", *publish_args(second, repo, "/sw/2"), "--keys", repo.keys, check=False
    )

    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert "no space left" in stderr and "still serves revision 1" in stderr, stderr
    assert "publish again" in stderr
    assert not [p for p in repo.dir.rglob("*") if p.name.startswith(".tmp-")]
    assert_repository_sound(repo, 1)
    assert read_tree(open_reader(repo), "/sw/1") == release1

    # With room made, the same publish goes through.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    run_cli("cvmbuild", *publish_args(second, repo, "/sw/2"), "--keys", repo.keys)
    assert_repository_sound(repo, 2)
