"""Publishing never destroys more than the user meant: a publish that would remove
paths the tree lacks is refused unless --replace, a dry run lists what would change,
paths are removed and rolled back as new revisions (locally and over HTTP, within the
token's path), tags are not moved silently, and every revision says who made it."""

from __future__ import annotations

import functools
import json
import os
import pty
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmbuild.publish import PublishOptions
from cvmbuild.publish import publish as publish_tree
from cvmfs_format.objects import ObjectRef
from repo_server.changes import summarize, tree_changes
from repo_server.diff import diff_trees
from repo_server.loading import load_catalog
from repo_server.repository import LocalRepository
from tests.conftest import BIN, Repo, open_reader, read_tree, run_cli, serving


def tree(root: Path, files: dict[str, str]) -> Path:
    for relpath, text in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(text)
    return root


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*map(str, args), check=False, env=env)


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


def head(repo: Repo) -> int:
    return repo.open().head().revision


@pytest.fixture
def huge(tmp_path: Path, repo: Repo) -> Repo:
    """/sw/huge holds releases 1.0, 1.1 and 1.2."""
    for version in ("1.0", "1.1", "1.2"):
        src = tree(tmp_path / f"rel{version}", {"bin/huge": version, f"lib/v{version}.so": "x"})
        run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", f"/sw/huge/{version}")
    return repo


@pytest.fixture
def server(tmp_path: Path, huge: Repo) -> Iterator[str]:
    with serving(huge.dir, tmp_path / "serve.log") as url:
        yield url


def token(repo: Repo, tmp_path: Path, name: str, path: str) -> Path:
    made = run_cli("repo-server", "token", "add", repo.dir, "--name", name, "--path", path)
    file = tmp_path / f"{name}.token"
    file.write_bytes(made.stdout)
    return file


# -- replacing ------------------------------------------------------------------------


def test_publishing_at_the_parent_of_releases_is_refused_and_names_what_would_go(
    tmp_path: Path, huge: Repo
) -> None:
    src = tree(tmp_path / "rel1.3", {"bin/huge": "1.3"})
    refused = cli("cvmbuild", "publish", src, "--repo", huge.dir, "--path", "/sw/huge")
    assert refused.returncode == 1
    message = err(refused).strip()
    assert message.count("\n") == 0
    assert message.startswith("error: publishing at /sw/huge would remove 15 paths")
    assert "/sw/huge/1.0, /sw/huge/1.1, /sw/huge/1.2" in message
    assert "--replace" in message
    assert head(huge) == 3
    reader = open_reader(huge)
    assert read_tree(reader, "/sw/huge")["1.0/bin/huge"] == b"1.0"

    dry = cli("cvmbuild", "publish", src, "--repo", huge.dir, "--path", "/sw/huge", "--dry-run")
    assert dry.returncode == 0
    assert "  would change 1 path: /sw/huge/bin" not in out(dry)
    assert "  would add 2 paths: /sw/huge/bin and what is below" in out(dry)
    assert (
        "  would remove 15 paths: /sw/huge/1.0, /sw/huge/1.1, /sw/huge/1.2 and what is below"
        in out(dry)
    )
    assert "would be refused: publishing at /sw/huge would remove 15 paths" in out(dry)
    assert head(huge) == 3

    replaced = cli(
        "cvmbuild", "publish", src, "--repo", huge.dir, "--path", "/sw/huge", "--replace"
    )
    assert replaced.returncode == 0, err(replaced)
    assert read_tree(open_reader(huge), "/sw/huge") == {"bin/huge": b"1.3"}


def test_a_first_publish_an_identical_one_and_an_update_need_no_option(
    tmp_path: Path, repo: Repo
) -> None:
    src = tree(tmp_path / "rel", {"bin/app": "1", "share/doc": "d"})
    for _ in range(2):
        run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/app/1.0")
    (src / "bin/app").write_text("1 fixed")
    (src / "share/new").write_text("n")
    dry = run_cli(
        "cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/app/1.0", "--dry-run"
    )
    assert "  would add 1 path: /sw/app/1.0/share/new" in out(dry)
    assert "  would change 1 path: /sw/app/1.0/bin/app" in out(dry)
    assert "remove" not in out(dry)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/app/1.0")
    assert head(repo) == 3


