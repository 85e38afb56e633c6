"""`cvmfs-client`: read a repository (ls, cat) with full verification."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time

from cvmfs_client import console, network
from cvmfs_client.config_cli import CONFIG_DIR_HELP
from cvmfs_client.config_cli import add_parsers as add_config_parsers
from cvmfs_client.console import human
from cvmfs_client.content import open_content, pieces
from cvmfs_client.errors import ClientError
from cvmfs_client.fetch_pool import WORKERS as FETCH_WORKERS
from cvmfs_client.fetcher import fetcher_for
from cvmfs_client.repository import RepositoryReader
from cvmfs_client.trust_store import default_state_dir, open_trust


def _open(args: argparse.Namespace) -> RepositoryReader:
    trust, floors = open_trust(args.key, args.name, default_state_dir())
    reader = RepositoryReader(fetcher_for(args.repo, args.proxy or "", args.ca_bundle), trust)
    reader.load_manifest()
    floors.store(trust.floor)
    if args.tag is not None or args.revision is not None:
        reader.select_revision(revision=args.revision, tag=args.tag)
    return reader


def _ls(args: argparse.Namespace) -> int:
    reader = _open(args)
    entry = reader.lookup(args.path)
    listing = reader.listdir(entry.path) if entry.is_dir else [entry]
    for item in listing:
        if args.long:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.mtime_ns / 1e9))
            link = f" -> {item.target}" if item.is_symlink else ""
            print(f"{stat.filemode(item.mode)} {item.size:>12} {when} {item.name}{link}")
        else:
            print(item.name)
    return 0


def _cat(args: argparse.Namespace) -> int:
    reader = _open(args)
    out = sys.stdout.buffer
    with open_content(reader, reader.lookup(args.path)) as content:
        for piece in pieces(content):
            out.write(piece)
    out.flush()
    return 0


def _mount(args: argparse.Namespace) -> int:
    from cvmfs_client.config_cli import mount_options_from
    from cvmfs_client.mount import mount

    return mount(mount_options_from(args))


def _umount(args: argparse.Namespace) -> int:
    from cvmfs_client.mount import umount

    return umount(args.mountpoint)


def _stat(args: argparse.Namespace) -> int:
    try:
        raw = os.getxattr(args.mountpoint, "user.stats")
    except OSError as exc:
        raise ClientError(f"{args.mountpoint}: not a cvmfs-client mount ({exc.strerror})") from exc
    stats = json.loads(raw)
    if args.json:
        console.print_json(stats)
        return 0
    requests = stats.pop("requests", None)  # by kind, when the FUSE layer counts them
    busy = stats.pop("busy_s", None) or {}  # seconds spent answering them
    for key, value in stats.items():
        if (
            key in ("cache_bytes", "cache_quota", "bytes_downloaded", "content_fetched")
            and value is not None
        ):
            value = f"{value} ({human(value)})"
        print(f"{key + ':':<18} {value}")
    if isinstance(requests, dict):
        print("requests:")
        for kind, count in sorted(requests.items(), key=lambda kv: -kv[1]):
            spent = f"  {busy[kind]:.3f} s" if kind in busy else ""
            print(f"  {kind + ':':<16} {count}{spent}")
    return 0


EXIT_CORRUPTION_FOUND = 3  # `cache verify` found (and removed) corrupt entries, as restic


def _cache(args: argparse.Namespace) -> int:
    """Works beside a mount using the cache too: the mount fetches what is removed."""
    from cvmfs_client.cache import CacheInUse, ObjectCache, check_cache_dir, lock_cache_dir
    from cvmfs_client.config import ClientConfig, load_config
    from cvmfs_client.mount import default_cache_dir
    from cvmfs_format.trust import pinned_name

    config = load_config(args.config) if args.config else ClientConfig()
    cache_dir = args.cache_dir
    if cache_dir is None:
        key = config.public_keys[0] if config.public_keys else None
        name = args.name or config.repository
        if name is None and key is None:
            raise ClientError(
                "which cache? give --cache-dir, --name, or a --config with CVMFS_PUBLIC_KEY"
            )
        cache_dir = default_cache_dir(pinned_name(key or "", name), config.cache_base)
    check_cache_dir(cache_dir)
    try:
        lock_cache_dir(cache_dir)
        owner = True
    except CacheInUse:
        owner = False
    cache = ObjectCache(os.path.join(cache_dir, "objects"), owner=owner)
    if args.action == "verify":
        removed = cache.verify_all()
        for digest in removed:
            print(f"removed corrupt entry {digest}")
        print(f"cache verified: {len(cache)} entries ok, {len(removed)} removed")
        return EXIT_CORRUPTION_FOUND if removed else 0
    else:
        freed = cache.clean()
        print(f"cache cleaned: {human(freed)} freed")
    return 0


def _preload(args: argparse.Namespace) -> int:
    from cvmfs_client.mount import MountOptions, open_reader
    from cvmfs_client.preload import preload

    options = MountOptions(
        url=args.url, mountpoint="", key_file=args.key, cache_dir=args.cache_dir,
        proxies=args.proxy or "", name=args.name, ca_bundle=network.ca_bundle(args.ca_bundle),
    )  # fmt: skip
    reader = open_reader(options)
    files, objects = preload(reader, args.path, progress=True)
    assert reader.cache is not None and reader.manifest is not None
    print(
        f"preloaded {args.path} of revision {reader.manifest.revision}: {files} files, "
        f"{objects} objects, {human(reader.cache.stats.bytes_fetched)} downloaded"
    )
    return 0


NAME_HELP = (
    "the repository's name, which its whitelist and manifest must carry "
    "(default: the key file's name without .pub)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvmfs-client", description="Read a cvmfs-py repository, verifying every byte."
    )
    console.add_version(parser)
    console.add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("ls", _ls, "list a directory of the repository"),
        ("cat", _cat, "write a file of the repository to stdout"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "repo", help="repository directory or http(s) URL (mirrors separated by ';')"
        )
        p.add_argument("path", help="path inside the repository")
        p.add_argument("--key", required=True, help="the repository's master public key (NAME.pub)")
        p.add_argument("--name", help=NAME_HELP)
        p.add_argument("--proxy", help="HTTP proxies in CernVM-FS syntax (see mount --help)")
        network.add_ca_bundle(p)
        group = p.add_mutually_exclusive_group()
        group.add_argument("--tag", help="read the revision with this tag")
        group.add_argument("--revision", type=int, help="read this revision")
        if name == "ls":
            p.add_argument("-l", "--long", action="store_true", help="long listing")
        console.add_debug(p, subcommand=True)
        p.set_defaults(func=func)
    p = sub.add_parser("mount", help="mount a repository read-only with FUSE")
    p.add_argument(
        "url",
        nargs="?",
        help="a repository name (sw.example.org: its settings from --config-dir), or "
        "http(s) URL(s) separated by ';', or a directory (with a / in it)",
    )
    p.add_argument("mountpoint")
    p.add_argument("--key", help="the repository's master public key (NAME.pub)")
    p.add_argument("--name", help=NAME_HELP)
    p.add_argument("--config", help="CernVM-FS-style KEY=VALUE settings (CVMFS_SERVER_URL, ...)")
    p.add_argument("--config-dir", help=f"{CONFIG_DIR_HELP}, read for a repository name")
    p.add_argument(
        "--max-ttl", type=float, help="look for new revisions at least this often (seconds)"
    )
    p.add_argument(
        "--cache-dir",
        help="local cache, one per mount (default CACHE_BASE/NAME: /var/lib/cvmfs-client/cache "
        "as root, ~/.cache/cvmfs-client otherwise; NAME as the key file is named)",
    )
    p.add_argument("--quota", help="cache size limit, e.g. 4G (default: unlimited)")
    p.add_argument(
        "--proxy",
        help='HTTP proxies, CernVM-FS syntax: "http://p1:3128|http://p2:3128;DIRECT" '
        "('|' load-balances, ';' fails over; default DIRECT)",
    )
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")
    network.add_ca_bundle(p, config_key=True)
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="fetch only what is read (default: a file with a prefetch bundle beside it "
        "fetches the bundle's members in the background when first looked up; without "
        "one, opening a file fetches the other small files of its directory)",
    )
    p.add_argument(
        "--fetch-workers",
        type=int,
        default=FETCH_WORKERS,
        metavar="N",
        help=f"processes that download, verify and store objects (default {FETCH_WORKERS}; "
        "0: the mount's own threads, which then compete with the file system for the "
        "Python interpreter)",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="append the first access of each file and chunk to FILE, for `cvmbuild bundle`",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tag", help="mount the revision with this tag")
    group.add_argument("--revision", type=int, help="mount this revision")
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_mount, usage_error=p.error)
    p = sub.add_parser("stat", help="revision, route, cache and error counters of a mount")
    p.add_argument("mountpoint")
    console.add_json(p)
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_stat)
    p = sub.add_parser(
        "cache",
        help="maintain the local cache (verify exits 3 when it found and removed corrupt entries)",
    )
    p.add_argument("action", choices=["verify", "clean"])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--cache-dir", help="cache directory (as given to mount)")
    group.add_argument("--name", help="repository name: its cache under the cache base")
    p.add_argument(
        "--config",
        help="the mount's KEY=VALUE settings: the cache under CVMFS_CACHE_BASE, named for "
        "--name or CVMFS_PUBLIC_KEY",
    )
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_cache)
    p = sub.add_parser("preload", help="fill a cache for offline use")
    p.add_argument("url")
    p.add_argument("cache_dir")
    p.add_argument("--key", required=True, help="the repository's master public key (NAME.pub)")
    p.add_argument("--name", help=NAME_HELP)
    p.add_argument("--path", default="/", help="subtree to preload (default /)")
    p.add_argument("--proxy", help="HTTP proxies in CernVM-FS syntax")
    network.add_ca_bundle(p)
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_preload)
    p = sub.add_parser("umount", help="unmount a repository")
    p.add_argument("mountpoint")
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_umount)
    add_config_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return console.run(build_parser(), lambda a: int(a.func(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
