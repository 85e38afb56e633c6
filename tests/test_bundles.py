"""Recorded prefetch bundles: a mount records what an import reads, `cvmbuild bundle`
turns that into bundle files published with the release, and a fresh mount with an
empty cache fetches a bundle's members as soon as its trigger is looked up. A bundle
naming missing or tampered objects never makes a read return wrong bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_format.objects import object_path
from tests.conftest import Repo, mounted, open_reader, run_cli, serving, serving_nginx
from tests.test_publish_http import make_token, token_file

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None,
    reason="needs /dev/fuse and fusermount (apt-get install fuse libfuse2)",
)

ALPHA_MODULES = [f"m{i}" for i in range(8)]
BETA_MODULES = [f"b{i}" for i in range(4)]
TABLE_SIZE = 8 << 20  # chunked at --chunk-threshold 1M; the import reads its start only


def write_release(src: Path) -> None:
    """Two packages as a Python environment has them: alpha imports its modules, a
    subpackage and reads the start of a large data file; beta imports its own."""
    site = src / "site"
    alpha, beta = site / "alpha", site / "beta"
    (alpha / "sub").mkdir(parents=True)
    beta.mkdir()
    imports = "".join(f"from alpha import {m}\n" for m in ALPHA_MODULES)
    (alpha / "__init__.py").write_text(
        imports
        + "from alpha.sub import leaf\n"
        + "import os\nwith open(os.path.join(os.path.dirname(__file__), 'table.bin'), 'rb') as f:\n"
        + "    HEAD = f.read(65536)\n"
    )
    for i, module in enumerate(ALPHA_MODULES):
        (alpha / f"{module}.py").write_text(f"VALUE = {i}\n# {os.urandom(2000).hex()}\n")
    (alpha / "unused.py").write_text("never imported\n")
    (alpha / "sub" / "__init__.py").write_text("# a subpackage\n")
    (alpha / "sub" / "leaf.py").write_text("LEAF = 1\n")
    (alpha / "table.bin").write_bytes(os.urandom(TABLE_SIZE))
    (beta / "__init__.py").write_text("".join(f"from beta import {m}\n" for m in BETA_MODULES))
    for module in BETA_MODULES:
        (beta / f"{module}.py").write_text(f"NAME = {module!r}\n")


def run_import(mountpoint: Path, prefix: str, modules: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(mountpoint / prefix.lstrip("/") / "site")}
    subprocess.run([sys.executable, "-S", "-B", "-c", f"import {modules}"], env=env, check=True)


def stat_of(mountpoint: Path) -> dict[str, str]:
    out = run_cli("cvmfs-client", "stat", mountpoint).stdout.decode()
    return {k.strip(): v.split()[0] for k, v in (ln.split(":", 1) for ln in out.splitlines()) if v}


def cached(cache: Path, digest: str) -> bool:
    return (cache / "objects" / digest[:2] / digest[2:]).exists()


def wait_until(what: str, condition: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_fuse
@pytest.mark.slow
def test_a_traced_import_becomes_bundles_that_fill_a_fresh_cache_before_the_reads(
    repo: Repo, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_release(src)
    publish = ("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    run_cli(*publish, "--chunk-threshold", "1M")
    trace = tmp_path / "import.trace"
    with serving_nginx(repo.dir, tmp_path / "nginx") as nginx:
        # 1. Record: a real mount, a real import.
        with mounted(nginx.url, tmp_path / "mnt1", tmp_path / "cache1", repo.pub,
                     "--trace", trace):  # fmt: skip
            run_import(tmp_path / "mnt1", "/sw/1.0", "alpha, beta")
        lines = [json.loads(line) for line in trace.read_text().splitlines()]
        assert lines[0]["format"] == "cvmfs-py-trace" and lines[0]["revision"] >= 1
        kinds = {(e["kind"], e["path"].rpartition("/")[2]) for e in lines[1:]}
        assert {("lookup", "__init__.py"), ("read", "m0.py"), ("chunk", "table.bin")} <= kinds
        assert ("read", "unused.py") not in kinds

        # 2. Bundle and publish.
        out = run_cli("cvmbuild", "bundle", trace, "--tree", src, "--path", "/sw/1.0")
        assert out.stdout.decode().startswith("2 bundles")
        alpha_bundle = json.loads((src / "site/alpha/.cvmfsbundle-__init__.py").read_text())
        members = [m.removeprefix("/sw/1.0/site/alpha/") for m in alpha_bundle["dependencies"]]
        assert members == [
            *(f"{m}.py" for m in ALPHA_MODULES),
            "sub/__init__.py",
            "sub/leaf.py",
            "table.bin",
            "/sw/1.0/site/beta/__init__.py",
        ]  # fmt: skip  (beta's trigger)
        [(start, end)] = alpha_bundle["ranges"]["/sw/1.0/site/alpha/table.bin"]
        assert start == 0 and end < TABLE_SIZE
        assert (src / "site/beta/.cvmfsbundle-__init__.py").exists()
        run_cli(*publish, "--chunk-threshold", "1M")

        # 3. A fresh mount, empty cache: looking up the trigger fetches its members.
        reader = open_reader(repo)
        table = reader.lookup("/sw/1.0/site/alpha/table.bin")
        chunks = reader.chunks(table)
        alpha = src / "site/alpha"
        wanted = [sha256(alpha / f"{m}.py") for m in ALPHA_MODULES]
        wanted += [sha256(alpha / "sub/leaf.py"), chunks[0].hash]
        beta = [sha256(src / "site/beta" / f"{m}.py") for m in BETA_MODULES]
        cache = tmp_path / "cache2"
        with mounted(nginx.url, tmp_path / "mnt2", cache, repo.pub) as mnt:
            os.stat(mnt / "sw/1.0/site/alpha/__init__.py")
            wait_until("alpha's members were not prefetched",
                       lambda: all(cached(cache, d) for d in wanted))  # fmt: skip
            assert not any(cached(cache, d) for d in beta)  # not triggered yet
            assert not cached(cache, chunks[-1].hash)  # never read by the traced import
            assert not cached(cache, sha256(alpha / "unused.py"))
            run_import(mnt, "/sw/1.0", "alpha, beta")
            # A bundle covers alpha/: no sibling prefetch fetches what the trace never read.
            assert not cached(cache, sha256(alpha / "unused.py"))
            stats = stat_of(mnt)
            assert int(stats["bundles_read"]) == 2
            assert int(stats["bundle_hits"]) >= len(wanted)
            assert int(stats["bundle_members_fetched"]) >= len(wanted)
            assert stats["bundle_members_skipped"] == "0"
            assert float(stats["fetch_wait_s"]) >= 0
            assert stats["io_errors"] == "0"


@needs_fuse
def test_a_bundle_naming_missing_or_tampered_objects_skips_them_and_reads_still_verify(
    repo: Repo, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    pkg = src / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("GOOD = 1\n")
    (pkg / "bad.py").write_text("BAD = 1\n")
    (pkg / "sub" / "x.py").write_text("")
    bundle = {
        "name": "CVMFS_BUNDLE",
        "version": "1.0.0",
        "encoding": "UTF-8",
        "dependencies": ["/sw/pkg/missing.py", "/sw/pkg/sub", "/sw/pkg/bad.py", "good.py"],
    }
    (pkg / ".cvmfsbundle-__init__.py").write_text(json.dumps(bundle))
    (pkg / "other.py").write_text("")
    (pkg / ".cvmfsbundle-other.py").write_text("not json")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw")
    bad = open_reader(repo).lookup("/sw/pkg/bad.py").hash
    assert bad is not None
    (repo.dir / object_path(bad)).write_bytes(b"BAD = 666\n")  # same size, other bytes
    cache = tmp_path / "cache"
    with mounted(str(repo.dir), tmp_path / "mnt", cache, repo.pub) as mnt:
        os.stat(mnt / "sw/pkg/other.py")  # its bundle is no bundle: ignored
        os.stat(mnt / "sw/pkg/__init__.py")
        wait_until("the bundle was not handled",
                   lambda: stat_of(mnt).get("bundle_members_skipped") == "3")  # fmt: skip
        assert cached(cache, sha256(pkg / "good.py"))
        assert not cached(cache, bad)
        assert (mnt / "sw/pkg/good.py").read_text() == "GOOD = 1\n"
        with pytest.raises(OSError) as failure:
            (mnt / "sw/pkg/bad.py").read_bytes()
        assert failure.value.errno == 5  # EIO, as without a bundle
        assert (mnt / "sw/pkg/other.py").read_text() == ""
        stats = stat_of(mnt)
        assert stats["bundles_read"] == "1" and stats["bundle_hits"] == "1"
    log = (cache / "client.log").read_text()
    assert "missing.py skipped" in log and ".cvmfsbundle-other.py ignored" in log


def write_trace(path: Path, prefix: str, events: list[tuple[str, str, int, int]]) -> None:
    """A trace as `mount --trace` writes it: (kind, path below prefix, offset, size)."""
    lines = [{"format": "cvmfs-py-trace", "version": 1, "repository": "r", "revision": 1,
              "started": 0}]  # fmt: skip
    for t, (kind, rel, offset, size) in enumerate(events):
        lines.append({"t": t / 1000, "kind": kind, "path": f"{prefix}/{rel}",
                      "object": "0" * 64, "offset": offset, "size": size})  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_triggers_are_the_first_files_of_each_package_and_old_bundles_are_replaced(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    for rel in ("lib/a/__init__.py", "lib/a/x.py", "lib/a/deep/y.so", "lib/b/__init__.py",
                "lib/b/z.py", "lib/single.py", "lib/a/.cvmfsbundle-x.py"):  # fmt: skip
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("mine" if rel.endswith("bundle-x.py") else "")
    trace = tmp_path / "trace"
    write_trace(trace, "/old", [
        ("lookup", "lib/a/__init__.py", 0, 0), ("read", "lib/a/__init__.py", 0, 0),
        ("lookup", "lib/b/__init__.py", 0, 0), ("read", "lib/b/z.py", 0, 0),
        ("chunk", "lib/a/deep/y.so", 1 << 20, 1 << 20), ("read", "lib/a/x.py", 0, 0),
        ("chunk", "lib/a/deep/y.so", 0, 1 << 20), ("read", "lib/gone.py", 0, 0),
        ("read", "lib/single.py", 0, 0),
    ])  # fmt: skip
    out = run_cli("cvmbuild", "bundle", trace, "--tree", tree, "--path", "/sw/2",
                  "--trace-path", "/old").stdout.decode()  # fmt: skip
    assert out.strip() == "2 bundles with 4 members written; 1 traced files are not in the tree"
    a = json.loads((tree / "lib/a/.cvmfsbundle-__init__.py").read_text())
    assert a["dependencies"] == ["/sw/2/lib/a/deep/y.so", "/sw/2/lib/a/x.py"]
    assert a["ranges"] == {"/sw/2/lib/a/deep/y.so": [[0, 2 << 20]]}
    b = json.loads((tree / "lib/b/.cvmfsbundle-__init__.py").read_text())
    # single.py, a trigger read, joins the bundle triggered before it
    assert b["dependencies"] == ["/sw/2/lib/b/z.py", "/sw/2/lib/single.py"]
    assert not (tree / "lib/.cvmfsbundle-single.py").exists()  # no other member
    write_trace(
        trace, "/sw/2", [("lookup", "lib/b/__init__.py", 0, 0), ("read", "lib/b/z.py", 0, 0)]
    )
    run_cli("cvmbuild", "bundle", trace, "--tree", tree, "--path", "/sw/2")
    assert not (tree / "lib/a/.cvmfsbundle-__init__.py").exists()  # from the older trace
    assert (tree / "lib/b/.cvmfsbundle-__init__.py").exists()
    assert (tree / "lib/a/.cvmfsbundle-x.py").read_text() == "mine"  # not written by us
    bad = run_cli("cvmbuild", "bundle", tree / "lib/a/x.py", "--tree", tree, "--path", "/sw/2",
                  check=False)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith("error: ") and "mount --trace" in bad.stderr.decode()


def test_publish_with_a_trace_publishes_its_bundles_over_http(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py"):
        (src / "pkg" / name).write_text(name)
    trace = tmp_path / "trace"
    write_trace(trace, "/sw/3", [("lookup", "pkg/__init__.py", 0, 0), ("read", "pkg/b.py", 0, 0),
                                 ("read", "pkg/a.py", 0, 0)])  # fmt: skip
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))
    with serving(repo.dir, tmp_path / "serve.log") as url:
        result = run_cli("cvmbuild", "publish", src, "--repo", url, "--path", "/sw/3",
                         "--token-file", token, "--bundle", trace)  # fmt: skip
        assert "bundles: 1 bundles with 2 members written" in result.stderr.decode()
        shown = run_cli("cvmfs-client", "cat", url, "/sw/3/pkg/.cvmfsbundle-__init__.py",
                        "--key", repo.pub).stdout  # fmt: skip
    assert json.loads(shown)["dependencies"] == ["/sw/3/pkg/b.py", "/sw/3/pkg/a.py"]


def test_stat_shows_the_requests_a_fuse_layer_counts_by_kind(tmp_path: Path) -> None:
    """What `stat` reads is the mount root's user.stats attribute: any file can carry one."""
    root = tmp_path / "root"
    root.touch()
    stats = {"revision": 3, "fetch_wait_s": 0.25, "requests": {"READ": 12, "LOOKUP": 40}}
    try:
        os.setxattr(root, "user.stats", json.dumps(stats).encode())
    except OSError as exc:
        pytest.skip(f"no user xattrs on {tmp_path}: {exc.strerror}")
    out = run_cli("cvmfs-client", "stat", root).stdout.decode().splitlines()
    assert out[:2] == ["revision:          3", "fetch_wait_s:      0.25"]
    assert [line.split() for line in out[2:]] == [["requests:"], ["LOOKUP:", "40"], ["READ:", "12"]]
