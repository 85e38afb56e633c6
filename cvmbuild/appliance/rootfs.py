"""The appliance's root file system: a Debian minbase from mmdebstrap with cvmfs-client
inside, trimmed, hashed for reproducibility, and packed as a read-only squashfs.

Downloaded packages stay in a cache directory (CVMBUILD_APPLIANCE_CACHE, default
~/.cache/cvmbuild/appliance), so a rebuild fetches nothing that did not change.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cvmfs_client
import cvmfs_format
from cvmbuild.appliance import (
    cache_disk,
    cloud_config,
    context,
    copilot_agent,
    copilot_protocol,
    guest_agent,
    seeds,
)
from cvmbuild.appliance.errors import ApplianceError
from cvmbuild.appliance.initramfs import AGENT_PATH
from cvmbuild.appliance.process import run
from cvmbuild.appliance.recipe import Recipe, mount_point

# What cvmfs_client and cvmfs_format import or load, as Debian packages.
CLIENT_PACKAGES = ["python3-cryptography", "python3-zstandard", "python3-pycurl", "libfuse3-3"]
# What the guest agent needs beyond the standard library: cloud-config's YAML (0.65 MB
# installed with libyaml) and mkfs.ext4 for the cache disk.
AGENT_PACKAGES = ["python3-yaml", "e2fsprogs"]
BOOT_RECORD = "cvmbuild-boot-packages"  # written by the download hook, read and removed


def cache_dir() -> Path:
    configured = os.environ.get("CVMBUILD_APPLIANCE_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cvmbuild" / "appliance"


def boot_download_hook(kernel_package: str) -> str:
    """Shell run in the chroot: download the kernel and busybox-static (never installed
    in the root) and record which package versions they are."""
    return f"""set -e
apt-get install -y -qq --download-only --no-install-recommends \\
    {kernel_package} busybox-static >/dev/null
kernel={kernel_package}
case "$kernel" in linux-image-[0-9]*) ;; *)
  kernel=$(apt-cache depends "$kernel" \\
    | sed -n 's/^ *Depends: \\(linux-image-[0-9][^ ]*\\)$/\\1/p' | head -n1) ;;
esac
for pkg in "$kernel" busybox-static; do
  echo "$pkg $(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
done > /{BOOT_RECORD}
"""


def mmdebstrap_command(recipe: Recipe, target: Path, cache: Path, hook: Path) -> list[str]:
    archives, lists = cache / "archives", cache / "lists"
    packages = sorted({*CLIENT_PACKAGES, *AGENT_PACKAGES, *recipe.base.packages})
    return [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--dpkgopt=force-unsafe-io",  # no fsync per file: the tree is thrown away anyway
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        f"--include={','.join(packages)}",
        "--skip=download/empty", "--skip=essential/unlink",
        f"--setup-hook=mkdir -p {archives} {lists}",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/ "$1"/var/lib/apt/lists/',
        f"--setup-hook=sync-in {archives} /var/cache/apt/archives/",
        f"--setup-hook=sync-in {lists} /var/lib/apt/lists/",
        f"--customize-hook=upload {hook} /{BOOT_RECORD}.sh",
        f'--customize-hook=chroot "$1" sh /{BOOT_RECORD}.sh',
        f'--customize-hook=rm "$1"/{BOOT_RECORD}.sh',
        f"--customize-hook=sync-out /var/cache/apt/archives {archives}",
        f"--customize-hook=sync-out /var/lib/apt/lists {lists}",
        recipe.base.suite, str(target), *recipe.apt_sources(),
    ]  # fmt: skip


@dataclass(frozen=True)
class Rootfs:
    tree: Path
    packages: list[tuple[str, str]]  # installed in the root, as dpkg reports them
    boot_packages: list[tuple[str, str]]  # kernel and busybox-static: (name, version)


def bootstrap(recipe: Recipe, target: Path, cache: Path) -> Rootfs:
    if target.exists():
        shutil.rmtree(target)
    env = {"SOURCE_DATE_EPOCH": str(recipe.base.source_date_epoch), "LC_ALL": "C.UTF-8"}
    hook = target.with_name("boot-download-hook.sh")
    hook.write_text(boot_download_hook(recipe.kernel.package))
    run(mmdebstrap_command(recipe, target, cache, hook), env=env)
    record = target / BOOT_RECORD
    boot = [tuple(line.split(" ", 1)) for line in record.read_text().splitlines() if line]
    record.unlink()
    if len(boot) != 2 or not all(len(b) == 2 and b[1] for b in boot):
        raise ApplianceError(
            f"cannot resolve kernel package {recipe.kernel.package!r} in {recipe.base.suite}: "
            f"got {boot}"
        )
    listing = run(["chroot", target, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"])
    packages = [tuple(line.split(" ", 1)) for line in listing.decode().splitlines() if line]
    return Rootfs(target, packages, boot)  # type: ignore[arg-type]


def deb_file(cache: Path, name: str, version: str) -> Path:
    path = cache / "archives" / f"{name}_{version.replace(':', '%3a')}_amd64.deb"
    if not path.exists():
        raise ApplianceError(f"{path}: downloaded package missing from the cache")
    return path


def unpacked(cache: Path, name: str, version: str) -> Path:
    """The content of a cached .deb, unpacked once per version."""
    target = cache / "unpacked" / f"{name}_{version.replace(':', '%3a')}"
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        run(["dpkg-deb", "-x", deb_file(cache, name, version), partial])
        partial.rename(target)
    return target


def appliance_settings(recipe: Recipe) -> str:
    repositories = []
    for repo in recipe.repository:
        key = recipe.public_key_file(repo)
        repositories.append(
            context.RepoSettings(
                name=repo.name,
                url=repo.url,
                mount_point=mount_point(repo),
                public_key=key.read_text() if key else "",
                proxy=repo.proxy,
                cache_quota=repo.cache_quota,
            )
        )
    settings = context.Settings(
        hostname=recipe.appliance.hostname,
        repositories=repositories,
        job=recipe.job.command,
        then=recipe.job.then,
    )
    return context.settings_to_json(settings)


def install_appliance_files(rootfs: Rootfs, recipe: Recipe) -> list[tuple[str, str]]:
    """cvmfs-client, the guest agent (with the Co-Pilot agent) and the records
    of what the image is."""
    tree = rootfs.tree
    site = tree / "usr/lib/python3/dist-packages"
    for package in (cvmfs_client, cvmfs_format):  # the client and the format it reads
        shutil.copytree(
            Path(package.__file__).parent,  # type: ignore[arg-type]
            site / package.__name__,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    write = _writer(tree)
    write("usr/bin/cvmfs-client", CLIENT_SCRIPT, 0o755)
    write(AGENT_PATH.lstrip("/"), Path(guest_agent.__file__).read_text(), 0o755)
    # the guest agent imports them from beside itself
    for module in (copilot_agent, copilot_protocol, context, cloud_config, seeds, cache_disk):
        beside = Path(AGENT_PATH).parent / Path(module.__file__).name  # type: ignore[arg-type]
        write(str(beside).lstrip("/"), Path(module.__file__).read_text())  # type: ignore[arg-type]
    write("etc/cvmappliance/appliance.json", appliance_settings(recipe) + "\n")
    write("etc/cvmappliance/recipe.toml", recipe.text)
    ours = [("cvmfs-client", importlib.metadata.version("cvmfs-py"))]
    lines = [f"{n} {v}" for n, v in [*rootfs.packages, *rootfs.boot_packages, *ours]]
    write("etc/cvmappliance/packages.txt", "\n".join(lines) + "\n")
    write("etc/hostname", recipe.appliance.hostname + "\n")
    write("etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {recipe.appliance.hostname}\n")
    write("etc/resolv.conf", "")  # never the build host's; DHCP fills it at boot
    write("etc/fstab", "# the root is a squashfs with a tmpfs overlay (cvmbuild)\n")
    for path in (
        "usr/lib/python3/dist-packages/cvmfs_client",
        "usr/lib/python3/dist-packages/cvmfs_format",
    ):
        run(["chroot", tree, "python3", "-m", "compileall", "-q",
             "--invalidation-mode", "unchecked-hash", f"/{path}"])  # fmt: skip
    return ours


CLIENT_SCRIPT = """#!/usr/bin/python3
import sys

