"""Start-up and read speed through `cvmfs-client mount` against native disk, squashfuse and rclone.

squashfuse_ll (squashfuse on the low-level libfuse API) shows what FUSE itself costs.

Publishes bench/work/release1 (a venv with numpy, scipy, pandas, matplotlib, sympy) and a
1 GiB random file into a fresh repository, serves it with nginx on loopback, and times a
Python import of the big packages cold (fresh mount, empty cache, kernel caches dropped)
and warm (again on the same mount), a cold `find -type f`, and sequential reads of the
big file. Prints a markdown table of medians with ratios against native disk, and the
FUSE requests by kind our mount answered (user.stats) for each cold and warm import and
cold find. Other processes dropping the kernel's caches during a run (another bench, the
tests) show up as LOOKUPs and READs in the warm import.

Prefetch bundles: the import is traced on a mount of release 1 (and a smaller import
too), and release 1 is published again with the bundles of each trace; release 2
(bench/work/release2, when make_release_tree.py built it) is published with release 1's
bundles. Those variants time only the imports, interleaved with the others.

    /tmp/venv/bin/python bench/mount_bench.py [--tree DIR] [--repeat N] [--output FILE]

Needs root (drop_caches, mounts), nginx, squashfs-tools, squashfuse and rclone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_release_tree import tree_stats  # noqa: E402
from publish_bench import (  # noqa: E402
    BenchError,
    _first_line,
    bench_arguments,
    emit,
    machine_header,
    output_of,
    run,
)

from repo_server.nginx import repository_server, standalone  # noqa: E402

BIN = Path(sys.executable).parent  # cvmbuild, repo-server and cvmfs-client of our interpreter
# One interpreter for every variant: the release venv's bin/python3 is an absolute symlink
# to this file, which rclone's http backend cannot represent. The interpreter and its
# standard library stay on native disk; only site-packages comes from the tree under test.
PYTHON = Path(os.path.realpath(sys.executable))
IMPORT = "import scipy.stats, pandas, matplotlib.pyplot, sympy"
SMALL_IMPORT = "import scipy.stats, pandas"  # its bundles, applied to IMPORT
SITE = "lib/python3.11/site-packages"
NAME = "bench.example.org"
RELEASE = "sw/release"
BIG = "sw/big"
PACKAGES = ("cvmfs_client", "cvmfs_format", "cvmbuild", "repo_server")
BIG_SIZE = 1 << 30
# Ours with prefetch bundles: the prefix each is published at, and (trace, tree) it is
# made of. The trace was recorded on release 1 at RELEASE.
BUNDLED = {
    "ours_bundle": ("sw/bundled", "full", "release1"),
    "ours_small_bundle": ("sw/small", "small", "release1"),
    "ours_r2_r1_bundle": ("sw/release2", "full", "release2"),
}
VARIANTS = ("native", "ours", *BUNDLED, "squashfuse", "squashfuse_ll", "rclone")
OURS = ("ours",)  # its FUSE requests by kind are reported, its ratio judged
LATER_VARIANTS = ("native", "ours", "squashfuse_ll")  # timed warm again after LATER s
# ours/native at most this; find and downloaded are absolute.
TARGETS = {"cold": 1.2, "warm": 1.05}  # issue 12 (issue 3 asked 1.3 and 1.1)
FIND_TARGET = 0.2  # seconds (issue 12; issue 3 asked 0.3)
LATER = 90  # seconds: "warm after 90 s" is past any short entry or attribute timeout
DOWNLOAD_TARGET = 0.25  # of the tree's bytes

# The release tree itself with directory listings, for rclone's http backend.
TREE_SERVER = """\
server {{
    listen 127.0.0.1:{port};
    access_log {work}/tree-access.log sent;
    root {tree};
    default_type application/octet-stream;
    location / {{ autoindex on; }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ready, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}")
        time.sleep(0.05)
    raise BenchError(f"{what} not ready within {timeout} s")


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str] | str, env: dict[str, str] | None = None) -> float:
    return run(cmd, env).wall


