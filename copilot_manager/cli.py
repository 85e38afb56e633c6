"""`copilot-manager`: serve the Co-Pilot protocol in front of Redis, submit and manage
jobs, make tokens. Errors: `error: ...` on stderr, exit 1; usage errors exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from copilot_manager import gc as gc_module
from copilot_manager.errors import ManagerError
from cvmfs_format.errors import CvmfsError
from cvmfs_format.version import add_version

DEFAULT_TOKENS = "copilot-tokens"


def _serve(args: argparse.Namespace) -> int:
    from copilot_manager import workers
    from copilot_manager.adapters import GenericRedisAdapter
    from copilot_manager.auth import Tokens
    from copilot_manager.outputs import open_store
    from copilot_manager.queue import RedisQueue
    from copilot_manager.service import Service, Settings

    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ManagerError(f"--listen {args.listen!r}: expected HOST:PORT")
    if args.workers < 1:
        raise ManagerError(f"--workers {args.workers}: at least 1")
    settings = Settings(
        max_upload=args.max_upload,
        retry_after_s=args.retry_after,
        redirect=args.redirect_agents,
        public_url=args.public_url,
    )
    # Built here once to refuse bad settings before serving; each worker builds its own.
    tokens, store = Tokens(Path(args.tokens)), open_store(args.outputs, args.endpoint_url)

    def make_app() -> Any:
        queue = RedisQueue.from_url(args.redis, args.prefix)
        tokens = Tokens(Path(args.tokens))
        store = open_store(args.outputs, args.endpoint_url)
        return Service(queue, GenericRedisAdapter(queue), tokens, store, settings).app()

    counts = tokens.count()
    print(
        f"copilot-manager on http://{host}:{port}/copilot/v1 (pid {os.getpid()}, "
        f"{args.workers} worker{'s' if args.workers > 1 else ''}): Redis "
        f"{args.redis}, outputs in {store.describe()}, {counts['agent']} agent and "
        f"{counts['submitter']} submitter tokens in {args.tokens}",
        file=sys.stderr,
        flush=True,
    )
    workers.serve(make_app, host.strip("[]"), int(port), args.workers)
    return 0


def _client(args: argparse.Namespace) -> Any:
    from copilot_manager.client import Client

    token = os.environ.get("COPILOT_TOKEN", "")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ManagerError(f"--token-file {args.token_file}: {exc.strerror}") from exc
    if not token:
        raise ManagerError("no token: pass --token-file FILE or set COPILOT_TOKEN")
    if not args.url:
        raise ManagerError("no manager: pass --url URL or set COPILOT_URL")
    return Client(args.url, token)


def _submit(args: argparse.Namespace) -> int:
    from copilot_manager.client import load_job_file, local_input

    if args.job_file:
        jobs = load_job_file(Path(args.job_file))
    elif args.command_line:
        jobs = [_job_from_flags(args, local_input)]
    else:
        raise ManagerError("give a job file (JSON or TOML) or --command 'sh command line'")
    ids = _client(args).submit(jobs)
    if args.json:
        print(json.dumps({"ids": ids}))
    else:
        for job_id in ids:
            print(job_id)
    return 0


def _job_from_flags(args: argparse.Namespace, local_input: Callable[..., Any]) -> dict[str, Any]:
    job: dict[str, Any] = {"command": args.command_line, "outputs": args.output}
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ManagerError(f"--env {item!r}: expected NAME=VALUE")
        env[key] = value
    job["environment"] = env
    if args.repository:
        if not args.key:
            raise ManagerError("--repository needs --key NAME.pub (the repository's master key)")
        key = Path(args.key)
        job["repositories"] = [
            {
                "name": key.name.removesuffix(".pub"),
                "url": args.repository,
                "public_key": key.read_text(),
                "paths": args.repo_path,
            }
        ]
    inputs = []
    for item in args.input:
        if item.startswith(("http://", "https://")):
            raise ManagerError(
                f"--input {item}: for a URL, use a job file with its sha256 and size"
            )
        found = local_input(Path(item))
        inputs.append({"name": found.name, "sha256": found.sha256, "size": found.size,
                       "_path": str(found.path)})  # fmt: skip
    job["inputs"] = inputs
    for flag in ("lease_s", "max_attempts"):
        if getattr(args, flag) is not None:
            job[flag] = getattr(args, flag)
    return job


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.job:
        job = client.show(args.job)
        if args.json:
            print(json.dumps(job))
            return 0
        print(f"job {job['id']}: {job['state']}, attempt {job['attempts']} of "
              f"{job['max_attempts']}, agent {job['agent'] or '-'}")  # fmt: skip
        if job["exit_code"] is not None:
            print(f"exit code {job['exit_code']}")
        for name, out in job["outputs"].items():
            print(f"output {name}\t{out['size']}\t{out['sha256']}")
        if job["message"]:
            print(f"message: {job['message']}")
        return 0
    status = client.status()
    if args.json:
        print(json.dumps(status))
        return 0
    print("  ".join(f"{state} {n}" for state, n in status["counts"].items()))
    print(f"agents seen: {len(status['agents'])}")
    for agent in status["agents"]:
        print(f"  {agent['name']}\t{agent['last_seen_s_ago']} s ago")
    print(f"leases expiring within 60 s: {len(status['expiring'])}")
    for lease in status["expiring"]:
        print(f"  job {lease['id']}\t{lease['agent']}\tin {lease['expires_in_s']} s")
    return 0


def _requeue_or_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    for job_id in args.jobs:
        answer = client.requeue(job_id) if args.command == "requeue" else client.cancel(job_id)
        print(f"job {job_id}: {answer['was']} -> {answer['state']}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    import asyncio

    from redis.exceptions import RedisError

    from copilot_manager.outputs import open_store
    from copilot_manager.queue import RedisQueue

    if args.forget_finished_days is not None and args.forget_finished_days < 0:
        raise ManagerError(f"--forget-finished-days {args.forget_finished_days}: not negative")
    store = open_store(args.outputs, args.endpoint_url)
    before = None
    if args.forget_finished_days is not None:
        before = time.time() - args.forget_finished_days * 86400

    async def run() -> gc_module.Collected:
        queue = RedisQueue.from_url(args.redis, args.prefix)
        try:
            if not await queue.ping():
                raise ManagerError(f"Redis at {args.redis} does not answer")
            return await gc_module.collect(
                queue, store, dry_run=args.dry_run, forget_finished_before=before,
                input_grace_s=args.input_grace_hours * 3600,
            )  # fmt: skip
        finally:
            await queue.close()

    try:
        found = asyncio.run(run())
    except RedisError as exc:
        raise ManagerError(f"Redis at {args.redis}: {exc}") from exc
    if args.json:
        print(json.dumps(found.to_json()))
    else:
        print(gc_module.describe(found, store.describe()))
    return 0


def _token(args: argparse.Namespace) -> int:
    from copilot_manager.auth import Tokens
    from cvmfs_format.signed import format_time

    tokens = Tokens(Path(args.tokens))
    if args.action == "add":
        print(tokens.add(args.role, args.name))
        print(f"{args.role} token {args.name!r}; it is shown only now", file=sys.stderr)
    elif args.action == "list":
        for role, store in tokens.stores.items():
            for token in store.tokens():
                created = format_time(token.created)
                print(f"{token.name}\t{role}\t{created}")
    else:
        tokens.store(args.role).revoke(args.name)
        print(f"{args.role} token {args.name!r} revoked")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copilot-manager", description="The Co-Pilot job manager (docs/COPILOT.md)."
    )
    add_version(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("COPILOT_URL"),
                       help="the manager, e.g. http://HOST:8080 (default COPILOT_URL)")  # fmt: skip
        p.add_argument("--token-file", help="a submitter token (default: COPILOT_TOKEN)")
        p.add_argument("--json", action="store_true", help="print one JSON document")

    def queue_and_store(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--redis", default="redis://127.0.0.1:6379/0",
            help="redis://HOST:PORT/DB or unix:///PATH (default: port 6379)",
        )  # fmt: skip
        p.add_argument("--prefix", default="copilot:", help="Redis key prefix (default copilot:)")
        p.add_argument("--outputs", required=True, help="output directory, or s3://BUCKET[/PREFIX]")
        p.add_argument(
            "--endpoint-url", help="S3 endpoint for s3:// (default: AWS_ENDPOINT_URL, else AWS)"
        )

    p = sub.add_parser("serve", help="serve protocol v1 in front of Redis")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    queue_and_store(p)
    p.add_argument(
        "--tokens", default=DEFAULT_TOKENS, help="token directory (default ./copilot-tokens)"
    )
    p.add_argument("--max-upload", type=int, default=4 << 30, help="largest upload in bytes")
    p.add_argument("--retry-after", type=int, default=5, help="seconds agents wait when idle")
    p.add_argument("--redirect-agents", metavar="URL", help="send agents to this manager (307)")
    p.add_argument("--public-url", help="the URL agents reach this manager at (default: theirs)")
    p.add_argument(
        "--workers", type=int, default=1,
        help="processes serving the one port (the manager is stateless: one per core)",
    )  # fmt: skip
    p.set_defaults(func=_serve)

    p = sub.add_parser("submit", help="submit jobs from a JSON/TOML file or flags; prints ids")
    client_options(p)
    p.add_argument("job_file", nargs="?", help="a job file: JSON (a job or a list) or TOML")
    p.add_argument("--command", dest="command_line", help="the job's sh command line")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE (repeat)")
    p.add_argument("--input", action="append", default=[], help="a local file (repeat)")
    p.add_argument("--output", action="append", default=[], help="an output file name (repeat)")
    p.add_argument("--repository", metavar="URL", help="a repository the job reads")
    p.add_argument("--key", help="its master public key, NAME.pub (NAME: the repository's)")
    p.add_argument("--repo-path", action="append", default=[], help="a path it needs (repeat)")
    p.add_argument("--lease-s", type=int, help="lease length in seconds (default 300)")
    p.add_argument("--max-attempts", type=int, help="leases before it fails (default 3)")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="queue counts, agents, expiring leases; or one job")
    client_options(p)
    p.add_argument("job", nargs="?", help="a job id: show that job")
    p.set_defaults(func=_status)
    for name, text in (("requeue", "put jobs back in the queue (attempts reset)"),
                       ("cancel", "cancel queued or running jobs")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        client_options(p)
        p.add_argument("jobs", nargs="+", metavar="JOB")
        p.set_defaults(func=_requeue_or_cancel)

    p = sub.add_parser(
        "gc", help="delete uploads and inputs no job can use; forget old finished jobs if asked"
    )
    queue_and_store(p)
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    p.add_argument(
        "--forget-finished-days", type=float, metavar="DAYS",
        help="also forget jobs finished more than DAYS ago, with their outputs",
    )  # fmt: skip
    p.add_argument(
        "--input-grace-hours", type=float, default=gc_module.INPUT_GRACE_S / 3600,
        help="keep an input no job names for this long (default 24: submitters upload "
        "inputs before the job that names them)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=_gc)

    tk = sub.add_parser("token", help="manage agent and submitter tokens")
    tk_sub = tk.add_subparsers(dest="action", required=True)
    for action, text in (("add", "make a token; prints it once"), ("list", "name, role, created"),
                         ("revoke", "the manager refuses it at once")):  # fmt: skip
        p = tk_sub.add_parser(action, help=text)
        p.add_argument("--tokens", default=DEFAULT_TOKENS, help="token directory")
        if action != "list":
            p.add_argument("--role", required=True, choices=("agent", "submitter"))
            p.add_argument("--name", required=True, help="who it is for, e.g. boinc-fleet")
        p.set_defaults(func=_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ManagerError, CvmfsError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
