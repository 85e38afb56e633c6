"""`repo-server`: create, serve, check and operate repositories."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from cvmfs_client import console, network
from cvmfs_client.console import human, utc
from cvmfs_format.objects import ObjectRef
from cvmfs_format.signed import format_time
from cvmfs_format.trust import pinned_name
from repo_server import check as check_mod
from repo_server import damage, operations, pinned, revision_log, revisions, rotation
from repo_server import diff as diff_mod
from repo_server import gc as gc_mod
from repo_server.errors import RepoError
from repo_server.http_caching import SIGNED_DOCUMENT_MAX_AGE_S
from repo_server.loading import load_catalog
from repo_server.repository import LocalRepository, init_repository, open_repository
from repo_server.tokens import TOKENS_FILE, TokenStore, check_path


def _init(args: argparse.Namespace) -> int:
    repo = init_repository(
        args.dir, args.name, Path(args.keys) if args.keys else None, args.endpoint_url
    )
    files = repo.key_files()
    print(f"created repository {args.name!r} in {repo.location} (revision 0)")
    print(f"keys in {repo.keydir}; clients pin {files.public}")
    return 0


def _repo(args: argparse.Namespace) -> LocalRepository:
    keydir = Path(args.keys) if getattr(args, "keys", None) else None
    return open_repository(args.dir, keydir, getattr(args, "endpoint_url", None))


def _tokens(args: argparse.Namespace, repo: LocalRepository) -> TokenStore:
    return TokenStore(Path(args.tokens) if args.tokens else repo.keydir / TOKENS_FILE)


def _serve(args: argparse.Namespace) -> int:
    from repo_server.gateway import Gateway
    from repo_server.leases import Leases
    from repo_server.serve import serve

    repo = _repo(args)
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise RepoError(f"--listen {args.listen!r}: expected HOST:PORT")
    tokens = _tokens(args, repo)
    count = len(tokens.tokens())

    def announce() -> None:
        print(
            f"serving {repo.root} on http://{host}:{port}/; publish API with {count} tokens "
            f"from {tokens.path}",
            file=sys.stderr,
            flush=True,
        )

    gateway = Gateway(repo, tokens, Leases(args.lease_ttl))
    serve(repo.root, host.strip("[]"), int(port), gateway, args.access_log, announce)
    return 0


def _leases(args: argparse.Namespace) -> int:
    from repo_server.operator_api import OperatorClient

    repo = _repo(args)
    client = OperatorClient(repo.keydir)
    if client.serving is None:
        if args.drop is not None:
            raise RepoError(
                f"no `repo-server serve` runs for {repo.location}, so no lease is held "
                f"(found none recorded in {client.path})"
            )
        if args.json:
            print(json.dumps({"leases": []}))
        print(f"no `repo-server serve` runs for {repo.location}: no leases", file=sys.stderr)
        return 0
    if args.drop is not None:
        lease = client.call("POST", "/leases/drop", json={"lease": args.drop})["dropped"]
        if args.json:
            print(json.dumps({"dropped": lease}))
        else:
            print(
                f"dropped the lease on {lease['path']} of token {lease['token']!r} (id "
                f"{lease['id']}); its publisher is told to publish again"
            )
        return 0
    leases = client.call("GET", "/leases")["leases"]
    if args.json:
        print(json.dumps({"leases": leases}))
        return 0
    for lease in leases:
        committing = "\tcommitting" if lease["committing"] else ""
        print(
            f"{lease['id']}\t{lease['path']}\t{lease['token']}\tsince {lease['since']}\t"
            f"expires {lease['expires']}\t{lease['publisher'] or '-'}{committing}"
        )
    if not leases:
        print("no leases: nothing is being published over the API", file=sys.stderr)
    return 0


def _token_add(args: argparse.Namespace) -> int:
    token = _tokens(args, _repo(args)).add(args.name, args.path)
    print(token)
    print(
        f"token {args.name!r} may publish under {args.path}; it is shown only now",
        file=sys.stderr,
    )
    return 0


def _token_list(args: argparse.Namespace) -> int:
    tokens = _tokens(args, _repo(args)).tokens()
    if args.json:
        listed = [{"name": t.name, "path": t.path, "created": utc(t.created)} for t in tokens]
        console.print_json({"tokens": listed})
        return 0
    for token in tokens:
        print(f"{token.name}\t{token.path}\t{format_time(token.created)}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    _tokens(args, _repo(args)).revoke(args.name)
    print(f"token {args.name!r} revoked")
    return 0


def _check(args: argparse.Namespace) -> int:
    moved: list[str] = []
    if args.key is not None or pinned.is_url(args.dir):
        if args.key is None:
            raise RepoError(
                f"{args.dir}: give the repository's master public key (--key NAME.pub) to "
                "check it over HTTP, as clients and `replicate` do"
            )
        if args.repair:
            raise RepoError(
                "--repair works on the repository's own directory with its key directory; "
                "repair a mirror with `repo-server replicate URL DIR --key PUB --repair`"
            )
        report = check_mod.check(
            pinned.open_pinned(args.dir, args.key, args.name), args.all, progress=True
        )
    elif args.repair:
        repo = _repo(args)
        with repo.lock():  # no publish may reuse an object while it is moved away
            report = check_mod.check(repo, all_revisions=args.all, progress=True)
            moved = damage.quarantine_corrupt(repo.storage, report.corrupt)
    else:
        report = check_mod.check(_repo(args), all_revisions=args.all, progress=True)
    if args.json:
        console.print_json({**report.document(), **({"quarantined": moved} if args.repair else {})})
        return 1 if report.problems else 0
    for problem in report.problems:
        print(problem)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    revs = ", ".join(map(str, report.revisions))
    verdict = "FAILED" if report.problems else "ok"
    print(
        f"check {verdict}: revisions {revs}; {report.catalogs} catalogs, "
        f"{report.objects} objects, {len(report.problems)} problems"
    )
    if args.repair:
        _repair_advice(report, moved)
    return 1 if report.problems else 0


def _repair_advice(report: check_mod.CheckReport, moved: list[str]) -> None:
    for where in moved:
        print(f"moved to {where}")
    if moved:
        print(f"repair: {len(moved)} objects that fail verification moved out of the served tree")
    if report.content_damaged:
        print("repair: publish the files named above again to store their objects, then check")
    if report.structure_damaged:
        print(
            "repair: a damaged catalog or history does not come back by publishing; copy "
            'it from a mirror or a backup (docs/OPERATING.md, "Repairing damage")'
        )


def _info(args: argparse.Namespace) -> int:
    repo = _repo(args)
    i = check_mod.info(repo)
    for line in _refusal(repo, i, time.time()):
        print(line)
    s = i.stats
    if args.json:
        console.print_json(i.document())
        return 0
    print(f"name:              {i.name}")
    print(f"revision:          {i.revision}")
    print(f"published:         {format_time(i.published)}")
    print(f"manifest expires:  {format_time(i.expires)}")
    print(f"whitelist expires: {format_time(i.whitelist_expires)}")
    print(f"files:             {s.files} ({s.dirs} directories, {s.symlinks} symlinks)")
    print(f"catalogs:          {s.catalogs}")
    print(f"logical bytes:     {s.bytes} ({human(s.bytes)})")
    print(
        f"stored bytes:      {i.stored_bytes} ({human(i.stored_bytes)}) "
        f"in {i.stored_objects} objects"
    )
    return 0


def _refusal(repo: LocalRepository, i: check_mod.Info, now: float) -> list[str]:
    """The lines `info` puts first when clients refuse the repository's head."""
    if i.refused is None:
        return []
    lines = []
    fixes = (
        (i.whitelist_expires, "whitelist", "whitelist renew"),
        (i.expires, "manifest", "resign"),
    )
    for expires, what, verb in fixes:
        if now >= expires:
            lines.append(
                f"EXPIRED: the {what} expired at {format_time(expires)}; clients refuse this "
                f"repository until `{rotation.command_line(repo, verb)}`"
            )
    return lines or [f"REFUSED: clients refuse this repository: {i.refused}"]


