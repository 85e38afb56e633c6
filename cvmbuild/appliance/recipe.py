"""Appliance recipes (recipes/*.toml) parsed once into typed, validated dataclasses.

Every setting is one field; an unknown key, a value of the wrong type or a bad format
name is an error naming the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cvmbuild.appliance import FORMATS
from cvmbuild.appliance.errors import RecipeError

# Drivers for every target: QEMU/KVM (virtio), VirtualBox and Parallels (ahci, e1000),
# VMware (ahci, pvscsi, LSI Logic, vmxnet3, e1000e), Hyper-V/Azure (hv_*), EC2 (nvme,
# ena, xen), plus what the boot itself needs (squashfs root, overlay, FUSE, the FAT or
# ISO9660 seed drives, the ext4 cache disk), and the host-guest channels of the BOINC
# wrappers: vboxwrapper's shared folder (vboxguest, vboxsf), QEMU's 9p and virtio console.
DEFAULT_MODULES = [
    "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net",
    "sd_mod", "sr_mod", "ata_piix", "ata_generic", "ahci", "nvme",
    "vmw_pvscsi", "mptspi", "vmxnet3", "e1000", "e1000e",
    "hv_vmbus", "hv_storvsc", "hv_netvsc",
    "ena", "xen_blkfront", "xen_netfront",
    "squashfs", "overlay", "fuse", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "isofs",
    "ext4", "crc32c_generic",  # ext4's checksums: its softdep names the alias crc32c
    "vboxguest", "vboxsf", "9p", "9pnet_virtio", "virtio_console",
]  # fmt: skip

# What an appliance does not need at run time (paths relative to the root, globs).
DEFAULT_REMOVE = [
    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/lintian/*",
    "usr/share/doc/*/[!c]*", "usr/share/doc/*/changelog*", "usr/share/doc-base/*",
    "var/lib/apt/lists/*", "var/cache/apt/*", "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old", "var/log/*", "usr/share/bash-completion/*",
    "usr/lib/python3.11/idlelib", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/ensurepip",
    "usr/lib/x86_64-linux-gnu/gconv/*.so", "usr/share/zoneinfo/right",
]  # fmt: skip


@dataclass(frozen=True)
class Appliance:
    name: str = "cvm-thin"  # output file names: NAME.qcow2, NAME.ova, ...
    hostname: str = "cvm-thin"
    size_budget_mb: int = 100  # every compressed image must fit (the paper's 100 MB)
    formats: list[str] = field(default_factory=lambda: ["qcow2"])  # when --format is absent
    uefi: bool = True  # boots under UEFI firmware too (SYSLINUX's EFI loader on the ESP)


@dataclass(frozen=True)
class Base:
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"  # also SUITE-updates
    security_mirror: str = "http://deb.debian.org/debian-security"  # "" leaves it out
    packages: list[str] = field(default_factory=list)  # on top of what cvmfs-client needs
    remove: list[str] = field(default_factory=lambda: list(DEFAULT_REMOVE))
    source_date_epoch: int = 1704067200  # timestamps inside the image (reproducibility)
    compression: str = "zstd"  # squashfs root: zstd (fast to build and boot) or xz (smaller)


@dataclass(frozen=True)
class Kernel:
    package: str = "linux-image-amd64"
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))
    command_line: str = "console=tty0 console=ttyS0,115200n8 quiet panic=10"


@dataclass(frozen=True)
class Repository:
    name: str
    url: str  # mirrors separated by ';'
    mount_point: str = ""  # default /cvmfs/NAME
    public_key: str = ""  # file, relative to the recipe; or given as user data at boot
    proxy: str = "DIRECT"
    cache_quota: str = "1G"


@dataclass(frozen=True)
class Job:
    command: str = ""
    then: str = "poweroff"  # poweroff | stay


@dataclass(frozen=True)
class Vm:
    memory_mb: int = 512
    cpus: int = 1


@dataclass(frozen=True)
class Boinc:
    """`export --format boinc`: the BOINC application and its job file (vm_job.xml,
    vbox_job.xml); guest memory and CPUs come from [vm]."""

    app_name: str = ""  # the BOINC app's name; "" means [appliance] name
    version: str = "1.00"  # the app version directory; version_num = 100 * major + minor
    plan_class: str = "qemu"  # the QEMU variant's plan class (the project defines it)
    vbox_plan_class: str = "vbox64"  # the VirtualBox variant's
    job_duration: int = 0  # seconds; >0: the VM is stopped (success) then, progress by time
    minimum_heartbeat_interval: int = 600  # seconds without a sign of life: the task failed
    minimum_checkpoint_interval: int = 600  # seconds between two saved VM states
    output_disk_mb: int = 1024  # the disk the job's directory lives on (QEMU variant)
    enable_network: bool = True
    copy_to_guest: list[str] = field(default_factory=list)  # work unit inputs (logical names)
    copy_from_guest: list[str] = field(default_factory=list)  # the job's outputs, uploaded


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str  # recorded in the image
    appliance: Appliance = field(default_factory=Appliance)
    base: Base = field(default_factory=Base)
    kernel: Kernel = field(default_factory=Kernel)
    repository: list[Repository] = field(default_factory=list)
    job: Job = field(default_factory=Job)
    vm: Vm = field(default_factory=Vm)
    boinc: Boinc = field(default_factory=Boinc)

    def apt_sources(self) -> list[str]:
        """mmdebstrap's mirror arguments: the release, its updates and security."""
        suite, mirror = self.base.suite, self.base.mirror
        sources = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main"]
        if self.base.security_mirror:
            sources.append(f"deb {self.base.security_mirror} {suite}-security main")
        return sources

    def public_key_file(self, repo: Repository) -> Path | None:
        return (self.path.parent / repo.public_key) if repo.public_key else None


