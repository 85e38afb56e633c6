"""Client settings as CernVM-FS names them, parsed once into typed data.

The files' syntax is config_syntax's; the directory's layout (which files, in which
order) is site_config's. Errors name the file, the line and the key; parameters the
client does not implement are kept and reported as ignored, never fatal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from cvmfs_client.config_syntax import Assignment, ConfigError, Origin, parse_assignments
from cvmfs_client.daemon_log import LogSettings
from cvmfs_client.errors import ClientError
from cvmfs_client.fetcher import parse_proxies

__all__ = ["Assignment", "ClientConfig", "ConfigError", "Origin", "load_config", "parse_config"]

REPOSITORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
FQRN_VARIABLE = "CVMFS_FQRN"  # set for the files, as CernVM-FS sets it while sourcing them


@dataclass(frozen=True)
class ClientConfig:
    repository: str | None = None  # the fully qualified name the files were read for
    server_url: str | None = None  # CVMFS_SERVER_URL: mirrors separated by ';'
    http_proxy: str | None = None  # CVMFS_HTTP_PROXY: "p1|p2;DIRECT"
    public_keys: tuple[str, ...] = ()  # CVMFS_PUBLIC_KEY: key files separated by ':'
    keys_dir: str | None = None  # CVMFS_KEYS_DIR: every *.pub in it
    repositories: tuple[str, ...] = ()  # CVMFS_REPOSITORIES: separated by ','
    default_domain: str | None = None  # CVMFS_DEFAULT_DOMAIN: appended to a bare name
    strict_mount: bool = False  # CVMFS_STRICT_MOUNT: only CVMFS_REPOSITORIES mount
    mount_dir: str | None = None  # CVMFS_MOUNT_DIR: where autofs mounts them
    quota_limit_mb: int | None = None  # CVMFS_QUOTA_LIMIT, in MB as in CernVM-FS; -1: none
    cache_base: str | None = None  # CVMFS_CACHE_BASE
    kcache_timeout_s: int | None = None  # CVMFS_KCACHE_TIMEOUT: kernel's attribute cache
    max_ttl_minutes: int | None = None  # CVMFS_MAX_TTL: look for new revisions this often
    tag: str | None = None  # CVMFS_REPOSITORY_TAG
    revision: int | None = None  # CVMFS_REPOSITORY_REVISION (cvmfs-client's own)
    syslog_level: int | None = None  # CVMFS_SYSLOG_LEVEL
    syslog_facility: int | None = None  # CVMFS_SYSLOG_FACILITY
    usyslog: str | None = None  # CVMFS_USYSLOG: a file instead of syslog
    debuglog: str | None = None  # CVMFS_DEBUGLOG: a debug log file
    ca_bundle: str | None = None  # CVMFS_CA_BUNDLE: CA certificates for https
    # Every variable's last assignment (values with @fqrn@ expanded), for showconfig.
    effective: tuple[Assignment, ...] = field(default=(), compare=False)
    ignored: tuple[Assignment, ...] = field(default=(), compare=False)

    @property
    def quota_bytes(self) -> int | None:
        if self.quota_limit_mb is None or self.quota_limit_mb < 0:
            return None
        return self.quota_limit_mb * 1024 * 1024

    @property
    def max_ttl_s(self) -> float | None:
        return None if self.max_ttl_minutes is None else self.max_ttl_minutes * 60.0

    @property
    def log(self) -> LogSettings:
        return LogSettings(self.syslog_level, self.syslog_facility, self.usyslog, self.debuglog)

    def origin(self, key: str) -> Origin | None:
        return next((a.origin for a in self.effective if a.key == key), None)


Convert = Callable[[str, str], object]  # (value, directory of its file) -> typed value


def _text(value: str, base: str) -> object:
    return value


def _path(value: str, base: str) -> str:
    # CernVM-FS sources each file from its own directory: relative paths start there.
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _paths(value: str, base: str) -> tuple[str, ...]:
    return tuple(_path(p, base) for p in value.split(":") if p)


def _names(value: str, base: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for name in names:
        if not REPOSITORY_NAME.fullmatch(name):
            raise ValueError(f"lists {name!r}, which is not a repository name")
    return names


def _urls(value: str, base: str) -> str:
    for url in filter(None, value.split(";")):
        if not url.startswith(("http://", "https://", "/")):
            raise ValueError(f"{url!r} is not an http(s):// URL or an absolute directory")
    return value


def _proxies(value: str, base: str) -> str:
    try:
        parse_proxies(value)
    except ClientError as exc:
        raise ValueError(str(exc)) from None
    return value


def _whole(value: str, base: str) -> int:
    if not value.isdigit():
        raise ValueError(f"must be a whole number, got {value!r}")
    return int(value)


def _quota(value: str, base: str) -> int:
    return -1 if value == "-1" else _whole(value, base)


def _yes(value: str, base: str) -> bool:
    # CernVM-FS's IsOn: anything else is off.
    return value.lower() in ("yes", "on", "1", "true")


def _facility(value: str, base: str) -> int:
    number = _whole(value, base)
    if number > 7:
        raise ValueError(f"must be 0 to 7 (LOCAL0 to LOCAL7), got {value!r}")
    return number


SETTINGS: dict[str, tuple[str, Convert]] = {
    "CVMFS_SERVER_URL": ("server_url", _urls),
    "CVMFS_HTTP_PROXY": ("http_proxy", _proxies),
    "CVMFS_PUBLIC_KEY": ("public_keys", _paths),
    "CVMFS_KEYS_DIR": ("keys_dir", _path),
    "CVMFS_REPOSITORIES": ("repositories", _names),
    "CVMFS_DEFAULT_DOMAIN": ("default_domain", _text),
    "CVMFS_STRICT_MOUNT": ("strict_mount", _yes),
    "CVMFS_MOUNT_DIR": ("mount_dir", _path),
    "CVMFS_QUOTA_LIMIT": ("quota_limit_mb", _quota),
    "CVMFS_CACHE_BASE": ("cache_base", _path),
    "CVMFS_KCACHE_TIMEOUT": ("kcache_timeout_s", _whole),
    "CVMFS_MAX_TTL": ("max_ttl_minutes", _whole),
    "CVMFS_REPOSITORY_TAG": ("tag", _text),
    "CVMFS_REPOSITORY_REVISION": ("revision", _whole),
    "CVMFS_SYSLOG_LEVEL": ("syslog_level", _whole),
    "CVMFS_SYSLOG_FACILITY": ("syslog_facility", _facility),
    "CVMFS_USYSLOG": ("usyslog", _path),
    "CVMFS_DEBUGLOG": ("debuglog", _path),
    "CVMFS_CA_BUNDLE": ("ca_bundle", _path),
}
assert {n for n, _ in SETTINGS.values()} <= {f.name for f in fields(ClientConfig)}


def expand_name(value: str, fqrn: str | None) -> str:
    """CernVM-FS's @fqrn@ (sw.example.org) and @org@ (sw); kept as they are until the
    repository is known."""
    if fqrn is None:
        return value
    return value.replace("@fqrn@", fqrn).replace("@org@", fqrn.split(".")[0])


def config_from(assignments: Iterable[Assignment], fqrn: str | None) -> ClientConfig:
    """The typed settings of a sequence of assignments, the later winning."""
    last: dict[str, Assignment] = {}
    for assignment in assignments:
        last.pop(assignment.key, None)
        last[assignment.key] = assignment
    values: dict[str, object] = {}
    effective, ignored = [], []
    for key, assignment in last.items():
        value = expand_name(assignment.value, fqrn)
        assignment = Assignment(key, value, assignment.origin)
        effective.append(assignment)
        if key in SETTINGS:
            name, convert = SETTINGS[key]
            if value == "":
                continue  # as unset: CernVM-FS files often clear a setting this way
            try:
                values[name] = convert(value, os.path.dirname(assignment.origin.file))
            except ValueError as exc:
                raise ConfigError(f"{assignment.origin}: {key} {exc}") from None
        elif key.startswith("CVMFS_") and key != FQRN_VARIABLE:
            ignored.append(assignment)
    return ClientConfig(
        repository=fqrn, effective=tuple(effective), ignored=tuple(ignored),
        **values,  # type: ignore[arg-type]
    )  # fmt: skip


def read_file(path: str, variables: dict[str, str]) -> list[Assignment]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason})") from exc
    return parse_assignments(text, path, variables)


def fqrn_variables(fqrn: str | None) -> dict[str, str]:
    return {} if fqrn is None else {FQRN_VARIABLE: fqrn}


def parse_config(text: str, source: str, fqrn: str | None = None) -> ClientConfig:
    """The settings of one file's text; source names it in errors."""
    return config_from(parse_assignments(text, source, fqrn_variables(fqrn)), fqrn)


def load_config(path: str, fqrn: str | None = None) -> ClientConfig:
    """One CernVM-FS-style file (`--config`), read as if it were the only layer."""
    return config_from(read_file(path, fqrn_variables(fqrn)), fqrn)


def check_repository_name(name: str) -> str:
    """A repository name is also a file name here (config.d/NAME.conf, the cache)."""
    if not REPOSITORY_NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a repository name (like sw.example.org)")
    return name