def _tags(args: argparse.Namespace) -> int:
    repo = _repo(args)
    tags = repo.history(repo.head()).tags()
    if args.json:
        listed = [{"name": t.name, "revision": t.revision, "created": utc(t.created)} for t in tags]
        console.print_json({"tags": listed})
        return 0
    for tag in tags:
        print(f"{tag.name}\trevision {tag.revision}\t{format_time(tag.created)}")
    return 0


def _whitelist_renew(args: argparse.Namespace) -> int:
    rotation.check_lifetime(args.days, args.allow_long)
    repo = _repo(args)
    with repo.lock():
        r = rotation.renew_whitelist(
            repo,
            int(time.time()),
            args.days,
            allow_long=args.allow_long,
            end_rotation=args.end_rotation,
        )
    wl = r.whitelist
    print(
        f"whitelist of {wl.name!r} renewed; expires {format_time(wl.expires)}; "
        f"lists {len(wl.keys)} signing keys"
    )
    for archived, end in r.transition:
        print(
            f"the old key {archived.name} stays listed until {format_time(end)}, when its "
            "rotation's transition ends (--end-rotation drops it now)"
        )
    if r.unknown_signer is not None:
        print(
            f"warning: the manifest is signed by key {r.unknown_signer[:16]}..., found "
            f"neither on the old whitelist nor in {repo.keydir}; clients refuse it until "
            f"`repo-server resign {args.dir}` signs it with the signing key",
            file=sys.stderr,
        )
    return 0


