"""The appliance's settings (the recipe's, baked into appliance.json) and how user data
and the kernel command line change them: pure, copied into the image beside the guest
agent. User data's formats are read by cloud_config.py; this module applies them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field, replace

try:
    from cvmbuild.appliance import cloud_config, copilot_agent
except ImportError:  # in the image (python3 -I): these modules lie beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cloud_config  # type: ignore[no-redef]
    import copilot_agent  # type: ignore[no-redef]

USER_DATA_KEYS = {
    "repository": {"url", "proxy", "public_key", "name", "mount_point"},
    "job": {"command", "then"},
    "copilot": set(copilot_agent.USER_DATA_KEYS),
}
COPILOT_WORK = "/run/copilot"  # tmpfs: jobs may need modes and links, which FAT lacks
RUNCMD_DIR = "/run/cvmappliance"  # cloud-config's runcmd and user scripts, as the job


class ContextError(Exception):
    """User data or settings the appliance cannot use."""


@dataclass(frozen=True)
class RepoSettings:
    name: str
    url: str
    mount_point: str
    public_key: str = ""  # PEM text
    proxy: str = "DIRECT"
    cache_quota: str = "1G"


@dataclass(frozen=True)
class Settings:
    hostname: str = "cvm-appliance"
    repositories: list[RepoSettings] = field(default_factory=list)
    job: str = ""
    then: str = "poweroff"
    copilot: copilot_agent.AgentConfig | None = None  # user data only


def settings_from_json(text: str) -> Settings:
    data = json.loads(text)
    repos = [RepoSettings(**r) for r in data.get("repositories", [])]
    return Settings(
        hostname=data.get("hostname", "cvm-appliance"),
        repositories=repos,
        job=data.get("job", ""),
        then=data.get("then", "poweroff"),
    )


def settings_to_json(settings: Settings) -> str:
    return json.dumps(
        {
            "hostname": settings.hostname,
            "repositories": [r.__dict__ for r in settings.repositories],
            "job": settings.job,
            "then": settings.then,
        },
        indent=2,
        sort_keys=True,
    )


def parse_user_data(text: str, source: str) -> dict[str, dict[str, str]]:
    """User data is TOML: [repository] url/proxy/public_key/name/mount_point, [job]
    command/then, [copilot] url/token/idle_exit_s/name. Anything else is refused,
    naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ContextError(f"{source}: not valid TOML: {exc}") from exc
    out: dict[str, dict[str, str]] = {}
    for table, values in data.items():
        if table not in USER_DATA_KEYS or not isinstance(values, dict):
            known = ", ".join(USER_DATA_KEYS)
            raise ContextError(f"{source}: unknown table [{table}] (known: {known})")
        out[table] = _check_table(table, values, source)
    return out


def _check_table(table: str, values: dict[str, object], source: str) -> dict[str, str]:
    for key, value in values.items():
        if key not in USER_DATA_KEYS[table]:
            known = ", ".join(sorted(USER_DATA_KEYS[table]))
            raise ContextError(f"{source}: [{table}] unknown key {key!r} (known: {known})")
        if not isinstance(value, str):
            raise ContextError(f"{source}: [{table}] {key} must be a string")
    return {k: str(v) for k, v in values.items()}


@dataclass(frozen=True)
class UserData:
    """User data in any of its formats, read: what the console reports and what applies."""

    format: str  # TOML, #cloud-config, script, MIME multipart (...)
    keys: tuple[str, ...]
    tables: dict[str, dict[str, str]]  # [repository], [job], [copilot] overrides
    cloud: cloud_config.CloudConfig | None = None


def read_user_data(text: str, source: str) -> UserData:
    kind = cloud_config.user_data_format(text)
    if kind == "toml":
        tables = parse_user_data(text, source)
        return UserData("TOML", tuple(f"[{t}]" for t in tables), tables)
    tables = {}
    try:
        parts = cloud_config.mime_parts(text, source) if kind == "mime" else [(kind, text)]
        for part_kind, body in parts:
            if part_kind == "toml":
                tables.update(parse_user_data(body, source))
        cloud = cloud_config.parse_cloud_config(
            [b for k, b in parts if k == "#cloud-config"],
            [b for k, b in parts if k == "script"],
            source,
        )
    except cloud_config.UserDataError as exc:
        raise ContextError(str(exc)) from None
    if cloud.copilot is not None:
        tables["copilot"] = _check_table("copilot", dict(cloud.copilot), source)
    kinds = [k for k, _ in parts]
    label = f"MIME multipart ({', '.join(kinds)})" if kind == "mime" else kind
    keys = (*cloud.keys, *(f"[{t}]" for t in tables if t != "copilot"))
    return UserData(label, keys + (("script",) if cloud.scripts else ()), tables, cloud)