def import_time(tree: Path, statement: str = IMPORT) -> float:
    env = {"PYTHONPATH": str(tree / SITE), "PYTHONDONTWRITEBYTECODE": "1"}
    return timed([str(PYTHON), "-S", "-c", statement], env)


def find_time(tree: Path) -> tuple[float, int]:
    t = run(f"find '{tree}' -type f | wc -l")
    return t.wall, int(t.stdout)


def read_mbs(path: Path) -> float:
    return BIG_SIZE / 1e6 / timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])


class Setup:
    """Everything the variants mount: repository, nginx, squashfs image."""

    def __init__(self, tree: Path, run_dir: Path):
        self.tree = tree
        self.run_dir = run_dir
        self.repo = run_dir / "repo"
        self.key = Path(f"{self.repo}.keys") / f"{NAME}.pub"
        self.image = run_dir / "release1.sqsh"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []
        self.counter = 0
        self.port = self.tree_port = 0
        self.prep: dict[str, float] = {}
        # per variant of ours, per trial: FUSE requests by kind of the cold and warm import
        self.requests: dict[str, list[tuple[dict[str, int], dict[str, int]]]] = {}
        self.find_requests: dict[str, list[dict[str, int]]] = {}
        self.bundles: dict[str, str] = {}  # what `cvmbuild bundle` said per variant
        self.release2 = tree.with_name("release2")
        self.variants = [
            v
            for v in VARIANTS
            if BUNDLED.get(v, ("", "", ""))[2] != "release2" or self.has_release2
        ]

    @property
    def has_release2(self) -> bool:
        return self.release2.with_name("release2.complete").exists()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True)
        env = {"CVMBUILD_CACHE_DIR": str(self.run_dir / "statcache")}
        run([str(BIN / "repo-server"), "init", str(self.repo), "--name", NAME])
        cmd = [str(BIN / "cvmbuild"), "publish", "--repo", str(self.repo)]
        self.prep["publish release1"] = timed(
            [*cmd[:2], str(self.tree), *cmd[2:], "--path", f"/{RELEASE}"], env
        )
        big_dir = self.run_dir / "big"
        big_dir.mkdir()
        with open(big_dir / "big.bin", "wb") as f:
            for _ in range(BIG_SIZE >> 24):
                f.write(os.urandom(1 << 24))
        self.prep["publish 1 GiB file"] = timed(
            [*cmd[:2], str(big_dir), *cmd[2:], "--path", f"/{BIG}"], env
        )
        self.big_native = big_dir / "big.bin"
        self.prep["mksquashfs -comp zstd"] = timed(
            [
                "mksquashfs",
                str(self.tree),
                str(self.image),
                "-comp",
                "zstd",
                "-quiet",
                "-no-progress",
            ]
        )
        work = self.run_dir / "nginx"
        work.mkdir()
        self.port, self.tree_port = free_port(), free_port()
        conf = work / "nginx.conf"
        # Bytes sent per request, so the benchmark can count what each cold import
        # downloaded; the repository as docs/OPERATING.md configures it.
        repo = repository_server(
            str(self.repo), f"127.0.0.1:{self.port}", access_log=f"{work}/repo-access.log sent"
        )
        tree = TREE_SERVER.format(port=self.tree_port, work=work, tree=self.tree)
        conf.write_text(
            standalone(
                str(work),
                [repo, tree],
                workers=2,
                as_root=True,
                http="log_format sent '$body_bytes_sent';",
            )
        )
        with (work / "stderr").open("wb") as out:
            proc = subprocess.Popen(
                ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        for port in (self.port, self.tree_port):
            wait_for("nginx", lambda p=port: accepting(p), proc)
        self.prepare_bundles(cmd, env)

    def trace(self, name: str, statement: str) -> Path:
        """The trace of statement on a fresh mount of release 1."""
        trace = self.run_dir / f"{name}.trace"
        d = self.fresh_dir(f"trace-{name}")
        (d / "mnt").mkdir()
        run([str(BIN / "cvmfs-client"), "mount", self.url, str(d / "mnt"), "--key",
             str(self.key), "--cache-dir", str(d / "cache"), "--trace", str(trace)])  # fmt: skip
        self.mounts.append(d / "mnt")
        try:
            import_time(d / "mnt" / RELEASE, statement)
        finally:
            self.unmount(d / "mnt")  # writes the rest of the trace
        return trace

    def prepare_bundles(self, publish: list[str], env: dict[str, str]) -> None:
        """Release trees with the bundles of each trace, published at their prefixes.
        The trees are hard-linked copies: the bundles must not enter bench/work."""
        start = time.monotonic()
        traces = {"full": self.trace("full", IMPORT), "small": self.trace("small", SMALL_IMPORT)}
        self.prep["trace imports"] = time.monotonic() - start
        sources = {"release1": self.tree, "release2": self.release2}
        for variant in self.variants:
            if variant not in BUNDLED:
                continue
            prefix, trace, source = BUNDLED[variant]
            copy = self.run_dir / "trees" / variant
            copy.parent.mkdir(exist_ok=True)
            run(["cp", "-al", str(sources[source]), str(copy)])
            bundle = [str(BIN / "cvmbuild"), "bundle", str(traces[trace]), "--tree", str(copy)]
            out = output_of([*bundle, "--path", f"/{prefix}", "--trace-path", f"/{RELEASE}"])
            self.bundles[variant] = out.strip()
            self.prep[f"publish {variant}"] = timed(
                [*publish[:2], str(copy), *publish[2:], "--path", f"/{prefix}"], env
            )

    def sent_log(self, variant: str) -> Path | None:
        """nginx's log of bytes sent to this variant, or None if it reads no HTTP."""
        name = "repo" if variant.startswith("ours") else {"rclone": "tree"}.get(variant)
        return self.run_dir / "nginx" / f"{name}-access.log" if name else None

    def fresh_dir(self, what: str) -> Path:
        self.counter += 1
        d = self.run_dir / f"{what}-{self.counter}"
        d.mkdir()
        return d

    @contextlib.contextmanager
    def mount(self, variant: str) -> Iterator[tuple[Path, Path]]:
        """(release tree, directory holding big.bin or None) of a fresh mount, empty cache.
        The time the mount took until it answered is left in self.mount_s."""
        self.mount_s = 0.0
        if variant == "native":
            yield self.tree, self.big_native.parent
            return
        d = self.fresh_dir(variant)
        mnt = d / "mnt"
        mnt.mkdir()
        proc = None
        start = time.monotonic()
        if variant.startswith("ours"):
            cache = d / "cache"
            run([str(BIN / "cvmfs-client"), "mount", self.url, str(mnt), "--key", str(self.key),
                 "--cache-dir", str(cache)])  # fmt: skip
            self.last_cache = cache
            root, big = mnt / BUNDLED.get(variant, (RELEASE,))[0], mnt / BIG
        elif variant in ("squashfuse", "squashfuse_ll"):
            run([variant, str(self.image), str(mnt)])
            root, big = mnt, None
        else:
            conf = d / "rclone.conf"
            conf.touch()
            with (d / "rclone.log").open("wb") as out:
                proc = subprocess.Popen(
                    ["rclone", "mount", ":http:", str(mnt), "--config", str(conf),
                     "--http-url", f"http://127.0.0.1:{self.tree_port}/",
                     "--vfs-cache-mode", "full", "--cache-dir", str(d / "cache"), "--read-only"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            self.procs.append(proc)
            root, big = mnt, None
        self.mounts.append(mnt)
        try:
            wait_for(f"{variant} mount", lambda: os.path.ismount(mnt), proc)
            self.mount_s = time.monotonic() - start
            yield root, big
        finally:
            self.unmount(mnt)
            if proc is not None:
                stop(proc)
                self.procs.remove(proc)

    def unmount(self, mnt: Path) -> None:
        if mnt not in self.mounts:
            return
        self.mounts.remove(mnt)
        if not os.path.ismount(mnt):
            return
        cmd = ["umount", str(mnt)]
        if mnt.parent.name.startswith(("ours", "trace")):  # waits for the daemon to exit
            cmd = [str(BIN / "cvmfs-client"), "umount", str(mnt)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

    def close(self) -> None:
        for mnt in list(self.mounts):
            self.unmount(mnt)
        for proc in reversed(self.procs):
            stop(proc)


def requests(mnt: Path) -> dict[str, int]:
    """FUSE requests by kind the mount has answered so far."""
    return dict(json.loads(os.getxattr(mnt, "user.stats")).get("requests", {}))


def client_stat(mnt: Path) -> dict[str, str]:
    out = output_of([str(BIN / "cvmfs-client"), "stat", str(mnt)])
    return {
        k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    }


STAT_KEYS = {  # cvmfs-client stat's name of what each ours variant reports
    "content": "content_fetched",
    "io_errors": "io_errors",
    "fetch wait": "fetch_wait_s",
    "bundle hits": "bundle_hits",
    "bundle fetched": "bundle_members_fetched",
}


def daemon_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (our mount's fetch workers)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def trial(setup: Setup, results: dict[str, dict[str, list[float]]], number: int) -> None:
    for variant in setup.variants:
        got = results.setdefault(variant, {})
        log = setup.sent_log(variant)
        if log is not None:
            log.write_bytes(b"")  # nginx appends: what follows is this mount's traffic
        drop_caches()  # before the mount: "mount + cold import" is what a fresh VM sees
        with setup.mount(variant) as (root, big):
            pid = None
            if variant.startswith("ours"):
                pid = int(json.loads(os.getxattr(root.parents[1], "user.stats"))["pid"])
                cpu = daemon_cpu(pid)
            cold = import_time(root)
            got.setdefault("cold", []).append(cold)
            got.setdefault("mount + cold", []).append(setup.mount_s + cold)
            if pid is not None:
                got.setdefault("daemon cpu", []).append(daemon_cpu(pid) - cpu)
            if log is not None:  # mount and cold import, as nginx sent them
                sent = sum(int(n) for n in log.read_text().split())
                got.setdefault("downloaded", []).append(sent)
            if variant in OURS:
                cold_requests = requests(root.parents[1])
            got.setdefault("warm", []).append(import_time(root))
            if variant in OURS:
                warm = requests(root.parents[1])
                before = cold_requests
                warm = {k: n - before.get(k, 0) for k, n in warm.items() if n > before.get(k, 0)}
                setup.requests.setdefault(variant, []).append((before, warm))
            if variant in LATER_VARIANTS:
                time.sleep(LATER)
                got.setdefault("warm later", []).append(import_time(root))
            if variant.startswith("ours"):
                stat = client_stat(root.parents[1])
                for key, name in STAT_KEYS.items():
                    got.setdefault(key, []).append(float(stat.get(name, "nan").split()[0]))
        if variant in BUNDLED:  # bundles change neither find nor the big file's reads
            report_trial(number, variant, got)
            continue
        with setup.mount(variant) as (root, big):
            drop_caches()
            wall, count = find_time(root)
            if variant in OURS:
                setup.find_requests.setdefault(variant, []).append(requests(root.parents[1]))
            got.setdefault("find", []).append(wall)
            got.setdefault("files", []).append(count)
        if big is not None:
            with setup.mount(variant) as (root, big):
                drop_caches()
                got.setdefault("read cold", []).append(read_mbs(big / "big.bin"))
                got.setdefault("read warm", []).append(read_mbs(big / "big.bin"))
        report_trial(number, variant, got)


def report_trial(number: int, variant: str, got: dict[str, list[float]]) -> None:
    print(
        f"trial {number} {variant}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in got.items()),
        file=sys.stderr,
        flush=True,
    )


def machine(tree: Path) -> list[str]:
    return [
        *machine_header(tree),
        f"- {_first_line('nginx -v 2>&1')}; {_first_line(['rclone', 'version'])}; "
        f"{_first_line('squashfuse --version 2>&1; true')}; "
        f"{_first_line(['mksquashfs', '-version'])}",
    ]


def _verdict(ok: bool, target: str) -> str:
    return f"{target}: {'met' if ok else 'missed'}"


def report(
    results: dict[str, dict[str, list[float]]], setup: Setup, repeat: int, tree_bytes: int
) -> str:
    med = {v: {k: statistics.median(xs) for k, xs in got.items()} for v, got in results.items()}
    names = list(setup.variants)
    n_files, _ = tree_stats(setup.tree)
    lines = [
        *machine(setup.tree),
        f"- tree: bench/work/release1, {n_files} files, {tree_bytes / 1e6:.0f} MB "
        "(venv: numpy, scipy, pandas, matplotlib, sympy)",
        f'- medians of {repeat} runs. Import: `{PYTHON.name} -S -c "{IMPORT}"` with '
        f"PYTHONPATH=TREE/{SITE} (the same interpreter, on native disk, for every variant: "
        "the venv's bin/python3 is an absolute symlink out of the tree, which rclone "
        "cannot show). Cold = `sync; echo 3 > drop_caches`, a fresh mount with an empty "
        "cache, then the import; mount + cold adds the time from starting the mount "
        "command until the mount answers; warm = the same command again on that mount; "
        f"warm {LATER} s later = once more after a {LATER} s pause (native, ours and "
        "squashfuse_ll only). find = `find -type f | wc -l` on another fresh mount after "
        "dropping caches.",
        "- ours: `cvmfs-client mount` over nginx (docs/OPERATING.md config); squashfuse "
        "(high-level libfuse) and squashfuse_ll (low-level): "
        "mksquashfs -comp zstd image of the tree; rclone: `rclone mount :http: "
        "--vfs-cache-mode full` of nginx serving the release tree itself with "
        "`autoindex on` (the repository layout has no listings); rclone shows symlinks as "
        "what they point to, so lib64 -> lib is walked twice by find",
        "- ours_bundle: release 1 published again (at /sw/bundled) with the prefetch bundles "
        f"of a traced cold import of the same statement; ours_small_bundle: with the bundles "
        f"of a traced `{SMALL_IMPORT}` (at /sw/small); ours_r2_r1_bundle: release 2 "
        "(bench/work/release2) with release 1's full-import bundles; "
        + (
            "its baseline is ours on release 1 (release 2 without bundles is not timed)"
            if setup.has_release2
            else "not run: release 2 was not built (bench/make_release_tree.py)"
        )
        + ". Bundle variants time only the imports. `cvmbuild bundle` said: "
        + "; ".join(f"{v}: {text}" for v, text in setup.bundles.items()),
        "",
        "| measurement | " + " | ".join(names) + " | ours/native | target |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | --- |",
    ]

    def cells(key: str, fmt: str) -> str:
        return " | ".join(fmt.format(med[n][key]) if key in med.get(n, {}) else "–" for n in names)

    def ratios(key: str, base: str = "native") -> str:
        return " | ".join(f"{med[o][key] / med[base][key]:.2f}" for o in OURS)

    judged = "ours"
    for key, title, target in (
        ("cold", "import, cold (s)", "cold"),
        ("mount + cold", "mount + cold import (s)", None),
        ("warm", "import, warm (s)", "warm"),
        ("warm later", f"import, warm again {LATER} s later (s)", "warm"),
    ):
        if key not in med[judged]:
            continue
        verdict = ""
        if target is not None:
            r = med[judged][key] / med["native"][key]
            ok = r <= TARGETS[target]
            said = f"{judged} ≤ {TARGETS[target]}"
            if key == "cold" and "squashfuse_ll" in med:  # and no slower than it
                ok = ok and med[judged][key] <= med["squashfuse_ll"][key]
                said += " and ≤ squashfuse_ll"
            verdict = _verdict(ok, said)
        lines.append(f"| {title} | {cells(key, '{:.2f}')} | {ratios(key)} | {verdict} |")
    lines.append(
        f"| find -type f, cold (s) | {cells('find', '{:.3f}')} | {ratios('find')} | "
        f"{_verdict(med[judged]['find'] <= FIND_TARGET, f'{judged} ≤ {FIND_TARGET} s')} |"
    )
    lines.append(f"| files found | {cells('files', '{:.0f}')} | | |")
    lines.append(
        "| import, cold / native | "
        + " | ".join(
            f"{med[n]['cold'] / med['native']['cold']:.2f}" if "cold" in med.get(n, {}) else "–"
            for n in names
        )
        + " | | |"
    )
    for key, title in (
        ("daemon cpu", "ours: CPU of the mount (daemon and fetch workers) in the cold import (s)"),
        ("fetch wait", "ours: readers waiting for fetches in the cold import (s)"),
        ("bundle fetched", "ours: bundle members fetched"),
        ("bundle hits", "ours: bundle hits (members read after a bundle fetched them)"),
    ):
        lines.append(f"| {title} | {cells(key, '{:.3g}')} | | |")
    frac = med[judged]["downloaded"] / tree_bytes
    mb = {n: {k: v / 1e6 for k, v in med.get(n, {}).items()} for n in names}
    lines.append(
        "| downloaded by mount + cold import (MB, as nginx sent it) | "
        + " | ".join(f"{mb[n]['downloaded']:.1f}" if "downloaded" in mb[n] else "–" for n in names)
        + f" | {frac:.1%} of tree | {_verdict(frac <= DOWNLOAD_TARGET, '≤ 25%')} |"
    )
    lines.append(
        "| content of the objects ours fetched (MB, uncompressed) | "
        + " | ".join(f"{mb[n]['content']:.1f}" if "content" in mb[n] else "–" for n in names)
        + f" | {med['ours']['content'] / tree_bytes:.1%} of tree | |"
    )
    for key in ("read cold", "read warm"):
        lines.append(
            f"| 1 GiB sequential {key[5:]} (MB/s) | {cells(key, '{:.0f}')} | {ratios(key)} | |"
        )
    for variant, trials in setup.requests.items():
        phases = [(p, [t[i] for t in trials]) for p, i in (("cold import", 0), ("warm import", 1))]
        for phase, counts in [*phases, ("cold find", setup.find_requests.get(variant, []))]:
            kinds = sorted({k for c in counts for k in c})
            text = ", ".join(
                f"{k} {statistics.median(c.get(k, 0) for c in counts):.0f}" for k in kinds
            )
            lines.append(f"- FUSE requests of the {phase}, {variant}: {text or 'none'}")
    lines += [
        "",
        "Preparation (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in setup.prep.items()),
    ]
    lines += ["", "All runs:", ""]
    for name in names:
        lines.append(
            f"- {name}: "
            + "; ".join(
                f"{k} " + ", ".join(f"{x:.3g}" for x in xs) for k, xs in results[name].items()
            )
        )
    return "\n".join(lines) + "\n"


def prune(run_dir: Path) -> None:
    """Delete the bulk (repository, image, caches: gigabytes) but keep every *.log, e.g.
    the client.log in each of our mounts' cache directories."""
    for root, dirs, names in os.walk(run_dir, topdown=False):
        if any(os.path.ismount(os.path.join(root, d)) for d in dirs):
            continue  # a mount that would not go away: leave it alone
        for name in names:
            if not name.endswith(".log"):
                os.unlink(os.path.join(root, name))
        with contextlib.suppress(OSError):
            os.rmdir(root)  # only when nothing was kept inside


def main() -> int:
    args = bench_arguments("mount-runs")
    if os.geteuid() != 0:
        print("error: needs root (drop_caches, mounts)", file=sys.stderr)
        return 1
    # Our programs start from bytecode, as an installed product does (pip compiles it):
    # a shell's PYTHONDONTWRITEBYTECODE would have every mount compile the client again.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    product = Path(__file__).resolve().parent.parent
    run([sys.executable, "-m", "compileall", "-q", *(str(product / p) for p in PACKAGES)])
    tree = args.tree.resolve()
    runs = args.runs.resolve()
    shutil.rmtree(runs, ignore_errors=True)  # left by an earlier run
    setup = Setup(tree, runs / datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        setup.prepare()
        for number in range(1, args.repeat + 1):
            trial(setup, results, number)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        setup.close()
        prune(setup.run_dir)
    text = report(results, setup, args.repeat, tree_stats(tree)[1])
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