def _resign(args: argparse.Namespace) -> int:
    repo = _repo(args)
    with repo.lock():
        m = repo.resign()
    print(f"manifest revision {m.revision} re-signed; expires {format_time(m.expires)}")
    return 0


def _tag(args: argparse.Namespace) -> int:
    repo = _repo(args)
    if args.delete is not None:
        if args.revision is not None:
            raise RepoError("--revision does not go with --delete; give one of them")
        change = operations.delete_tag(repo, args.delete)
        done = f"tag {change.name!r} (revision {change.revision}) deleted"
    else:
        change = operations.set_tag(repo, args.name, args.revision)
        if not change.changed:
            print(f"tag {change.name!r} already names revision {change.revision}; nothing changed")
            return 0
        done = f"tag {change.name!r} names revision {change.revision}"
    print(f"{done}; manifest revision {change.manifest.revision} re-signed")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    repo = _repo(args)
    author = revisions.Author.local("repo-server")
    path = check_path(args.path)
    plan = operations.rollback(repo, args.to, author, path=path, message=args.message, dry_run=True)
    would = (
        f"revision {plan.result.revision} would serve the content of revision "
        f"{plan.target.revision}" + ("" if path == "/" else f" at {path}")
    )
    if args.dry_run:
        print(f"dry run, nothing changed: {would}")
        sys.stdout.writelines(f"  {text}\n" for text in plan.result.changes.lines(would=True))
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise RepoError(
                "a rollback changes what every client sees: pass --yes to confirm it "
                "(stdin is not a terminal), or --dry-run to see what it would change"
            )
        print(would + ":", file=sys.stderr)
        sys.stderr.writelines(f"  {text}\n" for text in plan.result.changes.lines(would=True))
        print("roll back? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing changed", file=sys.stderr)
            return 1
    result = operations.rollback(repo, args.to, author, path=path, message=args.message)
    print(
        f"published revision {result.result.revision} with the content of revision "
        f"{result.target.revision}" + ("" if path == "/" else f" at {path}")
    )
    return 0


