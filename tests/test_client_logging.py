"""A mount's messages go where the site says, as CernVM-FS's settings say it: syslog
(at the priority CVMFS_SYSLOG_LEVEL sets, to the facility CVMFS_SYSLOG_FACILITY sets),
the file CVMFS_USYSLOG names instead, and a debug log in CVMFS_DEBUGLOG; files get
timestamps."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_client.daemon_log import LogSettings, start_logging
from tests.conftest import mounted_with
from tests.site_fixtures import Site

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[socket.socket]:
    """A syslog socket, as /dev/log is (journald and rsyslog read datagrams there)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "log"))
        sock.settimeout(10)
        yield sock


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """start_logging configures the process's logging: give pytest its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize(
    ("level", "facility", "info_priority", "warning_priority"),
    [
        (None, None, 1 * 8 + 5, 1 * 8 + 4),  # LOG_USER; LOG_NOTICE, LOG_WARNING
        (2, 3, (16 + 3) * 8 + 6, (16 + 3) * 8 + 4),  # LOG_LOCAL3; LOG_INFO
        (1, 0, 16 * 8 + 7, 16 * 8 + 4),  # LOG_LOCAL0; LOG_DEBUG
    ],
)
def test_syslog_gets_messages_at_the_priority_and_facility_the_site_sets(
    syslog: socket.socket,
    restored_logging: None,
    tmp_path: Path,
    level: int | None,
    facility: int | None,
    info_priority: int,
    warning_priority: int,
) -> None:
    settings = LogSettings(
        syslog_level=level, syslog_facility=facility, syslog_socket=str(syslog.getsockname())
    )
    where = start_logging(
        settings, repository="sw.example.org", foreground=False,
        fallback_file=str(tmp_path / "client.log"),
    )  # fmt: skip
    assert where == "syslog (journalctl -t cvmfs-client)"
    logging.getLogger("cvmfs_client.fetcher").debug("only a debug log has this")
    logging.getLogger("cvmfs_client.repository").info("switched from revision 1 to 2")
    logging.getLogger("cvmfs_client.fetcher").warning("manifest: squid1 down")
    ident = f"cvmfs-client[{os.getpid()}]: (sw.example.org)"
    assert syslog.recv(4096) == f"<{info_priority}>{ident} switched from revision 1 to 2\0".encode()
    assert syslog.recv(4096) == f"<{warning_priority}>{ident} manifest: squid1 down\0".encode()
    assert not (tmp_path / "client.log").exists()


def test_without_a_syslog_socket_a_detached_mount_logs_to_its_cache(
    restored_logging: None, tmp_path: Path
) -> None:
    settings = LogSettings(syslog_socket=str(tmp_path / "no-such-socket"))
    fallback = tmp_path / "client.log"
    where = start_logging(
        settings, repository="sw.example.org", foreground=False, fallback_file=str(fallback)
    )
    assert where == str(fallback)
    logging.getLogger("cvmfs_client.repository").info("switched from revision 1 to 2")
    assert re.fullmatch(
        rf"{STAMP} cvmfs-client\[{os.getpid()}\]: \(sw.example.org\) INFO switched from "
        r"revision 1 to 2\n",
        fallback.read_text(),
    )


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_a_mount_logs_to_the_files_cvmfs_usyslog_and_cvmfs_debuglog_name(
    site: Site, tmp_path: Path
) -> None:
    usyslog, debuglog = tmp_path / "logs" / "cvmfs.log", tmp_path / "logs" / "debug.log"
    usyslog.parent.mkdir()
    site.write(
        "config.d/sw.example.org.local",
        f"CVMFS_USYSLOG={usyslog}\nCVMFS_DEBUGLOG={debuglog}\nCVMFS_SYSLOG_LEVEL=2\n",
    )
    mountpoint = tmp_path / "mnt"
    with mounted_with("sw.example.org", mountpoint, "--config-dir", site.etc):
        assert (mountpoint / "sw" / "bin" / "run.py").read_text() == "print('run')\n"
    lines = usyslog.read_text().splitlines()
    ident = r"cvmfs-client\[\d+\]: \(sw.example.org\)"
    assert re.fullmatch(
        rf"{STAMP} {ident} INFO mounting revision 1 at {mountpoint} from "
        rf"http://127.0.0.1:1/cvmfs/sw.example.org;{site.stratum1}/sw.example.org",
        lines[0],
    )
    assert not any(" DEBUG " in line for line in lines)
    debug = debuglog.read_text().splitlines()
    assert any(re.fullmatch(rf"{STAMP} {ident} INFO mounting revision 1 .*", d) for d in debug)
    # Each object the daemon fetched, with the route it took.
    fetched = [d for d in debug if " DEBUG data/" in d]
    assert fetched and all(
        re.fullmatch(rf"{STAMP} {ident} DEBUG data/.* via DIRECT", d) for d in fetched
    )
    assert not (site.cache / "sw.example.org" / "client.log").read_text()