def test_over_http_the_server_refuses_the_replace_and_the_dry_run_lists_it(
    tmp_path: Path, huge: Repo, server: str
) -> None:
    key = token(huge, tmp_path, "huge-ci", "/sw/huge")
    src = tree(tmp_path / "rel1.3", {"bin/huge": "1.3"})
    args = ("cvmbuild", "publish", src, "--repo", server, "--path", "/sw/huge", "--token-file", key)
    refused = cli(*args)
    assert refused.returncode == 1
    assert err(refused).startswith(
        "error: the server refused: publishing at /sw/huge would remove 15 paths"
    )
    assert "--replace" in err(refused)
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, err(dry)
    assert "would remove 15 paths: /sw/huge/1.0, /sw/huge/1.1, /sw/huge/1.2" in out(dry)
    assert head(huge) == 3
    assert cli(*args, "--replace").returncode == 0
    assert read_tree(open_reader(huge), "/sw/huge") == {"bin/huge": b"1.3"}


# -- tags -----------------------------------------------------------------------------


@pytest.mark.parametrize("over_http", [False, True])
def test_publish_tag_does_not_move_an_existing_tag_unless_forced(
    tmp_path: Path, huge: Repo, over_http: bool
) -> None:
    run_cli("repo-server", "tag", huge.dir, "stable", "--revision", "2")
    src = tree(tmp_path / "rel1.3", {"bin/huge": "1.3"})
    with serving(huge.dir, tmp_path / "serve.log") as url:
        where = ["--repo", huge.dir]
        if over_http:
            where = ["--repo", url, "--token-file", str(token(huge, tmp_path, "ci", "/sw"))]
        publish = ("cvmbuild", "publish", src, *where, "--path", "/sw/huge/1.3", "--tag", "stable")
        refused = cli(*publish)
        assert refused.returncode == 1
        assert "tag 'stable' already names revision 2; pass --force-tag" in err(refused)
        assert head(huge) == 3
        assert cli(*publish, "--force-tag").returncode == 0
    tags = out(run_cli("repo-server", "tags", huge.dir))
    assert tags.startswith("stable\trevision 4")


# -- removing -------------------------------------------------------------------------


def test_a_typo_path_is_removed_as_a_new_revision_locally(tmp_path: Path, huge: Repo) -> None:
    src = tree(tmp_path / "typo", {"bin/hello": "hi"})
    run_cli("cvmbuild", "publish", src, "--repo", huge.dir, "--path", "/sw/hello/{verison}")
    dry = run_cli(
        "cvmbuild", "remove", "--repo", huge.dir, "--path", "/sw/hello/{verison}", "--dry-run"
    )
    assert "would remove 3 paths: /sw/hello/{verison} and what is below" in out(dry)
    assert head(huge) == 4
    done = run_cli(
        "cvmbuild", "remove", "--repo", huge.dir, "--path", "/sw/hello/{verison}",
        "--message", "typo",
    )  # fmt: skip
    assert out(done).startswith("published revision 5: /sw/hello/{verison} removed")
    reader = open_reader(huge)
    assert [e.name for e in reader.listdir("/sw/hello")] == []
    assert read_tree(reader, "/sw/huge")["1.2/bin/huge"] == b"1.2"
    again = cli("cvmbuild", "remove", "--repo", huge.dir, "--path", "/sw/hello/{verison}")
    assert again.returncode == 1
    assert err(again) == "error: nothing at /sw/hello/{verison} to remove (see `cvmfs-client ls`)\n"
    everything = cli("cvmbuild", "remove", "--repo", huge.dir, "--path", "/")
    assert everything.returncode == 1
    assert "--everything" in err(everything)
    assert head(huge) == 5


