"""`cvmfs-client config chksetup`: what a mount needs from the machine and the site,
checked one line at a time: FUSE, the cache directory, the keys, the proxies."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit

from cvmfs_client.console import human
from cvmfs_client.fetcher import DIRECT, parse_proxies
from cvmfs_client.trust_store import load_key
from cvmfs_format.errors import CvmfsError
from cvmfs_format.signed import key_fingerprint

PROXY_CONNECT_TIMEOUT_S = 3


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


def fuse_checks(device: str = "/dev/fuse") -> list[Check]:
    checks = []
    try:
        if not stat.S_ISCHR(os.stat(device).st_mode):
            raise OSError(f"{device} is not a character device")
        os.close(os.open(device, os.O_RDWR))
        checks.append(Check(True, device, "present, readable and writable"))
    except OSError as exc:
        detail = exc.strerror or str(exc)
        checks.append(Check(False, device, f"{detail} (modprobe fuse; apt-get install fuse)"))
    found = shutil.which("fusermount3") or shutil.which("fusermount")
    checks.append(
        Check(True, "fusermount", found)
        if found
        else Check(False, "fusermount", "not found (apt-get install fuse)")
    )
    library = ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")
    checks.append(
        Check(True, "libfuse", library)
        if library
        else Check(False, "libfuse", "not found (apt-get install libfuse2)")
    )
    return checks


def cache_check(cache_dir: str, quota: int | None) -> Check:
    """Writable, and on a file system large enough for the quota (CernVM-FS's check)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir) as f:
            f.write(b"x")
        fs = os.statvfs(cache_dir)
    except OSError as exc:
        return Check(False, f"cache {cache_dir}", f"not writable ({exc.strerror})")
    size, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
    limit = "no quota" if quota is None else f"quota {human(quota)}"
    if quota is not None and quota > size:
        return Check(
            False, f"cache {cache_dir}",
            f"{limit} exceeds the file system's size {human(size)}: lower CVMFS_QUOTA_LIMIT",
        )  # fmt: skip
    return Check(True, f"cache {cache_dir}", f"writable, {human(free)} free, {limit}")


def key_checks(candidates: list[str]) -> list[Check]:
    if not candidates:
        return [Check(False, "keys", "none configured (CVMFS_PUBLIC_KEY or CVMFS_KEYS_DIR)")]
    checks = []
    for path in candidates:
        try:
            fingerprint = key_fingerprint(load_key(path))
            checks.append(Check(True, f"key {path}", f"Ed25519 public key {fingerprint[:16]}"))
        except CvmfsError as exc:
            checks.append(Check(False, f"key {path}", str(exc)))
    return checks


def proxy_checks(spec: str) -> list[Check]:
    """Each proxy of CVMFS_HTTP_PROXY accepts connections (DIRECT needs none)."""
    try:
        groups = parse_proxies(spec)
    except CvmfsError as exc:
        return [Check(False, "CVMFS_HTTP_PROXY", str(exc))]
    checks = []
    for proxy in (p for group in groups for p in group):
        if proxy == DIRECT:
            checks.append(Check(True, "proxy DIRECT", "no proxy"))
            continue
        parts = urlsplit(proxy)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection(
                (parts.hostname or "", port), timeout=PROXY_CONNECT_TIMEOUT_S
            ):
                pass
            checks.append(Check(True, f"proxy {proxy}", "accepts connections"))
        except (OSError, ValueError) as exc:
            checks.append(Check(False, f"proxy {proxy}", str(exc) or type(exc).__name__))
    return checks
