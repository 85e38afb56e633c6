"""Keys and expiry without footguns: the whitelist is renewed for a sane time, every
expiry is printed as one UTC date, and `info` still works on a repository whose
signatures ran out (that is when the operator needs it) and says so first.

The story: an operator renews the whitelist from cron, mistypes `--days 3650`, and one
day finds that nobody renewed it in time.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import pytest

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from repo_server import keys
from repo_server.repository import DAY, write_whitelist
from tests.conftest import Repo, run_cli

ISO_UTC = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")


def whitelist_of(repo: Repo) -> whitelist_mod.Whitelist:
    return whitelist_mod.parse((repo.dir / "whitelist").read_bytes())[0]


def manifest_of(repo: Repo) -> manifest_mod.Manifest:
    return manifest_mod.parse((repo.dir / "manifest").read_bytes())[0]


def utc(text: str) -> int:
    """The Unix time of the one ISO 8601 UTC date in text."""
    found = ISO_UTC.findall(text)
    assert len(found) == 1, text
    return int(datetime.fromisoformat(found[0]).replace(tzinfo=UTC).timestamp())


def expire_whitelist(repo: Repo) -> int:
    """Sign a whitelist with the real master key that ran out ten days ago; its expiry."""
    files = keys.KeyFiles(repo.keys, repo.name)
    signing = keys.load_private_key(files.signing).public_key()
    master = keys.load_private_key(files.master)
    storage = repo.open().storage
    return write_whitelist(
        storage, repo.name, master, [signing], int(time.time()) - 40 * DAY
    ).expires


@pytest.mark.parametrize("days", ["0", "-3", "91", "3650"])
def test_whitelist_renew_refuses_a_lifetime_outside_1_to_90_days(repo: Repo, days: str) -> None:
    before = (repo.dir / "whitelist").read_bytes()

    result = run_cli("repo-server", "whitelist", "renew", repo.dir, "--days", days, check=False)

    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"--days {days}" in err and "1 to 90" in err, err
    assert (repo.dir / "whitelist").read_bytes() == before


def test_a_long_whitelist_needs_allow_long(repo: Repo) -> None:
    result = run_cli("repo-server", "whitelist", "renew", repo.dir, "--days", "365", "--allow-long")

    assert abs(whitelist_of(repo).expires - (time.time() + 365 * DAY)) < 60
    assert utc(result.stdout.decode()) == whitelist_of(repo).expires
    zero = run_cli(
        "repo-server", "whitelist", "renew", repo.dir, "--days", "0", "--allow-long", check=False
    )
    assert zero.returncode == 1 and "at least 1 day" in zero.stderr.decode()


def test_every_expiry_printed_is_a_utc_date(repo: Repo) -> None:
    renewed = run_cli("repo-server", "whitelist", "renew", repo.dir, "--days", "20").stdout.decode()
    assert utc(renewed) == whitelist_of(repo).expires

    resigned = run_cli("repo-server", "resign", repo.dir).stdout.decode()
    assert utc(resigned) == manifest_of(repo).expires

    info = run_cli("repo-server", "info", repo.dir).stdout.decode().splitlines()
    lines = {line.split(":", 1)[0]: line for line in info}
    assert utc(lines["manifest expires"]) == manifest_of(repo).expires
    assert utc(lines["whitelist expires"]) == whitelist_of(repo).expires
    assert utc(lines["published"]) == manifest_of(repo).published
    assert "UTC" not in "\n".join(info)


def test_info_on_an_expired_whitelist_runs_and_says_so_first_while_check_fails(
    repo: Repo,
) -> None:
    expired = expire_whitelist(repo)

    info = run_cli("repo-server", "info", repo.dir, check=False)

    assert info.returncode == 0, info.stderr.decode()
    first, *rest = info.stdout.decode().splitlines()
    assert first.startswith("EXPIRED: the whitelist"), first
    assert utc(first) == expired
    assert f"repo-server whitelist renew {repo.dir}" in first
    assert any(line.startswith("revision:") and line.endswith("0") for line in rest)
    check = run_cli("repo-server", "check", repo.dir, check=False)
    assert check.returncode == 1 and "expired" in check.stdout.decode()

    run_cli("repo-server", "whitelist", "renew", repo.dir)
    healthy = run_cli("repo-server", "info", repo.dir).stdout.decode()
    assert healthy.startswith("name:") and "EXPIRED" not in healthy


def test_info_on_an_expired_manifest_names_resign(repo: Repo) -> None:
    local = repo.open()
    head = local.head()
    local._sign_manifest(
        head, head.revision, head.root_hash, head.root_size, head.history_hash,
        head.history_size, time.time() - 40 * DAY,
    )  # fmt: skip

    info = run_cli("repo-server", "info", repo.dir)

    first = info.stdout.decode().splitlines()[0]
    assert first.startswith("EXPIRED: the manifest"), first
    assert utc(first) == manifest_of(repo).expires
    assert f"repo-server resign {repo.dir}" in first