from cvmfs_client.cli import main

sys.exit(main())
"""


def _writer(tree: Path) -> Callable[..., None]:
    def write(rel: str, text: str, mode: int = 0o644) -> None:
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        path.chmod(mode)

    return write


def trim(tree: Path, patterns: Iterable[str]) -> int:
    """Remove what matches the recipe's globs (relative to the root); returns bytes freed."""
    freed = 0
    for pattern in patterns:
        for path in sorted(tree.glob(pattern), reverse=True):
            if path.is_symlink() or path.is_file():
                freed += path.lstat().st_size
                path.unlink()
            elif path.is_dir():
                freed += sum(p.lstat().st_size for p in path.rglob("*"))
                shutil.rmtree(path)
    return freed


@dataclass(frozen=True)
class TreeEntry:
    path: str
    mode: int
    uid: int
    gid: int
    size: int
    digest: str  # sha256 of a file's content, a symlink's target, or "" for the rest
    rdev: int


def walk(tree: Path) -> Iterator[TreeEntry]:
    for directory, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(directory, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = hashlib.sha256(os.readlink(full).encode()).hexdigest()
            else:
                digest = ""
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            rel = os.path.relpath(full, tree)
            yield TreeEntry(rel, st.st_mode, st.st_uid, st.st_gid, size, digest, st.st_rdev)


def content_hash(entries: Iterable[TreeEntry]) -> str:
    """What the image contains, independent of timestamps and of the order of the walk:
    the same recipe and package versions give the same hash."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(
            f"{e.path}\0{e.mode:o}\0{e.uid}\0{e.gid}\0{e.size}\0{e.digest}\0{e.rdev}\n".encode()
        )
    return h.hexdigest()


def make_squashfs(tree: Path, out: Path, recipe: Recipe) -> None:
    epoch = str(recipe.base.source_date_epoch)
    compression = {
        "zstd": ["-comp", "zstd", "-Xcompression-level", "9"],  # 19 is 8x slower for 5 %
        "xz": ["-comp", "xz", "-Xbcj", "x86"],
        "gzip": ["-comp", "gzip"],
    }[recipe.base.compression]
    out.unlink(missing_ok=True)
    run(["mksquashfs", tree, out, "-noappend", "-no-progress", "-quiet", "-b", "256K",
         *compression, "-all-time", epoch, "-mkfs-time", epoch])  # fmt: skip


def record(rootfs: Rootfs, extra: list[tuple[str, str]], digest: str, recipe: Recipe) -> str:
    """The build record written next to the images (and into the boot partition)."""
    return json.dumps(
        {
            "recipe": str(recipe.path),
            "recipe_sha256": hashlib.sha256(recipe.text.encode()).hexdigest(),
            "rootfs_content_sha256": digest,
            "kernel": dict(rootfs.boot_packages),
            "packages": dict([*rootfs.packages, *extra]),
        },
        indent=2,
        sort_keys=True,
    )
