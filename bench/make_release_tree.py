"""Two realistic software releases to publish: a scientific Python virtualenv, twice.

Release 1 is a fresh venv with numpy, scipy, pandas, matplotlib and sympy; release 2
is a copy of it (cp -a, so unchanged files keep their bytes and mtimes) with a few
packages moved to newer versions, as a weekly release would. Wheels and trees are
cached under bench/work/ so reruns download and build nothing.

    python bench/make_release_tree.py [--work DIR] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEFAULT_WORK = BENCH / "work"

# Versions that exist on PyPI for Python 3.11 (checked with `pip index versions`).
RELEASE_1 = (
    "numpy==2.3.5",
    "scipy==1.16.3",
    "pandas==2.3.2",
    "matplotlib==3.10.8",
    "sympy==1.13.3",
)
# What changed between the two releases: a pandas bug-fix and a sympy feature release.
RELEASE_2_UPDATES = ("pandas==2.3.3", "sympy==1.14.0")
_UPDATED = {spec.split("==")[0] for spec in RELEASE_2_UPDATES}
# Everything else stays pinned, so pip changes only the updated packages.
RELEASE_2 = tuple(s for s in RELEASE_1 if s.split("==")[0] not in _UPDATED) + RELEASE_2_UPDATES


@dataclass(frozen=True)
class Trees:
    release1: Path
    release2: Path


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def _done_marker(tree: Path) -> Path:
    # Beside the tree, not inside it: the marker must not become part of the release.
    return tree.with_name(tree.name + ".complete")


def _download_wheels(work: Path, python: str) -> Path:
    wheels = work / "wheels"
    marker = work / "wheels.complete"
    if marker.exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    for specs in (RELEASE_1, RELEASE_2):
        _run([python, "-m", "pip", "download", "--only-binary=:all:", "-d", str(wheels), *specs])
    marker.touch()
    return wheels


def _pip_install(tree: Path, wheels: Path, specs: tuple[str, ...]) -> None:
    _run(
        [
            str(tree / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            str(wheels),
            *specs,
        ]
    )


def _fresh(tree: Path) -> None:
    """Remove what an interrupted earlier build left behind."""
    _done_marker(tree).unlink(missing_ok=True)
    if tree.exists():
        shutil.rmtree(tree)


def build_release1(work: Path, wheels: Path, python: str) -> Path:
    tree = work / "release1"
    if _done_marker(tree).exists():
        return tree
    _fresh(tree)
    _run([python, "-m", "venv", str(tree)])
    _pip_install(tree, wheels, RELEASE_1)
    _done_marker(tree).touch()
    return tree


def build_release2(work: Path, wheels: Path, release1: Path) -> Path:
    tree = work / "release2"
    if _done_marker(tree).exists():
        return tree
    _fresh(tree)
    _run(["cp", "-a", str(release1), str(tree)])
    # The copied venv's python finds its pyvenv.cfg beside itself, so pip installs
    # into release 2 even though the copied scripts still name release 1's path.
    _pip_install(tree, wheels, RELEASE_2)
    _done_marker(tree).touch()
    return tree


def ensure_trees(work: Path = DEFAULT_WORK, python: str = sys.executable) -> Trees:
    """Both releases under work/, built only when missing."""
    work.mkdir(parents=True, exist_ok=True)
    wheels = _download_wheels(work, python)
    release1 = build_release1(work, wheels, python)
    release2 = build_release2(work, wheels, release1)
    return Trees(release1, release2)


def tree_stats(tree: Path) -> tuple[int, int]:
    """(regular files, their total bytes) under tree, symlinks not followed."""
    files = size = 0
    for root, _dirs, names in os.walk(tree):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache directory")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter that creates the venvs"
    )
    args = parser.parse_args()
    trees = ensure_trees(args.work.resolve(), args.python)
    for name, tree in (("release 1", trees.release1), ("release 2", trees.release2)):
        files, size = tree_stats(tree)
        print(f"{name}: {tree} ({files} files, {size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