def _log(args: argparse.Namespace) -> int:
    if args.dir.startswith(("http://", "https://")):
        history, load = revision_log.served_history(args.dir, args.key)
    else:
        repo = _repo(args)
        history, load = repo.history(repo.head()), functools.partial(load_catalog, repo.storage)
    path = check_path(args.path) if args.path else None
    records = revision_log.select(history, load, path, args.limit)
    if args.json:
        print(json.dumps({"revisions": [revision_log.as_json(r) for r in records]}, indent=1))
    else:
        sys.stdout.writelines(revision_log.line(r) + "\n" for r in records)
    return 0


def _diff(args: argparse.Namespace) -> int:
    repo = _repo(args)
    history = repo.history(repo.head())
    old, new = (operations.resolve_revision(history, spec) for spec in (args.a, args.b))
    changes = diff_mod.diff_trees(
        functools.partial(load_catalog, repo.storage),
        ObjectRef.catalog(old.root_hash, old.root_size),
        ObjectRef.catalog(new.root_hash, new.root_size),
    )
    if args.json:
        listed = [{"change": diff_mod.KIND_NAMES[c.kind], "path": c.path} for c in changes]
        console.print_json({"from": old.revision, "to": new.revision, "changes": listed})
        return 0
    sys.stdout.writelines(f"{change.kind} {change.path}\n" for change in changes)
    return 0


def _gc(args: argparse.Namespace) -> int:
    r = gc_mod.collect_garbage(
        _repo(args),
        keep_revisions=args.keep_revisions,
        grace=args.grace,
        dry_run=args.dry_run,
        progress=True,
    )
    verbs = ("kept", "dropped", "removed")
    if r.dry_run:
        verbs = ("would keep", "would drop", "would remove")
    print(
        f"gc: {verbs[0]} {len(r.kept)} revisions ({operations.format_revisions(r.kept)}), "
        f"{verbs[1]} {len(r.dropped)} ({operations.format_revisions(r.dropped)})"
    )
    print(
        f"gc: {verbs[2]} {r.removed_objects} objects, {r.removed_bytes} bytes "
        f"({human(r.removed_bytes)}); spared {r.spared_objects} unreferenced objects "
        f"younger than {args.grace:g} s"
    )
    if r.in_use:
        why = (
            "(--grace)"
            if r.window > r.ttl + SIGNED_DOCUMENT_MAX_AGE_S
            else f"(the manifest's TTL of {r.ttl} s, {SIGNED_DOCUMENT_MAX_AGE_S} s more in proxies)"
        )
        print(
            f"gc: {verbs[0]} revisions {operations.format_revisions(r.in_use)} beyond "
            f"--keep-revisions: replaced less than {r.window:g} s ago, so clients may still "
            f"read them {why}"
        )
    if not r.dry_run or r.removed_temporaries:  # taking the lock removes those of the dead
        print(
            f"gc: removed {r.removed_temporaries} temporary files (older than {args.grace:g} s, "
            "or of writers gone)"
        )
    if r.dry_run:
        print("gc: dry run, nothing changed")
    return 0


def _key_rotate(args: argparse.Namespace) -> int:
    repo = _repo(args)
    with repo.lock():
        r = rotation.rotate_signing_key(repo, int(time.time()))
    if r.resumed:
        print("finished the key rotation that an interrupted run began")
    print(f"new signing key {repo.key_files().signing}; the old one is kept as {r.archived}")
    print(
        f"whitelist lists both; manifest revision {r.manifest.revision} re-signed with the new key"
    )
    return 0


