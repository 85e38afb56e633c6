"""User data and meta-data in cloud-init's formats, read into typed values (pure: text
in, values out; copied into the image beside the guest agent).

User data is `#cloud-config` YAML (the keys in CLOUD_CONFIG_KEYS), a `#!` script, a MIME
multipart message of those, or the appliance's own TOML (guest_agent.parse_user_data).
Meta-data is NoCloud's YAML `meta-data` or OpenStack's `meta_data.json`. A key the
appliance does not implement is refused, naming it: silently ignoring a setting the
user relies on is worse than not booting. YAML is read with PyYAML (python3-yaml in the
image: 0.65 MB installed with libyaml, against cloud-init's 2.7 MB plus its dependencies
and its systemd boot stages, which this appliance does not have).
"""

from __future__ import annotations

import base64
import binascii
import email
import gzip
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

CLOUD_CONFIG_KEYS = ("cvmfs", "write_files", "runcmd", "hostname", "ssh_authorized_keys",
                     "copilot")  # fmt: skip
CVMFS_KEYS = ("repositories", "proxy", "http_proxy", "server_url", "keys", "cache_quota")
# A site's CernVM-FS spelling of the same settings, accepted as such.
CVMFS_ALIASES = {"CVMFS_REPOSITORIES": "repositories", "CVMFS_HTTP_PROXY": "http_proxy",
                 "CVMFS_SERVER_URL": "server_url", "CVMFS_QUOTA_LIMIT": "cache_quota"}  # fmt: skip
