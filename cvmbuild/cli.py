"""`cvmbuild`: publish a build tree; export and boot thin appliances."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cvmbuild.appliance.cli import add_subcommands as add_appliance_subcommands
from cvmbuild.chunking import ChunkPolicy
from cvmbuild.errors import BuildError
from cvmbuild.ingest import DEFAULT_LEVEL
from cvmbuild.layout import DEFAULT_MAX_ENTRIES
from cvmbuild.publish import PublishOptions, publish
from cvmbuild.settings import PublishSettings, resolve
from cvmfs_client import console, network
from cvmfs_client.console import parse_size


def _token(token_file: str | None) -> str | None:
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise BuildError(f"token file {token_file}: {exc.strerror}") from exc
        if not token:
            raise BuildError(f"token file {token_file}: the file is empty")
        return token
    return os.environ.get("CVMBUILD_TOKEN") or None


def _publish(args: argparse.Namespace) -> int:
    if not 1 <= args.compression_level <= 19:
        raise BuildError("--compression-level must be between 1 and 19")
    given = PublishSettings(
        repo=args.repo,
        path=args.path,
        token_file=args.token_file,
        tag=args.tag,
        message=args.message,
        version=args.version,
    )
    config = Path(args.config) if args.config else None
    settings, _ = resolve(given, os.environ, Path.cwd(), config)
    if settings.repo is None:
        raise BuildError("no repository: give --repo, set CVMBUILD_REPO or add it to cvmbuild.toml")
    if settings.path is None:
        raise BuildError("no path: give --path, set CVMBUILD_PATH or add it to cvmbuild.toml")
    options = PublishOptions(
        tag=settings.tag,
        message=settings.message or "",
        keydir=Path(args.keys) if args.keys else None,
        level=args.compression_level,
        skip_special=args.skip_special,
        max_entries=args.catalog_entries,
        chunking=ChunkPolicy(threshold=parse_size(args.chunk_threshold)),
        progress=True,
        token=_token(settings.token_file),
        endpoint_url=args.endpoint_url,
        dry_run=args.dry_run,
        replace=args.replace,
        force_tag=args.force_tag,
        ca_bundle=args.ca_bundle,
        bundle_trace=Path(args.bundle) if args.bundle else None,
    )
    summary = publish(args.src, settings.repo, settings.path, options)
    if args.json:
        console.print_json(summary.document())
    else:
        print(summary.line())
        sys.stdout.writelines(f"{text}\n" for text in summary.details())
    return 0


def _change_path(args: argparse.Namespace) -> int:
    from cvmbuild.path_revisions import PathChange, change_path, report
    from repo_server import revisions

    repo = args.repo or os.environ.get("CVMBUILD_REPO")
    if not repo:
        raise BuildError("no repository: give --repo or set CVMBUILD_REPO")
    change = PathChange(
        revisions.REMOVE if args.command == "remove" else revisions.ROLLBACK,
        args.path,
        args.message or "",
        to=getattr(args, "to", ""),
        everything=getattr(args, "everything", False),
        dry_run=args.dry_run,
    )
    done = change_path(
        repo,
        change,
        keydir=Path(args.keys) if args.keys else None,
        token=_token(args.token_file or os.environ.get("CVMBUILD_TOKEN_FILE")),
    )
    sys.stdout.writelines(f"{text}\n" for text in report(change, done))
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from cvmbuild.bundle import make_bundles

    summary = make_bundles(Path(args.trace), Path(args.tree), args.path, args.trace_path)
    print(summary.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvmbuild", description="Publish build trees into a repository."
    )
    console.add_version(parser)
    console.add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="publish SRC at /PREFIX as a new signed revision")
    p.add_argument("src", help="the build tree to publish")
    p.add_argument(
        "--repo",
        help="repository directory, http(s):// URL of a repo-server, or s3://BUCKET[/PREFIX] "
        "(CVMBUILD_REPO)",
    )
    p.add_argument(
        "--endpoint-url", help="S3 endpoint for an s3:// repository (default: AWS_ENDPOINT_URL)"
    )
    p.add_argument(
        "--token-file",
        help="publish token for an http(s) repository (CVMBUILD_TOKEN_FILE, or the token "
        "itself in CVMBUILD_TOKEN)",
    )
    p.add_argument(
        "--path",
        help="where SRC appears in the repository, e.g. /sw/1.2; may use {version} (CVMBUILD_PATH)",
    )
    p.add_argument("--version", help="fills {version} in path, tag and message (CVMBUILD_VERSION)")
    p.add_argument(
        "--config",
        help="settings file (default: the nearest cvmbuild.toml here or above)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would be uploaded and stored; change nothing",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="allow removing what is below --path but not in SRC (other releases)",
    )
    console.add_json(p)
    p.add_argument("--tag", help="name the new revision (CVMBUILD_TAG)")
    p.add_argument(
        "--force-tag", action="store_true", help="move --tag if it names another revision"
    )
    p.add_argument("--message", help="a note stored with the revision (CVMBUILD_MESSAGE)")
    p.add_argument("--keys", help="key directory (default: REPO.keys)")
    network.add_ca_bundle(p)
    p.add_argument(
        "--compression-level",
        type=int,
        default=DEFAULT_LEVEL,
        help=f"zstd level, 1-19 (default {DEFAULT_LEVEL})",
    )
    p.add_argument(
        "--skip-special",
        action="store_true",
        help="skip sockets, fifos and devices with a warning instead of failing",
    )
    p.add_argument(
        "--catalog-entries",
        type=int,
        default=DEFAULT_MAX_ENTRIES,
        help=f"split nested catalogs above this many entries (default {DEFAULT_MAX_ENTRIES})",
    )
    p.add_argument(
        "--chunk-threshold",
        default=str(ChunkPolicy().threshold),
        help="cut files larger than this into chunks: bytes, or with K, M, G (default 4M)",
    )
    p.add_argument(
        "--bundle",
        metavar="TRACE",
        help="first write the prefetch bundles of TRACE (from `cvmfs-client mount --trace`) "
        "into SRC, as `cvmbuild bundle` does (not with --dry-run)",
    )
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_publish)
    for name, text in (
        ("remove", "remove PATH and everything below it, as a new revision"),
        ("rollback", "give PATH what it held in an older revision, as a new revision"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--repo", help="repository directory or http(s):// URL (CVMBUILD_REPO)")
        p.add_argument("--path", required=True, help="the repository path, e.g. /sw/x/1.0")
        if name == "rollback":
            p.add_argument("--to", required=True, metavar="REV|TAG", help="the older revision")
        else:
            p.add_argument(
                "--everything", action="store_true", help="allow --path / (empties the repository)"
            )
        p.add_argument("--message", help="a note stored with the revision")
        p.add_argument(
            "--dry-run", action="store_true", help="show what would change; change nothing"
        )
        p.add_argument("--token-file", help="token for an http(s) repository (CVMBUILD_TOKEN_FILE)")
        p.add_argument("--keys", help="key directory (default: REPO.keys)")
        console.add_debug(p, subcommand=True)
        p.set_defaults(func=_change_path)
    p = sub.add_parser(
        "bundle", help="write prefetch bundles from an access trace into a build tree"
    )
    p.add_argument("trace", help="a file written by `cvmfs-client mount --trace`")
    p.add_argument("--tree", required=True, help="the build tree to write the bundles into")
    p.add_argument("--path", required=True, help="where the tree is published, e.g. /sw/1.2")
    p.add_argument(
        "--trace-path",
        help="where the traced tree was mounted when the trace was recorded, e.g. the "
        "previous release /sw/1.1 (default: --path)",
    )
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_bundle)
    add_appliance_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return console.run(build_parser(), lambda a: int(a.func(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