def _replicate(args: argparse.Namespace) -> int:
    from repo_server import keys
    from repo_server import replicate as replicate_mod

    network.check_location(args.dir, urls=False)
    r = replicate_mod.replicate(
        args.url,
        Path(args.dir),
        keys.load_public_key(Path(args.key)),
        pinned_name(args.key, args.name),
        workers=args.workers,
        progress=True,
        timeout=args.timeout,
        repair=args.repair,
        ca_bundle=args.ca_bundle,
    )
    if r.repaired:
        print(
            f"repaired {len(r.repaired)} objects that failed verification: fetched again from "
            f"the source; the damaged copies are in {Path(r.repaired[0]).parent}/"
        )
    for number in r.skipped:
        print(
            f"warning: revision {number} skipped: the source no longer has its objects "
            "(garbage-collected); untagged, so clients do not need it",
            file=sys.stderr,
        )
    before = "a new mirror" if r.previous is None else f"was revision {r.previous}"
    print(
        f"replicated {r.name!r} revision {r.revision} ({before}): fetched {r.objects} "
        f"objects, {r.bytes} bytes ({human(r.bytes)}) in {r.seconds:.1f} s; "
        + (
            f"mirror holds revisions {operations.format_revisions(r.mirrored)}"
            if r.mirrored
            else "it was up to date"
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repo-server", description="Create, serve and operate repositories."
    )
    console.add_version(parser)
    console.add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_text: str, keys: bool = True) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", help="repository directory, or s3://BUCKET[/PREFIX]")
        if keys:
            p.add_argument("--keys", help="key directory (default: DIR.keys)")
        p.add_argument(
            "--endpoint-url", help="S3 endpoint for s3:// (default: AWS_ENDPOINT_URL, else AWS)"
        )
        console.add_debug(p, subcommand=True)
        p.set_defaults(func=func)
        return p

    p = command("init", _init, "create a repository with revision 0 and new keys")
    p.add_argument("--name", required=True, help="repository name, e.g. sw.example.org")
    p = command("serve", _serve, "serve the repository and its publish API over HTTP")
    p.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    p.add_argument("--tokens", help="publish token file (default: KEYDIR/tokens.json)")
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=120,
        help="give up a publisher's lease after this many seconds without a request "
        "(publishers renew every 20 s; default 120)",
    )
    p.add_argument(
        "--access-log",
        metavar="FILE",
        help="append the access log (Combined Log Format and the request time) to FILE, "
        "reopened when logrotate moves it (default: stderr, with the error log)",
    )
    p = command("leases", _leases, "list the publish leases of the running server, or drop one")
    p.add_argument(
        "--drop", metavar="PATH|ID", help="end the lease on PATH (or with this id, or id prefix)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    tk = sub.add_parser("token", help="manage publish tokens")
    tk_sub = tk.add_subparsers(dest="action", required=True)
    for action, func, text in (
        ("add", _token_add, "make a token that may publish under --path; prints it"),
        ("list", _token_list, "list tokens: name, path, created"),
        ("revoke", _token_revoke, "remove a token; the server refuses it at once"),
    ):
        p = tk_sub.add_parser(action, help=text)
        p.add_argument("dir", help="repository directory")
        p.add_argument("--keys", help="key directory (default: DIR.keys)")
        p.add_argument("--tokens", help="token file (default: KEYDIR/tokens.json)")
        if action != "list":
            p.add_argument("--name", required=True, help="who the token is for, e.g. atlas-ci")
        if action == "add":
            p.add_argument("--path", required=True, help="may publish at and below, e.g. /sw/atlas")
        if action == "list":
            console.add_json(p)
        console.add_debug(p, subcommand=True)
        p.set_defaults(func=func)
    p = command("check", _check, "verify every reachable catalog, object and signature")
    p.add_argument(
        "--key",
        help="check as clients read it, with the master public key they pin (NAME.pub) and "
        "no key directory: a mirror, or a repository's http(s):// URL",
    )
    p.add_argument("--name", help="with --key: the repository's name (default: the key file's)")
    p.add_argument("--all", action="store_true", help="check every revision in the history")
    p.add_argument(
        "--repair",
        action="store_true",
        help="move objects that fail verification to quarantine/, so that publishing the "
        "files named again stores them",
    )
    console.add_json(p)
    console.add_json(command("info", _info, "show name, revision and sizes"))
    console.add_json(command("tags", _tags, "list tags"))
    command("resign", _resign, "re-sign the current manifest with a fresh expiry")
    p = command("tag", _tag, "name a revision (default: the head), or --delete a tag")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("name", nargs="?", help="tag name: letters, digits and '-_.+@'")
    what.add_argument("--delete", metavar="NAME", help="remove this tag")
    p.add_argument("--revision", type=int, help="the revision to name (default: the head)")
    p = command("rollback", _rollback, "publish an old revision's content as a new revision")
    p.add_argument("--to", required=True, metavar="TAG|REV", help="the revision to go back to")
    p.add_argument("--message", help="history message (default: rollback to revision N)")
    p.add_argument("--path", default="/", help="roll back only this path (default: everything)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--dry-run", action="store_true", help="show what would be served; change nothing"
    )
    p = command("log", _log, "list revisions newest first: who, when, what changed")
    p.add_argument("--path", help="only revisions that changed something at or below PATH")
    p.add_argument("--limit", type=int, metavar="N", help="at most N revisions")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--key", help="the repository's public key, for a URL (NAME.pub)")
    p = command("diff", _diff, "list paths added (+), removed (-), modified (M) from A to B")
    p.add_argument("a", metavar="A", help="revision number or tag")
    p.add_argument("b", metavar="B", help="revision number or tag")
    console.add_json(p)
    p = command("gc", _gc, "delete the objects that no kept revision reaches")
    p.add_argument(
        "--keep-revisions", type=int, metavar="N",
        help="keep the newest N revisions and the tagged ones (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--grace", type=float, default=gc_mod.DEFAULT_GRACE_S, metavar="SECONDS",
        help="never delete objects written this recently (default 3600)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    key = sub.add_parser("key", help="manage the signing key")
    key_sub = key.add_subparsers(dest="action", required=True)
    p = key_sub.add_parser("rotate", help="new signing key, whitelisted with the old one")
    p.add_argument("dir", help="repository directory")
    p.add_argument("--keys", help="key directory (default: DIR.keys)")
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_key_rotate)
    p = sub.add_parser("replicate", help="make or update a verified mirror (Stratum 1) of URL")
    p.add_argument("url", help="the repository's base URL, e.g. http://stratum0.example.org/sw")
    p.add_argument("dir", help="the mirror directory (made if missing); serve it like a repository")
    p.add_argument("--key", required=True, help="the repository's master public key (NAME.pub)")
    p.add_argument(
        "--name",
        help="the repository's name, which the source must serve (default: the key file's "
        "name without .pub)",
    )
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument(
        "--timeout", type=float, default=3600, metavar="SECONDS",
        help="give up after this long, keeping the mirror as it was (default 3600); what "
        "was fetched is kept for the next run",
    )  # fmt: skip
    p.add_argument(
        "--repair",
        action="store_true",
        help="verify every object the mirror holds too; move those that fail to "
        "DIR/quarantine/ and fetch them again",
    )
    network.add_ca_bundle(p)
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_replicate)
    wl = sub.add_parser("whitelist", help="manage the signing-key whitelist")
    wl_sub = wl.add_subparsers(dest="action", required=True)
    p = wl_sub.add_parser("renew", help="re-sign the whitelist with a new expiry")
    p.add_argument("dir")
    p.add_argument("--keys", help="key directory (default: DIR.keys)")
    p.add_argument(
        "--days", type=int, default=30,
        help=f"validity in days, 1 to {rotation.MAX_WHITELIST_DAYS} (default 30)",
    )  # fmt: skip
    p.add_argument(
        "--allow-long", action="store_true",
        help=f"allow --days over {rotation.MAX_WHITELIST_DAYS}",
    )  # fmt: skip
    p.add_argument(
        "--end-rotation", action="store_true",
        help="list no old key of an earlier rotation (e.g. it leaked), even within its "
        f"transition ({rotation.TRANSITION_S // 86400} days after the rotation)",
    )  # fmt: skip
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_whitelist_renew)
    return parser


def main(argv: list[str] | None = None) -> int:
    return console.run(build_parser(), lambda a: int(a.func(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
