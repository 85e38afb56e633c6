"""Rotating the signing key survives a crash at any step.

The story: the operator runs `repo-server key rotate` and the machine dies halfway. The
weekly cron job runs `repo-server whitelist renew` as usual. Clients, which pin only the
master key, must keep reading throughout; `repo-server check` says a rotation is half
done and what to run; running `key rotate` again finishes it.
"""

from __future__ import annotations

import calendar
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.signed import attach_signature, encode_public_key, key_fingerprint
from cvmfs_format.whitelist import Whitelist
from repo_server import keys, rotation
from tests.conftest import Repo, open_reader, publish, read_back, run_cli
from tests.kill_points import run_killed_at, was_killed

DAY = 86400
RELEASE = b"release 1.0\n"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A repository with one release, to copy for each crash."""
    base = tmp_path_factory.mktemp("published")
    run_cli("repo-server", "init", base / "repo", "--name", "rotate.example.org")
    (base / "src").mkdir()
    (base / "src" / "VERSION").write_bytes(RELEASE)
    repo = Repo(base / "repo", base / "repo.keys", "rotate.example.org")
    publish(base / "src", repo, "/sw")
    return repo


def copy_of(repo: Repo, where: Path) -> Repo:
    where.mkdir()
    shutil.copytree(repo.dir, where / "repo", symlinks=True)
    shutil.copytree(repo.keys, where / "repo.keys", symlinks=True)
    return Repo(where / "repo", where / "repo.keys", repo.name)


def client_reads(repo: Repo) -> bytes:
    """What a client pinned to the master key reads (it verifies whitelist and manifest)."""
    return read_back(open_reader(repo), "/sw/VERSION")


def client_refuses(repo: Repo) -> bool:
    cat = ("cvmfs-client", "cat", repo.dir, "/sw/VERSION", "--key", repo.pub)
    return run_cli(*cat, check=False).returncode == 1


def signing_key(repo: Repo) -> Ed25519PrivateKey:
    return keys.load_private_key(repo.keys / f"{repo.name}.key")


def pending_key(repo: Repo) -> Path:
    return repo.keys / f"{repo.name}.key.new"


def whitelisted(repo: Repo) -> set[str]:
    return set(whitelist_mod.parse((repo.dir / "whitelist").read_bytes())[0].keys)


def manifest_signer(repo: Repo) -> str:
    return manifest_mod.parse((repo.dir / "manifest").read_bytes())[0].signer


def master_public(repo: Repo) -> Ed25519PublicKey:
    return keys.load_public_key(repo.pub)


def public(key: Ed25519PrivateKey) -> str:
    return encode_public_key(key.public_key())


def check(repo: Repo) -> tuple[int, str]:
    result = run_cli("repo-server", "check", repo.dir, check=False)
    return result.returncode, result.stdout.decode() + result.stderr.decode()


def test_key_rotate_killed_at_any_step_keeps_clients_reading_through_renew_and_rerun(
    published: Repo, tmp_path: Path
) -> None:
    point = 1
    while True:
        repo = copy_of(published, tmp_path / f"killed-at-{point}")
        old_key = signing_key(repo)
        killed = run_killed_at(point, "repo-server", "key", "rotate", repo.dir)
        if not was_killed(killed):
            assert killed.returncode == 0, killed.stderr.decode()
            break
        moment = f"key rotate killed before its file-system call {point}"
        assert client_reads(repo) == RELEASE, moment
        code, said = check(repo)
        assert code == 0, f"{moment}\n{said}"
        half_done = pending_key(repo).exists()
        if half_done:
            assert "key rotation is half done" in said, f"{moment}\n{said}"
            assert f"repo-server key rotate {repo.dir}" in said, f"{moment}\n{said}"
            pending = keys.load_private_key(pending_key(repo))

        run_cli("repo-server", "whitelist", "renew", repo.dir)  # the weekly cron job

        assert client_reads(repo) == RELEASE, moment
        if half_done:  # until the rotation ends, both keys stay listed
            assert whitelisted(repo) == {public(pending), public(old_key)}, moment
        assert check(repo)[0] == 0, moment

        rerun = run_cli("repo-server", "key", "rotate", repo.dir, check=False)

        assert rerun.returncode == 0, f"{moment}\n{rerun.stderr.decode()}"
        if half_done:  # the re-run finished that rotation rather than starting another
            assert "finished the key rotation" in rerun.stdout.decode(), moment
            assert public(signing_key(repo)) == public(pending), moment
        assert not pending_key(repo).exists(), moment
        assert client_reads(repo) == RELEASE, moment
        assert manifest_signer(repo) == key_fingerprint(signing_key(repo).public_key()), moment
        code, said = check(repo)
        assert code == 0 and "warning" not in said, f"{moment}\n{said}"
        run_cli("repo-server", "whitelist", "renew", repo.dir, "--end-rotation")
        assert whitelisted(repo) == {public(signing_key(repo))}, moment  # transition over
        assert client_reads(repo) == RELEASE, moment
        point += 1
    assert point > 4, "the rotation's steps were not all reached"


def test_a_renewal_after_a_rotation_keeps_the_old_key_until_its_transition_ends(
    published: Repo, tmp_path: Path
) -> None:
    """The weekly cron renewal runs an hour after a rotation: a mirror not yet updated
    still serves a manifest the old key signed, and a client that got the new whitelist
    elsewhere must accept it until that manifest expires."""
    repo = copy_of(published, tmp_path / "rotated")
    old = signing_key(repo)
    stale_manifest = (repo.dir / "manifest").read_bytes()
    run_cli("repo-server", "key", "rotate", repo.dir)
    new = signing_key(repo)
    (archived,) = keys.KeyFiles(repo.keys, repo.name).archives()

    renewed = run_cli("repo-server", "whitelist", "renew", repo.dir).stdout.decode()

    assert whitelisted(repo) == {public(new), public(old)}
    rotated_at = calendar.timegm(time.strptime(archived.name[-16:], "%Y%m%dT%H%M%SZ"))
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rotated_at + 30 * DAY))
    assert f"the old key {archived.name} stays listed until {end}" in renewed, renewed
    wl = whitelist_mod.verify(
        (repo.dir / "whitelist").read_bytes(), master_public(repo), time.time()
    )
    assert manifest_mod.verify(stale_manifest, wl, time.time()).signer == key_fingerprint(
        old.public_key()
    )
    assert client_reads(repo) == RELEASE

    # 31 days later the transition is over: the next renewal lists the new key only.
    month_ago = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 31 * DAY))
    archived.rename(archived.with_name(f"{repo.name}.key.{month_ago}"))
    later = run_cli("repo-server", "whitelist", "renew", repo.dir).stdout.decode()
    assert whitelisted(repo) == {public(new)}
    assert "stays listed" not in later
    assert client_reads(repo) == RELEASE


def test_end_rotation_drops_a_leaked_old_key_at_once(published: Repo, tmp_path: Path) -> None:
    repo = copy_of(published, tmp_path / "leaked")
    run_cli("repo-server", "key", "rotate", repo.dir)

    run_cli("repo-server", "whitelist", "renew", repo.dir, "--end-rotation")

    assert whitelisted(repo) == {public(signing_key(repo))}
    assert client_reads(repo) == RELEASE
    code, said = check(repo)
    assert code == 0 and "warning" not in said, said


def test_check_sees_a_rotation_stopped_before_re_signing_and_renew_keeps_the_signer(
    published: Repo, tmp_path: Path
) -> None:
    """The state the issue found: the new key installed and whitelisted beside the old
    one, the manifest still signed by the old one (an earlier rotate was killed there)."""
    repo = copy_of(published, tmp_path / "half")
    files = keys.KeyFiles(repo.keys, repo.name)
    master = keys.load_private_key(files.master)
    old, new = signing_key(repo), Ed25519PrivateKey.generate()
    now = int(time.time())
    listing = Whitelist(repo.name, now, now + 30 * DAY, (public(new), public(old)))
    body = listing.body()
    (repo.dir / "whitelist").write_bytes(attach_signature(body, master.sign(body)))
    keys.install_private_key(files.signing, new)

    code, said = check(repo)
    assert code == 0, said
    assert "warning: the manifest is signed by key" in said, said
    assert f"repo-server resign {repo.dir}" in said, said

    run_cli("repo-server", "whitelist", "renew", repo.dir)

    assert client_reads(repo) == RELEASE  # renew kept the key that signed the manifest
    assert whitelisted(repo) == {public(new), public(old)}
    run_cli("repo-server", "resign", repo.dir)
    code, said = check(repo)
    assert code == 0 and "warning" not in said, said
    run_cli("repo-server", "whitelist", "renew", repo.dir)
    assert whitelisted(repo) == {public(new)}
    assert client_reads(repo) == RELEASE


def test_check_fails_when_clients_refuse_the_manifest(published: Repo, tmp_path: Path) -> None:
    repo = copy_of(published, tmp_path / "refused")
    files = keys.KeyFiles(repo.keys, repo.name)
    master = keys.load_private_key(files.master)
    now = int(time.time())
    stranger = Ed25519PrivateKey.generate()
    listing = Whitelist(repo.name, now, now + 30 * DAY, (public(stranger),))
    body = listing.body()
    (repo.dir / "whitelist").write_bytes(attach_signature(body, master.sign(body)))

    assert client_refuses(repo)
    code, said = check(repo)
    assert code == 1 and "not on the whitelist" in said, said


def test_check_fails_when_the_manifest_names_a_wrong_root_catalog_size(
    published: Repo, tmp_path: Path
) -> None:
    """Signed with the right key, but a client fetching the root catalog refuses it."""
    repo = copy_of(published, tmp_path / "wrong-size")
    head = manifest_mod.parse((repo.dir / "manifest").read_bytes())[0]
    lie = manifest_mod.Manifest(**{**head.__dict__, "root_size": head.root_size + 1})
    body = lie.body()
    (repo.dir / "manifest").write_bytes(attach_signature(body, signing_key(repo).sign(body)))

    assert client_refuses(repo)
    code, said = check(repo)
    assert code == 1 and "root catalog" in said, said


def test_two_rotations_in_the_same_second_keep_both_old_keys(
    published: Repo, tmp_path: Path
) -> None:
    repo = copy_of(published, tmp_path / "twice")
    first = signing_key(repo)
    files = keys.KeyFiles(repo.keys, repo.name)
    opened = repo.open()
    now = int(time.time())
    with opened.lock():
        rotation.rotate_signing_key(opened, now)
        second = signing_key(repo)
        rotation.rotate_signing_key(opened, now)

    kept = {public(keys.load_private_key(path)) for path in files.archives()}
    assert kept == {public(first), public(second)}
    assert client_reads(repo) == RELEASE


def test_check_reports_a_garbled_whitelist_as_a_problem(published: Repo, tmp_path: Path) -> None:
    repo = copy_of(published, tmp_path / "garbled")
    (repo.dir / "whitelist").write_bytes(b"garbage\n")

    code, said = check(repo)

    assert code == 1 and "whitelist: last line is not a signature" in said, said
    assert said.count("\n") > 1, said  # one line per problem and the verdict, no error