def test_over_http_a_token_removes_only_within_its_path(
    tmp_path: Path, huge: Repo, server: str
) -> None:
    key = token(huge, tmp_path, "v11", "/sw/huge/1.1")
    for outside in ("/sw/huge", "/sw/huge/1.0", "/"):
        refused = cli(
            "cvmbuild", "remove", "--repo", server, "--path", outside, "--token-file", key,
            "--everything",
        )  # fmt: skip
        assert refused.returncode == 1
        assert "may publish only under /sw/huge/1.1" in err(refused)
    assert head(huge) == 3
    dry = cli(
        "cvmbuild", "remove", "--repo", server, "--path", "/sw/huge/1.1", "--token-file", key,
        "--dry-run",
    )  # fmt: skip
    assert "would remove 5 paths: /sw/huge/1.1 and what is below" in out(dry), err(dry)
    assert head(huge) == 3
    done = cli(
        "cvmbuild", "remove", "--repo", server, "--path", "/sw/huge/1.1", "--token-file", key
    )
    assert done.returncode == 0, err(done)
    assert sorted(read_tree(open_reader(huge), "/sw/huge")) == [
        "1.0/bin/huge", "1.0/lib/v1.0.so", "1.2/bin/huge", "1.2/lib/v1.2.so",
    ]  # fmt: skip
    log = json.loads(out(run_cli("repo-server", "log", huge.dir, "--json", "--limit", "1")))
    newest = log["revisions"][0]
    assert (newest["kind"], newest["publisher"], newest["via"]) == ("remove", "v11", "api")
    assert newest["removed"] == 5


# -- rolling back ---------------------------------------------------------------------


def test_one_path_rolls_back_to_an_older_revision_as_a_new_one(
    tmp_path: Path, huge: Repo, server: str
) -> None:
    run_cli("repo-server", "tag", huge.dir, "good", "--revision", "1")
    broken = tree(tmp_path / "broken", {"bin/huge": "broken 1.0"})
    run_cli(
        "cvmbuild", "publish", broken, "--repo", huge.dir, "--path", "/sw/huge/1.0", "--replace"
    )
    src = tree(tmp_path / "other", {"x": "y"})
    run_cli("cvmbuild", "publish", src, "--repo", huge.dir, "--path", "/sw/other")
    assert head(huge) == 5

    outside = token(huge, tmp_path, "v11", "/sw/huge/1.1")
    refused = cli(
        "cvmbuild", "rollback", "--repo", server, "--path", "/sw/huge/1.0", "--to", "good",
        "--token-file", outside,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "may publish only under /sw/huge/1.1" in err(refused)

    key = token(huge, tmp_path, "v10", "/sw/huge/1.0")
    args = ("cvmbuild", "rollback", "--repo", server, "--path", "/sw/huge/1.0", "--to", "good",
            "--token-file", key)  # fmt: skip
    dry = cli(*args, "--dry-run")
    assert "would change 1 path: /sw/huge/1.0/bin/huge" in out(dry), err(dry)
    assert "would add 2 paths: /sw/huge/1.0/lib and what is below" in out(dry)
    assert head(huge) == 5
    done = cli(*args)
    assert done.returncode == 0, err(done)
    assert out(done).startswith("published revision 6: /sw/huge/1.0 rolled back to revision good")
    tree_now = read_tree(open_reader(huge), "/sw")
    assert tree_now["huge/1.0/bin/huge"] == b"1.0"
    assert tree_now["other/x"] == b"y"  # published after revision 1: kept
    assert "huge/1.2/bin/huge" in tree_now
    old = open_reader(huge)
    old.select_revision(revision=4)
    assert read_tree(old, "/sw/huge/1.0") == {"bin/huge": b"broken 1.0"}  # nothing older changed

    local = cli("cvmbuild", "rollback", "--repo", huge.dir, "--path", "/sw/other", "--to", "1")
    assert local.returncode == 0, err(local)
    assert "removed 2 paths: /sw/other and what is below" in out(local)


def test_a_whole_repository_rollback_asks_first(tmp_path: Path, huge: Repo) -> None:
    dry = run_cli("repo-server", "rollback", huge.dir, "--to", "1", "--dry-run")
    assert out(dry).splitlines() == [
        "dry run, nothing changed: revision 4 would serve the content of revision 1",
        "  would remove 10 paths: /sw/huge/1.1, /sw/huge/1.2 and what is below",
    ]
    unasked = cli("repo-server", "rollback", huge.dir, "--to", "1")
    assert unasked.returncode == 1
    assert "pass --yes" in err(unasked)
    assert head(huge) == 3

    def on_a_terminal(answer: bytes) -> tuple[int, bytes]:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [BIN / "repo-server", "rollback", huge.dir, "--to", "1"],
            stdin=follower, stdout=subprocess.PIPE, stderr=follower,
        )  # fmt: skip
        os.close(follower)
        said = b""
        while b"[y/N]" not in said:
            said += os.read(leader, 4096)
        os.write(leader, answer)
        proc.wait(timeout=60)
        os.close(leader)
        return proc.returncode, said

    code, said = on_a_terminal(b"n\n")
    assert code == 1
    assert b"would remove 10 paths" in said
    assert head(huge) == 3
    code, _ = on_a_terminal(b"y\n")
    assert code == 0
    assert head(huge) == 4
    assert cli("repo-server", "rollback", huge.dir, "--to", "2", "--yes").returncode == 0
    assert sorted(read_tree(open_reader(huge), "/sw/huge")) == [
        "1.0/bin/huge", "1.0/lib/v1.0.so", "1.1/bin/huge", "1.1/lib/v1.1.so",
    ]  # fmt: skip