def apply_cvmfs(settings: Settings, cvmfs: cloud_config.Cvmfs) -> Settings:
    """cloud-config's cvmfs section: which repositories (by default the recipe's), each
    completed from the section and then from the recipe's repository of that name."""
    recipe = {r.name: r for r in settings.repositories}
    wanted = cvmfs.repositories
    if wanted is None:
        wanted = tuple(cloud_config.RepoEntry(r.name) for r in settings.repositories)
    repos = []
    for entry in wanted:
        base = recipe.get(entry.name)
        url = entry.url or cvmfs.url_for(entry.name) or (base.url if base else None)
        if not url:
            raise ContextError(
                f"cvmfs: repository {entry.name} has no url: give its url or cvmfs server_url"
            )
        key = entry.public_key or cvmfs.keys.get(entry.name) or (base.public_key if base else "")
        repos.append(
            RepoSettings(
                name=entry.name,
                url=url,
                mount_point=entry.mount_point
                or (base.mount_point if base else f"/cvmfs/{entry.name}"),
                public_key=key,
                proxy=entry.proxy or cvmfs.proxy or (base.proxy if base else "DIRECT"),
                cache_quota=cvmfs.cache_quota or (base.cache_quota if base else "1G"),
            )
        )
    return replace(settings, repositories=repos)


def runcmd_script(cloud: cloud_config.CloudConfig) -> str:
    """runcmd and the user scripts as the job: in order, the first failure ends it."""
    lines = ["#!/bin/sh", "set -e", *cloud.runcmd]
    lines += [f"{RUNCMD_DIR}/script-{i}" for i in range(len(cloud.scripts))]
    return "\n".join(lines) + "\n"


def apply_cloud_config(settings: Settings, cloud: cloud_config.CloudConfig) -> Settings:
    if cloud.cvmfs is not None:
        settings = apply_cvmfs(settings, cloud.cvmfs)
    if cloud.hostname:
        settings = replace(settings, hostname=cloud.hostname)
    if cloud.runcmd or cloud.scripts:
        settings = replace(settings, job=f"/bin/sh {RUNCMD_DIR}/runcmd")
    return settings


def parse_cmdline(cmdline: str) -> dict[str, dict[str, str]]:
    """cvm.repo_url=URL cvm.proxy=P cvm.job64=BASE64 on the kernel command line."""
    out: dict[str, dict[str, str]] = {}
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if not sep or not key.startswith("cvm."):
            continue
        if key == "cvm.repo_url":
            out.setdefault("repository", {})["url"] = value
        elif key == "cvm.proxy":
            out.setdefault("repository", {})["proxy"] = value
        elif key == "cvm.job64":
            try:
                command = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ContextError(f"kernel command line: cvm.job64 is not base64: {exc}") from exc
            out.setdefault("job", {})["command"] = command
    return out


def apply_overrides(settings: Settings, overrides: dict[str, dict[str, str]]) -> Settings:
    """User data changes the first repository (or adds one) and the job."""
    repo = overrides.get("repository", {})
    repos = list(settings.repositories)
    if repo:
        if repos:
            first = replace(repos[0], **repo)
            if "name" in repo and "mount_point" not in repo:
                first = replace(first, mount_point=f"/cvmfs/{repo['name']}")
            repos[0] = first
        else:
            if "url" not in repo or "name" not in repo:
                raise ContextError(
                    "user data adds a repository: give its url and its name (its manifest "
                    "must carry that name; it is mounted at /cvmfs/NAME)"
                )
            name = repo["name"]
            fields = {"name": name, "mount_point": f"/cvmfs/{name}", **repo}
            repos.append(RepoSettings(**fields))
    job = overrides.get("job", {})
    copilot = settings.copilot
    if "copilot" in overrides:
        name = f"{settings.hostname}-{os.urandom(3).hex()}"  # volunteers' VMs share a hostname
        try:
            copilot = copilot_agent.config_from_user_data(
                overrides["copilot"], "user data", COPILOT_WORK, name
            )
        except copilot_agent.ConfigError as exc:
            raise ContextError(str(exc)) from None
    return replace(
        settings,
        repositories=repos,
        job=job.get("command", settings.job),
        then=job.get("then", settings.then),
        copilot=copilot,
    )