REPOSITORY_KEYS = ("name", "url", "mount_point", "public_key", "proxy")
WRITE_FILE_KEYS = ("path", "content", "encoding", "permissions", "owner", "append", "defer")
MIME_TYPES = {"text/cloud-config": "#cloud-config", "text/x-shellscript": "script"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # as recipe.py's: it becomes a path


class UserDataError(Exception):
    """User data or meta-data the appliance cannot use; the message names the key."""


@dataclass(frozen=True)
class RepoEntry:
    name: str
    url: str | None = None
    mount_point: str | None = None
    public_key: str | None = None
    proxy: str | None = None


@dataclass(frozen=True)
class Cvmfs:
    repositories: tuple[RepoEntry, ...] | None = None  # None: the recipe's
    proxy: str | None = None
    server_url: str | None = None  # @fqrn@ and @org@ are expanded per repository
    keys: dict[str, str] = field(default_factory=dict)  # repository name -> PEM
    cache_quota: str | None = None

    def url_for(self, name: str) -> str | None:
        if self.server_url is None:
            return None
        return self.server_url.replace("@fqrn@", name).replace("@org@", name.split(".")[0])


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: bytes
    permissions: int = 0o644
    owner: str = "root:root"
    append: bool = False


@dataclass(frozen=True)
class CloudConfig:
    """What a `#cloud-config` document (or several, merged) asks for."""

    keys: tuple[str, ...] = ()
    cvmfs: Cvmfs | None = None
    write_files: tuple[WriteFile, ...] = ()
    runcmd: tuple[str, ...] = ()  # shell lines
    hostname: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    copilot: dict[str, str] | None = None
    scripts: tuple[str, ...] = ()  # `#!` user scripts, run after runcmd


@dataclass(frozen=True)
class MetaData:
    hostname: str | None = None
    instance_id: str | None = None
    public_keys: tuple[str, ...] = ()


def user_data_format(text: str) -> str:
    """#cloud-config, script, mime or toml: what cloud-init would take the text for."""
    head = text.lstrip("\ufeff")
    if head.startswith("#cloud-config"):
        return "#cloud-config"
    if head.startswith("#!"):
        return "script"
    if re.match(r"(?i)(content-type|mime-version):", head.lstrip()):
        return "mime"
    return "toml"


def mime_parts(text: str, source: str) -> list[tuple[str, str]]:
    """(format, text) of each part of a MIME multipart message; text/plain parts are
    told apart by their first line, as cloud-init does."""
    message = email.message_from_string(text.lstrip())
    parts: list[tuple[str, str]] = []
    for number, part in enumerate(message.walk(), start=1):
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        payload = part.get_payload(decode=True)
        body = payload.decode("utf-8") if isinstance(payload, bytes) else str(payload or "")
        kind = MIME_TYPES.get(ctype)
        if ctype == "text/plain":
            kind = user_data_format(body)
            kind = None if kind == "mime" else kind
        if kind is None:
            known = ", ".join([*MIME_TYPES, "text/plain"])
            raise UserDataError(
                f"{source}: MIME part {number}: content type {ctype} is not supported "
                f"(supported: {known})"
            )
        parts.append((kind, body))
    return parts


def parse_cloud_config(documents: list[str], scripts: list[str], source: str) -> CloudConfig:
    """Merge the #cloud-config documents (a later one's top-level keys win) and read
    them; scripts are `#!` parts."""
    import yaml  # python3-yaml in the image; only cloud-config user data needs it

    merged: dict[str, Any] = {}
    for text in documents:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise UserDataError(f"{source}: #cloud-config is not valid YAML: {detail}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise UserDataError(f"{source}: #cloud-config must be a mapping of keys")
        merged.update(data)
    _refuse_unknown(merged, CLOUD_CONFIG_KEYS, source, "#cloud-config")
    at = f"{source}: "
    copilot = None
    if "copilot" in merged:  # its keys are checked where the TOML table's are
        values = _mapping(merged["copilot"], at + "copilot").items()
        copilot = {k: _string(v, f"{at}copilot.{k}") for k, v in values}
    return CloudConfig(
        keys=tuple(merged),
        cvmfs=_cvmfs(merged["cvmfs"], at + "cvmfs") if "cvmfs" in merged else None,
        write_files=tuple(
            _write_file(item, f"{at}write_files[{i}]")
            for i, item in enumerate(_list(merged.get("write_files", []), at + "write_files"))
        ),
        runcmd=tuple(
            _command(item, f"{at}runcmd[{i}]")
            for i, item in enumerate(_list(merged.get("runcmd", []), at + "runcmd"))
        ),
        hostname=_optional_string(merged.get("hostname"), at + "hostname"),
        ssh_authorized_keys=tuple(
            _string(item, f"{at}ssh_authorized_keys[{i}]")
            for i, item in enumerate(
                _list(merged.get("ssh_authorized_keys", []), at + "ssh_authorized_keys")
            )
        ),
        copilot=copilot,
        scripts=tuple(scripts),
    )


def _cvmfs(value: Any, where: str) -> Cvmfs:
    section = {CVMFS_ALIASES.get(k, k): v for k, v in _mapping(value, where).items()}
    _refuse_unknown(section, CVMFS_KEYS, where, "")
    if "proxy" in section and "http_proxy" in section:
        raise UserDataError(f"{where}: give proxy or http_proxy, not both")
    repositories = None
    if "repositories" in section:
        raw = section["repositories"]
        items = raw.split(",") if isinstance(raw, str) else _list(raw, f"{where}.repositories")
        repositories = tuple(
            _repository(item, f"{where}.repositories[{i}]") for i, item in enumerate(items)
        )
    keys = {}
    for name, pem in _mapping(section.get("keys", {}), f"{where}.keys").items():
        keys[_repo_name(name, f"{where}.keys")] = _string(pem, f"{where}.keys.{name}")
    return Cvmfs(
        repositories=repositories,
        proxy=_optional_string(section.get("proxy", section.get("http_proxy")), where + ".proxy"),
        server_url=_optional_string(section.get("server_url"), where + ".server_url"),
        keys=keys,
        cache_quota=_optional_string(section.get("cache_quota"), where + ".cache_quota"),
    )


def _repository(item: Any, where: str) -> RepoEntry:
    if isinstance(item, str):
        return RepoEntry(_repo_name(item.strip(), where))
    values = _mapping(item, where)
    _refuse_unknown(values, REPOSITORY_KEYS, where, "")
    if "name" not in values:
        raise UserDataError(f"{where}: a repository needs a name (it is mounted at /cvmfs/NAME)")
    fields = {k: _string(v, f"{where}.{k}") for k, v in values.items()}
    fields["name"] = _repo_name(fields["name"], where)
    if "mount_point" in fields and not fields["mount_point"].startswith("/"):
        raise UserDataError(f"{where}.mount_point: must be an absolute path")
    return RepoEntry(**fields)


def _write_file(item: Any, where: str) -> WriteFile:
    values = _mapping(item, where)
    _refuse_unknown(values, WRITE_FILE_KEYS, where, "")
    path = _string(values.get("path"), f"{where}.path")
    if not path.startswith("/"):
        raise UserDataError(f"{where}.path: must be an absolute path")
    content = values.get("content", "")
    data = _string(content, f"{where}.content").encode()
    encoding = str(values.get("encoding", "text")).lower()
    try:
        if encoding in ("b64", "base64", "gz+b64", "gzip+base64", "gz+base64"):
            data = base64.b64decode(data, validate=False)
        if encoding.startswith(("gz", "gzip")):
            data = gzip.decompress(data)
        elif encoding not in ("text", "text/plain", "b64", "base64"):
            raise UserDataError(f"{where}.encoding: {encoding!r} is not b64, gz+b64 or text")
    except (binascii.Error, OSError, EOFError) as exc:
        raise UserDataError(f"{where}.content: not {encoding}: {exc}") from None
    permissions = values.get("permissions", "0644")
    try:
        mode = permissions if isinstance(permissions, int) else int(str(permissions), 8)
    except ValueError:
        raise UserDataError(f"{where}.permissions: write an octal mode like '0644'") from None
    append = values.get("append", False)
    if not isinstance(append, bool):
        raise UserDataError(f"{where}.append: must be true or false")
    owner = _string(values.get("owner", "root:root"), f"{where}.owner")
    return WriteFile(path, data, mode, owner, append)


def _command(item: Any, where: str) -> str:
    if isinstance(item, list) and all(isinstance(a, str | int | float) for a in item):
        return shlex.join(str(a) for a in item)
    return _string(item, where)


def parse_meta_data(text: str, source: str, json_format: bool) -> MetaData:
    """NoCloud's meta-data (YAML) or OpenStack's meta_data.json. Keys the platform adds
    and the appliance does not use are ignored: meta-data is the cloud's, not the user's."""
    if not text.strip():
        return MetaData()
    try:
        if json_format:
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as exc:  # yaml.YAMLError is not a ValueError: caught below
        raise UserDataError(f"{source}: not valid JSON: {exc}") from None
    except Exception as exc:
        raise UserDataError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserDataError(f"{source}: meta-data must be a mapping")
    keys = data.get("public_keys") or data.get("public-keys") or {}
    values = keys.values() if isinstance(keys, dict) else keys if isinstance(keys, list) else []
    hostname = data.get("local-hostname") or data.get("hostname")
    return MetaData(
        hostname=str(hostname) if hostname else None,
        instance_id=str(data.get("instance-id") or data.get("uuid") or "") or None,
        public_keys=tuple(str(k) for k in values),
    )


# -- value checks ------------------------------------------------------------------------


def _refuse_unknown(values: dict[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    for key in values:
        if key not in known:
            label = f"{where}: {what + ' ' if what else ''}unknown key {key!r}"
            raise UserDataError(f"{label} (known: {', '.join(known)})")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserDataError(f"{where}: must be a mapping (key: value lines)")
    return {str(k): v for k, v in value.items()}


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise UserDataError(f"{where}: must be a list (- item lines)")
    return value


def _string(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserDataError(f"{where}: must be a string")
    return str(value)


def _optional_string(value: Any, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _repo_name(name: str, where: str) -> str:
    if not _NAME.match(name):
        raise UserDataError(f"{where}: {name!r} is not a repository name (letters, digits, .-_)")
    return name