# -- who did what ---------------------------------------------------------------------


def test_the_log_shows_who_published_what_when(tmp_path: Path, huge: Repo, server: str) -> None:
    key = token(huge, tmp_path, "atlas-ci", "/sw/atlas")
    src = tree(tmp_path / "atlas", {"a": "1", "b/c": "2"})
    run_cli(
        "cvmbuild", "publish", src, "--repo", server, "--path", "/sw/atlas/21.0",
        "--token-file", key, "--message", "atlas 21.0",
    )  # fmt: skip
    text = out(run_cli("repo-server", "log", huge.dir, "--limit", "2")).splitlines()
    assert len(text) == 2
    assert text[0].startswith("4\t")
    assert "\tatlas-ci (api)\tpublish /sw/atlas/21.0\t+5 ~0 -0 [cvmbuild " in text[0]
    assert text[0].endswith(": atlas 21.0")
    assert re.search(r"\t\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\t", text[0])
    assert "(local)\tpublish /sw/huge/1.2\t+5 ~0 -0" in text[1]

    log = json.loads(out(run_cli("repo-server", "log", server, "--json", "--key", huge.pub)))
    numbers = [r["revision"] for r in log["revisions"]]
    assert numbers == [4, 3, 2, 1, 0]
    newest = log["revisions"][0]
    assert newest["publisher"] == "atlas-ci"
    assert newest["tool"].startswith("cvmbuild ")
    assert newest["published_utc"].endswith("Z")
    assert (newest["added"], newest["changed"], newest["removed"]) == (5, 0, 0)
    local = log["revisions"][1]
    assert local["via"] == "local" and "@" in local["publisher"]

    only = json.loads(
        out(run_cli("repo-server", "log", huge.dir, "--json", "--path", "/sw/huge/1.1"))
    )
    assert [r["revision"] for r in only["revisions"]] == [2]
    run_cli("repo-server", "rollback", huge.dir, "--to", "1", "--yes")  # touches 1.1 from /
    only = json.loads(
        out(run_cli("repo-server", "log", huge.dir, "--json", "--path", "/sw/huge/1.1"))
    )
    assert [r["revision"] for r in only["revisions"]] == [5, 2]
    only = json.loads(
        out(run_cli("repo-server", "log", huge.dir, "--json", "--path", "/sw/huge/1.0"))
    )
    assert [r["revision"] for r in only["revisions"]] == [1]


