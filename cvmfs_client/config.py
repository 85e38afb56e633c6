"""Client settings from a CernVM-FS-style KEY=VALUE file, parsed once into typed data.

Errors name the file, the line and the key. Command-line options override the file.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

from cvmfs_client.errors import ClientError


class ConfigError(ClientError):
    pass


@dataclass(frozen=True)
class ClientConfig:
    server_url: str | None = None  # CVMFS_SERVER_URL: mirrors separated by ';'
    http_proxy: str | None = None  # CVMFS_HTTP_PROXY: "p1|p2;DIRECT"
    quota_limit_mb: int | None = None  # CVMFS_QUOTA_LIMIT, in MB as in CernVM-FS
    cache_base: str | None = None  # CVMFS_CACHE_BASE
    public_key: str | None = None  # CVMFS_PUBLIC_KEY: the master public key file
    tag: str | None = None  # CVMFS_REPOSITORY_TAG
    revision: int | None = None  # CVMFS_REPOSITORY_REVISION
    ca_bundle: str | None = None  # CVMFS_CA_BUNDLE: CA certificates for https

    @property
    def quota_bytes(self) -> int | None:
        return None if self.quota_limit_mb is None else self.quota_limit_mb * 1024 * 1024


KEYS = {
    "CVMFS_SERVER_URL": "server_url",
    "CVMFS_HTTP_PROXY": "http_proxy",
    "CVMFS_QUOTA_LIMIT": "quota_limit_mb",
    "CVMFS_CACHE_BASE": "cache_base",
    "CVMFS_PUBLIC_KEY": "public_key",
    "CVMFS_REPOSITORY_TAG": "tag",
    "CVMFS_REPOSITORY_REVISION": "revision",
    "CVMFS_CA_BUNDLE": "ca_bundle",
}
_INTEGER = {"quota_limit_mb", "revision"}


def parse_config(text: str, source: str) -> ClientConfig:
    values: dict[str, object] = {}
    assert {f.name for f in fields(ClientConfig)} == set(KEYS.values())
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        where = f"{source}:{number}"
        if not sep or not key:
            raise ConfigError(f"{where}: expected KEY=VALUE, got {raw.strip()!r}")
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"{where}: unknown setting {key} (known: {known})")
        try:
            words = shlex.split(value, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from exc
        if len(words) != 1:
            raise ConfigError(f"{where}: {key} needs exactly one value (quote it if it has spaces)")
        name = KEYS[key]
        if name in _INTEGER:
            if not words[0].isdigit():
                raise ConfigError(f"{where}: {key} must be a whole number, got {words[0]!r}")
            values[name] = int(words[0])
        else:
            values[name] = words[0]
    return ClientConfig(**values)  # type: ignore[arg-type]


def load_config(path: str) -> ClientConfig:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_config(f.read(), path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