_TABLES = {"appliance": Appliance, "base": Base, "kernel": Kernel, "job": Job, "vm": Vm,
           "boinc": Boinc}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BOINC_VERSION = re.compile(r"^([0-9]{1,3})\.([0-9]{2})$")


class _Locator:
    """Finds the line of a key in the TOML text, for messages (tomllib keeps no lines)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def line(self, table: str, index: int | None, key: str | None) -> int:
        header = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")
        current, seen = "", -1
        table_line = 0
        for number, raw in enumerate(self.lines, start=1):
            match = header.match(raw)
            if match:
                current = match.group(1)
                if current == table:
                    seen += 1
                    if index is None or seen == index:
                        table_line = number
                continue
            if current == table and (index is None or seen == index) and key is not None:
                if re.match(rf"^\s*{re.escape(key)}\s*=", raw):
                    return number
        return table_line or 1


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return "a list of " + _type_name(typing.get_args(kind)[0]) + "s"
    return {str: "string", int: "integer", bool: "boolean"}.get(
        kind, getattr(kind, "__name__", "?")
    )


def _check_value(kind: Any, value: Any) -> bool:
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_check_value(item, v) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _build(cls: type, data: Any, where: str, locate: typing.Callable[[str | None], int]) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}:{locate(None)}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known or key in ("path", "text"):
            names = ", ".join(n for n in known if n not in ("path", "text"))
            raise RecipeError(f"{where}:{locate(key)}: unknown key {key!r} (known: {names})")
        kind = hints[key]
        if not _check_value(kind, value):
            raise RecipeError(
                f"{where}:{locate(key)}: {key} must be {_type_name(kind)}, got {value!r}"
            )
        values[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"{where}:{locate(None)}: missing key {missing[0]!r}")
    return cls(**values)


def parse_recipe(text: str, path: Path) -> Recipe:
    source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML: {exc}") from exc
    locator = _Locator(text)
    parts: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TABLES:
            parts[key] = _build(_TABLES[key], value, source, partial(locator.line, key, None))
        elif key == "repository":
            if not isinstance(value, list):
                line = locator.line(key, None, None)
                raise RecipeError(f"{source}:{line}: write repositories as [[repository]]")
            parts[key] = [
                _build(Repository, item, source, partial(locator.line, "repository", i))
                for i, item in enumerate(value)
            ]
        else:
            known = ", ".join([*_TABLES, "repository"])
            raise RecipeError(
                f"{source}:{locator.line(key, None, None)}: unknown table [{key}] (known: {known})"
            )
    recipe = Recipe(path=path, text=text, **parts)
    _validate(recipe, locator)
    return recipe


def _validate(recipe: Recipe, locator: _Locator) -> None:
    source = str(recipe.path)

    def fail(table: str, index: int | None, key: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{source}:{locator.line(table, index, key)}: {key}: {message}")

    for name in recipe.appliance.formats:
        if name not in FORMATS:
            fail("appliance", None, "formats", f"unknown format {name!r} ({', '.join(FORMATS)})")
    if not _NAME.match(recipe.appliance.name):
        fail("appliance", None, "name", "use letters, digits, '.', '_' and '-'")
    if recipe.base.compression not in ("zstd", "xz", "gzip"):
        fail("base", None, "compression", "must be zstd, xz or gzip")
    if recipe.job.then not in ("poweroff", "stay"):
        fail("job", None, "then", "must be poweroff or stay")
    for i, repo in enumerate(recipe.repository):
        if not _NAME.match(repo.name):
            fail("repository", i, "name", "use letters, digits, '.', '_' and '-'")
        if not repo.url.startswith(("http://", "https://")):
            fail("repository", i, "url", "must be http:// or https:// URLs separated by ';'")
        if repo.mount_point and not repo.mount_point.startswith("/"):
            fail("repository", i, "mount_point", "must be an absolute path")
        key = recipe.public_key_file(repo)
        if key is not None and not key.is_file():
            fail("repository", i, "public_key", f"{key} does not exist")
    _validate_boinc(recipe.boinc, partial(fail, "boinc", None))


def _validate_boinc(boinc: Boinc, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    if not _BOINC_VERSION.match(boinc.version):
        fail("version", 'write it as MAJOR.MINOR with two decimals, e.g. "1.00" (version_num 100)')
    if boinc.app_name and not _NAME.match(boinc.app_name):
        fail("app_name", "use letters, digits, '.', '_' and '-'")
    for key in ("plan_class", "vbox_plan_class"):
        value = getattr(boinc, key)
        # update_versions splits the directory PLATFORM__PLANCLASS on "__"
        if not _NAME.match(value) or "__" in value:
            fail(key, "use letters, digits, '.', '_' and '-', and no '__'")
    if boinc.job_duration < 0:
        fail("job_duration", "must be 0 (no limit) or a number of seconds")
    for key in ("minimum_heartbeat_interval", "minimum_checkpoint_interval", "output_disk_mb"):
        if getattr(boinc, key) <= 0:
            fail(key, "must be positive")
    for key in ("copy_to_guest", "copy_from_guest"):
        for name in getattr(boinc, key):
            if not _NAME.match(name):
                fail(key, f"{name!r} is not a plain file name (letters, digits, '.', '_', '-')")


def parse_formats(text: str) -> list[str]:
    """`--format qcow2,vdi`: validated, duplicates dropped, order kept."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise RecipeError(
            f"--format {text!r}: unknown format {', '.join(bad) or '(none)'}; "
            f"choose from {', '.join(FORMATS)}"
        )
    return list(dict.fromkeys(names))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from exc
    return parse_recipe(text, path)


def boinc_version_num(version: str) -> int:
    """BOINC's version number of an app version directory name ("1.00" -> 100), as
    update_versions computes it."""
    match = _BOINC_VERSION.match(version)
    assert match, version  # validated with the recipe
    return 100 * int(match.group(1)) + int(match.group(2))


def mount_point(repo: Repository) -> str:
    return repo.mount_point or f"/cvmfs/{repo.name}"
