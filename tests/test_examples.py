"""The build-script examples in examples/: each publishes with its one added line over
HTTP, with settings from cvmbuild.toml and CVMBUILD_* variables, and the release is
readable (and runnable) through cvmfs-client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmbuild.settings import PublishSettings, resolve
from tests.conftest import BIN, Repo, mounted, run_cli, serving

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def publishing_env(repo: Repo, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A served repository and the environment a CI job would give the build."""
    token = run_cli("repo-server", "token", "add", repo.dir, "--name", "ci", "--path", "/sw")
    token_file = tmp_path / "token"
    token_file.write_bytes(token.stdout)
    with serving(repo.dir, tmp_path / "serve.log") as url:
        yield {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "CVMBUILD_REPO": url,
            "CVMBUILD_TOKEN_FILE": str(token_file),
        }


def build(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def example(name: str, tmp_path: Path) -> Path:
    work = tmp_path / name
    shutil.copytree(EXAMPLES / name, work)
    return work


def cat(env: dict[str, str], repo: Repo, path: str) -> bytes:
    return run_cli("cvmfs-client", "cat", env["CVMBUILD_REPO"], path, "--key", repo.pub).stdout


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (build-essential)")
def test_a_make_build_publishes_and_runs_from_the_mount(
    tmp_path: Path, repo: Repo, publishing_env: dict[str, str]
) -> None:
    work = example("make", tmp_path)
    out = build(
        ["make", "publish", "VERSION=2.1", f"PREFIX={tmp_path}/install"], work, publishing_env
    )
    assert "published revision 1 at /sw/hello-make/2.1" in out
    tags = run_cli("repo-server", "tags", repo.dir).stdout.decode()
    assert tags.startswith("hello-make-2.1\trevision 1")

    url = publishing_env["CVMBUILD_REPO"]
    with mounted(url, tmp_path / "mnt", tmp_path / "cache", repo.pub) as mnt:
        ran = subprocess.run(
            [mnt / "sw/hello-make/2.1/bin/hello"], capture_output=True, text=True, check=True
        )
    assert ran.stdout == "hello from a make build, version 2.1\n"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (build-essential)")
def test_the_next_make_release_is_built_again_and_prints_its_own_version(
    tmp_path: Path, repo: Repo, publishing_env: dict[str, str]
) -> None:
    work = example("make", tmp_path)
    for version in ("1.0", "1.1"):  # one build tree, one prefix, as a release manager has
        build(["make", "publish", f"VERSION={version}", f"PREFIX={tmp_path}/install"], work,
              publishing_env)  # fmt: skip
    binaries = {
        v: cat(publishing_env, repo, f"/sw/hello-make/{v}/bin/hello") for v in ("1.0", "1.1")
    }
    assert binaries["1.0"] != binaries["1.1"]
    program = tmp_path / "hello-1.1"
    program.write_bytes(binaries["1.1"])
    program.chmod(0o755)
    ran = subprocess.run([program], capture_output=True, text=True, check=True)
    assert ran.stdout == "hello from a make build, version 1.1\n"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_a_cmake_build_publishes_at_install(
    tmp_path: Path, repo: Repo, publishing_env: dict[str, str]
) -> None:
    work = example("cmake", tmp_path)
    prefix = tmp_path / "install"
    build(
        ["cmake", "-S", ".", "-B", "build", f"-DCMAKE_INSTALL_PREFIX={prefix}"],
        work,
        publishing_env,
    )
    build(["cmake", "--build", "build"], work, publishing_env)
    out = build(["cmake", "--install", "build"], work, publishing_env)
    assert "published revision 1 at /sw/hello-cmake/1.0" in out
    assert (
        cat(publishing_env, repo, "/sw/hello-cmake/1.0/bin/hello")
        == (prefix / "bin/hello").read_bytes()
    )


def test_a_shell_build_publishes_with_its_last_line(
    tmp_path: Path, repo: Repo, publishing_env: dict[str, str]
) -> None:
    work = example("shell", tmp_path)
    out = build(["./build.sh", "3.0", str(tmp_path / "install")], work, publishing_env)
    assert "published revision 1 at /sw/hello-shell/3.0" in out
    script = cat(publishing_env, repo, "/sw/hello-shell/3.0/bin/hello")
    assert b'echo "hello from a shell build, version 3.0"' in script


def test_a_pip_build_publishes_the_installed_package(
    tmp_path: Path, repo: Repo, publishing_env: dict[str, str]
) -> None:
    work = example("python", tmp_path)
    out = build(["./build.sh", str(tmp_path / "install")], work, publishing_env)
    assert "published revision 1 at /sw/hello-py/1.0" in out
    listing = run_cli(
        "cvmfs-client", "ls", publishing_env["CVMBUILD_REPO"], "/sw/hello-py/1.0/lib",
        "--key", repo.pub,
    ).stdout.decode()  # fmt: skip
    python = f"python3.{sys.version_info.minor}"
    assert listing.split() == [python]
    module = cat(
        publishing_env, repo, f"/sw/hello-py/1.0/lib/{python}/site-packages/hello_py/__init__.py"
    )
    assert b"hello from a pip build" in module


def test_settings_errors_name_the_file_line_and_key(
    tmp_path: Path, publishing_env: dict[str, str]
) -> None:
    work = example("make", tmp_path)
    for config, complaint in (
        (
            '[publish]\npath = "/sw/x"\nrepository = "typo"\n',
            f"error: {work}/cvmbuild.toml:3: publish.repository: unknown key",
        ),
        (
            '[publish]\npath = "/sw/x/{version}"\n',
            "publish.path uses {version}: give --version or set CVMBUILD_VERSION",
        ),
        ("[publish]\npath = 3\n", f"{work}/cvmbuild.toml:2: publish.path: expected a string"),
    ):
        (work / "cvmbuild.toml").write_text(config)
        result = subprocess.run(
            [BIN / "cvmbuild", "publish", work],
            cwd=work,
            env=publishing_env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 1
        assert complaint in result.stderr


def test_settings_come_from_the_command_line_then_environment_then_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    config = tmp_path / "cvmbuild.toml"
    config.write_text(
        '[publish]\nrepo = "repo"\npath = "/sw/{version}"\ntoken_file = "tok"\ntag = "t"\n'
    )
    settings, found = resolve(
        PublishSettings(tag="cli-tag"), {"CVMBUILD_VERSION": "9"}, tmp_path / "sub"
    )
    assert found == config
    assert settings.repo == str(tmp_path / "repo")  # relative to the file
    assert settings.token_file == str(tmp_path / "tok")
    assert settings.path == "/sw/9"
    assert settings.tag == "cli-tag"
    settings, _ = resolve(
        PublishSettings(), {"CVMBUILD_REPO": "http://h:1", "CVMBUILD_VERSION": "2"}, tmp_path
    )
    assert settings.repo == "http://h:1"