def test_a_history_without_records_still_logs(tmp_path: Path, repo: Repo) -> None:
    """A repository published before revisions were recorded: its history has no
    records table; log, publish and rollback work, and old revisions say 'unknown'."""

    def drop_records(db: sqlite3.Connection) -> None:
        db.execute("DROP TABLE records")

    opened = repo.open()
    with opened.lock():
        opened.rewrite_history(drop_records)
    src = tree(tmp_path / "rel", {"f": "1"})
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1")
    lines = out(run_cli("repo-server", "log", repo.dir)).splitlines()
    assert "(local)\tpublish /sw/1\t+3 ~0 -0" in lines[0]
    assert lines[1].startswith("0\t") and "\tunknown\tpublish /\tchanges not recorded" in lines[1]
    log = json.loads(out(run_cli("repo-server", "log", repo.dir, "--json")))
    assert log["revisions"][1]["publisher"] is None


def test_changes_are_counted_exactly_when_catalogs_are_split_differently(
    tmp_path: Path, repo: Repo
) -> None:
    """A directory that becomes a nested catalog (or stops being one) between two
    publishes: what is below it is compared entry by entry, not taken as all new."""
    files = {f"sub/f{i}": str(i) for i in range(5)}
    src = tree(tmp_path / "rel", {**files, "top": "t"})
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/a")
    (src / "sub/.cvmfscatalog").write_text("")
    (src / "sub/f4").unlink()
    dry = out(
        run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/a", "--dry-run")
    )
    assert dry.splitlines()[1:] == [
        "  would add 1 path: /sw/a/sub/.cvmfscatalog",
        "  would remove 1 path: /sw/a/sub/f4",
        "  would be refused: publishing at /sw/a would remove 1 path that the tree does not "
        "hold (/sw/a/sub/f4); publish at the release's own path, or pass --replace to replace them",
    ]
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/a", "--replace")
    (src / "sub/.cvmfscatalog").unlink()
    back = out(
        run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/a", "--dry-run")
    )
    assert back.splitlines()[1:] == ["  would remove 1 path: /sw/a/sub/.cvmfscatalog",
        "  would be refused: publishing at /sw/a would remove 1 path that the tree does not "
        "hold (/sw/a/sub/.cvmfscatalog); publish at the release's own path, or pass --replace "
        "to replace them"]  # fmt: skip


# -- the comparison, as a property -----------------------------------------------------

DIRS = ["a", "a/b", "a/b/c", "d", "d/e"]
release = st.dictionaries(
    st.sampled_from([f"{d}/{n}" for d in DIRS for n in ("x", "y", ".cvmfscatalog")] + ["top"]),
    st.sampled_from(["1", "2", ""]),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(releases=st.lists(release, min_size=2, max_size=3), at=st.sampled_from(["/sw", "/sw/r"]))
def test_the_summarized_comparison_counts_what_the_full_diff_lists(
    tmp_path_factory: pytest.TempPathFactory, releases: list[dict[str, str]], at: str
) -> None:
    """Catalogs that only one side has are counted by their totals, unread: the counts
    and top paths are those of the full path-by-path diff, however the releases split
    their catalogs (.cvmfscatalog markers) and whatever they add or drop."""
    work = tmp_path_factory.mktemp("prop")
    local = LocalRepository.init(work / "repo", "prop.example.org")
    for number, files in enumerate(releases):
        src = tree(work / f"rel{number}", files)
        src.mkdir(exist_ok=True)
        publish_tree(str(src), str(local.root), at, PublishOptions(replace=True))
    history = local.history(local.head())
    load = functools.partial(load_catalog, local.storage)
    records = history.revisions()
    for before, after in zip(records, records[1:], strict=False):
        old = ObjectRef.catalog(before.root_hash, before.root_size)
        new = ObjectRef.catalog(after.root_hash, after.root_size)
        assert tree_changes(load, old, new) == summarize(diff_trees(load, old, new))
        assert (after.added, after.changed, after.removed) == tree_changes(load, old, new).counts
