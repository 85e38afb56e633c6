"""The command lines that read a site's configuration: `mount REPO_NAME MOUNTPOINT`,
`config showconfig|probe|chksetup`, and `setup` (autofs)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

from cvmfs_client import console
from cvmfs_client.config import ClientConfig, ConfigError, check_repository_name, load_config
from cvmfs_client.errors import ClientError
from cvmfs_client.site_config import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_MOUNT_DIR,
    configured_repositories,
    layer_files,
    repository_config,
    site_defaults,
)
from cvmfs_format.errors import CvmfsError, FormatError
from cvmfs_format.trust import pinned_name

if TYPE_CHECKING:  # mount loads libfuse
    from cvmfs_client.mount import MountOptions

CONFIG_DIR_HELP = (
    f"the site's configuration directory (default {DEFAULT_CONFIG_DIR}; /etc/cvmfs works)"
)
_warned: set[str] = set()
PROBE_S = 300  # a mount that takes longer is reported as failed


def warn_ignored(config: ClientConfig) -> None:
    """Each parameter the client does not implement, once per command."""
    for assignment in config.ignored:
        if assignment.key not in _warned:
            _warned.add(assignment.key)
            print(
                f"warning: {assignment.origin}: {assignment.key} is not implemented by "
                "cvmfs-client; ignored",
                file=sys.stderr,
            )


def is_repository_name(target: str) -> bool:
    """`mount sw.example.org ...` names a repository; a URL or a directory has a / in it."""
    return "/" not in target and ":" not in target


def mount_options_from(args: argparse.Namespace) -> MountOptions:
    """The options `cvmfs-client mount` was given, with what the configuration adds."""
    from cvmfs_client.console import parse_size
    from cvmfs_client.mount_config import Given, mount_options

    given = Given(
        url=args.url, key=args.key, cache_dir=args.cache_dir,
        quota=parse_size(args.quota) if args.quota else None, proxy=args.proxy,
        tag=args.tag, revision=args.revision, max_ttl=args.max_ttl,
        foreground=args.foreground, prefetch=not args.no_prefetch, ca_bundle=args.ca_bundle,
        trace=args.trace, fetch_workers=args.fetch_workers,
    )  # fmt: skip
    config_dir = None
    if args.url is not None and is_repository_name(args.url):
        if args.name and args.name != args.url:
            args.usage_error(
                f"the repository is named {args.url}: --name {args.name} contradicts it"
            )
        if args.config:
            config = load_config(args.config, check_repository_name(args.url))
        else:
            config_dir = args.config_dir or DEFAULT_CONFIG_DIR
            config = repository_config(config_dir, args.url)
        name: str | None = config.repository
        given = dataclasses.replace(given, url=None)
    else:
        if args.config_dir:
            args.usage_error("--config-dir goes with a repository name: mount REPO_NAME MOUNTPOINT")
        name = args.name
        if name is None and args.key:
            with contextlib.suppress(FormatError):
                name = pinned_name(args.key, None)
        config = load_config(args.config, name) if args.config else ClientConfig()
    warn_ignored(config)
    return mount_options(config, args.mountpoint, given, name=name, config_dir=config_dir)


# -- config showconfig ----------------------------------------------------------------


def _showconfig(args: argparse.Namespace) -> int:
    names = [args.repository] if args.repository else []
    documents = []
    for fqrn in configured_repositories(args.config_dir, names):
        config = repository_config(args.config_dir, fqrn)
        settings = {
            a.key: {"value": a.value, "source": str(a.origin), "ignored": a in config.ignored}
            for a in sorted(config.effective, key=lambda a: a.key)
        }
        documents.append(
            {
                "repository": fqrn,
                "files": layer_files(args.config_dir, fqrn),
                "settings": settings,
            }
        )
        if not args.json:
            print(f"CVMFS_REPOSITORY_NAME={fqrn}")
            for key, setting in settings.items():
                note = " (ignored: not implemented by cvmfs-client)" if setting["ignored"] else ""
                value = shlex.quote(str(setting["value"]))
                print(f"{key}={value}    # from {setting['source']}{note}")
    if args.json:
        print(json.dumps(documents[0] if args.repository else documents, indent=2))
    return 0


# -- config probe -----------------------------------------------------------------------


def client_command() -> list[str]:
    """How to run this very client again (a console script, or the module)."""
    if os.path.basename(sys.argv[0]) == "cvmfs-client":
        return [os.path.abspath(sys.argv[0])]
    return [sys.executable, "-m", "cvmfs_client.cli"]


def _probe_one(config_dir: str, fqrn: str) -> str:
    """Mount fqrn on a temporary mount point with `cvmfs-client mount` as a user would,
    list its root, unmount; returns a note for the OK line."""
    from cvmfs_client.cache import CacheInUse, lock_cache_dir
    from cvmfs_client.mount import default_cache_dir, umount

    config = repository_config(config_dir, fqrn)
    warn_ignored(config)
    with tempfile.TemporaryDirectory(prefix="cvmfs-client-probe-") as work:
        mountpoint = os.path.join(work, "mnt")
        os.mkdir(mountpoint)
        command = [*client_command(), "mount", fqrn, mountpoint, "--config-dir", config_dir]
        note = ""
        cache_dir = default_cache_dir(fqrn, config.cache_base)
        try:
            os.close(lock_cache_dir(cache_dir))
        except CacheInUse:  # mounted already: probe the network with a cache of its own
            note = f" (its cache {cache_dir} is in use: probed with a temporary one)"
            command += ["--cache-dir", os.path.join(work, "cache")]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_S)
        except subprocess.TimeoutExpired:
            raise ClientError(f"not mounted within {PROBE_S} s") from None
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise ClientError(lines[-1].removeprefix("error: "))
        try:
            entries = len(os.listdir(mountpoint))
        finally:
            umount(mountpoint)
    return f"{note}, {entries} entries in its root"


def _probe(args: argparse.Namespace) -> int:
    failed = 0
    for fqrn in configured_repositories(args.config_dir, args.repositories):
        print(f"Probing {fqrn}... ", end="", flush=True)
        try:
            note = _probe_one(args.config_dir, fqrn)
            print(f"OK{note}")
        except (CvmfsError, OSError) as exc:
            print(f"Failed! ({exc})")
            failed += 1
    return 1 if failed else 0


# -- config chksetup --------------------------------------------------------------------


def _chksetup(args: argparse.Namespace) -> int:
    from cvmfs_client.mount import default_cache_dir
    from cvmfs_client.mount_config import key_candidates
    from cvmfs_client.setup_checks import (
        Check,
        cache_check,
        fuse_checks,
        key_checks,
        proxy_checks,
    )

    checks = fuse_checks()
    names = [args.repository] if args.repository else site_defaults(args.config_dir).repositories
    seen: set[str] = set()
    for fqrn in configured_repositories(args.config_dir, list(names)) if names else []:
        try:
            config = repository_config(args.config_dir, fqrn)
        except ConfigError as exc:
            checks.append(Check(False, fqrn, str(exc)))
            continue
        warn_ignored(config)
        url = config.server_url
        checks.append(Check(bool(url), f"{fqrn} CVMFS_SERVER_URL", url or "not set"))
        found = [
            cache_check(default_cache_dir(fqrn, config.cache_base), config.quota_bytes),
            *key_checks(key_candidates(config, args.config_dir)),
            *proxy_checks(config.http_proxy or ""),
        ]
        for check in found:
            if check.what not in seen:  # repositories share proxies and keys
                seen.add(check.what)
                checks.append(check)
    if not names:
        checks.append(Check(False, "CVMFS_REPOSITORIES", f"no repositories in {args.config_dir}"))
    for check in checks:
        print(check)
    return 0 if all(c.ok for c in checks) else 1


# -- config automount-entry (run by the autofs map) and setup ----------------------------


def _automount_entry(args: argparse.Namespace) -> int:
    from cvmfs_client.autofs import map_entry
    from cvmfs_client.site_config import qualified_name

    defaults = site_defaults(args.config_dir)
    try:
        fqrn = qualified_name(args.key, defaults)
    except ConfigError:
        return 1  # `ls /cvmfs/.hidden`: not a repository, not an error
    allowed = {qualified_name(n, defaults) for n in defaults.repositories}
    if defaults.strict_mount and fqrn not in allowed:
        return 1
    if not repository_config(args.config_dir, fqrn).server_url:
        return 1  # autofs answers "no such file or directory"
    print(map_entry(fqrn, args.helper))
    return 0


def _setup(args: argparse.Namespace) -> int:
    from cvmfs_client.autofs import Installation, install, uninstall

    where = Installation(args.autofs_dir)
    if args.undo:
        said = uninstall(where)
    else:
        root = args.mount_root or site_defaults(args.config_dir).mount_dir or DEFAULT_MOUNT_DIR
        said = install(
            where, args.config_dir, os.path.abspath(root), args.idle_timeout, client_command()
        )
    for line in said:
        print(line)
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cvmfs_client.autofs import DEFAULT_IDLE_S, SYSTEM_AUTOFS_DIR

    p = sub.add_parser("config", help="show and check the site's configuration")
    actions = p.add_subparsers(dest="action", required=True)

    def action(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        q = actions.add_parser(name, help=help_text)
        q.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, help=CONFIG_DIR_HELP)
        console.add_debug(q, subcommand=True)
        q.set_defaults(func=func)
        return q

    q = action("showconfig", _showconfig, "the effective settings and the file:line of each")
    q.add_argument("repository", nargs="?", help="default: each in CVMFS_REPOSITORIES")
    q.add_argument("--json", action="store_true", help="print one JSON document")
    q = action("probe", _probe, "mount each repository on a temporary mount point, list it")
    q.add_argument("repositories", nargs="*", help="default: each in CVMFS_REPOSITORIES")
    q = action("chksetup", _chksetup, "check FUSE, the cache directory, the keys, the proxies")
    q.add_argument("repository", nargs="?", help="default: each in CVMFS_REPOSITORIES")
    q = action("automount-entry", _automount_entry, "the autofs map entry of a name (for setup)")
    q.add_argument("key", help="a name under the mount root")
    q.add_argument("--helper", required=True, help="the installed map (the mount helper)")
    p = sub.add_parser("setup", help="mount repositories on demand under /cvmfs (autofs)")
    p.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, help=CONFIG_DIR_HELP)
    p.add_argument("--mount-root", help=f"default CVMFS_MOUNT_DIR, else {DEFAULT_MOUNT_DIR}")
    p.add_argument(
        "--idle-timeout", type=int, default=DEFAULT_IDLE_S,
        help=f"unmount a repository unused this long (seconds, default {DEFAULT_IDLE_S})",
    )  # fmt: skip
    p.add_argument(
        "--autofs-dir", default=SYSTEM_AUTOFS_DIR,
        help=f"where autofs reads its maps (default {SYSTEM_AUTOFS_DIR})",
    )  # fmt: skip
    p.add_argument("--undo", action="store_true", help="remove what setup installed")
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_setup)
