"""Where a mount's messages go, set up in one place: syslog (journald reads /dev/log
too), or a file, as CernVM-FS's CVMFS_USYSLOG, CVMFS_SYSLOG_LEVEL, CVMFS_SYSLOG_FACILITY
and CVMFS_DEBUGLOG choose. Every line written to a file carries a timestamp."""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from dataclasses import dataclass

SYSLOG_SOCKET = "/dev/log"
USYSLOG_MAX_BYTES = 500 * 1024  # CernVM-FS: "can grow up to 500kB", one rotation
FILE_FORMAT = "%(asctime)s cvmfs-client[%(process)d]: (%(repository)s) %(levelname)s %(message)s"


@dataclass(frozen=True)
class LogSettings:
    # CVMFS_SYSLOG_LEVEL: the priority of the informational messages (1 LOG_DEBUG,
    # 2 LOG_INFO, else LOG_NOTICE), so that a site's syslog can filter them out.
    syslog_level: int | None = None
    syslog_facility: int | None = None  # CVMFS_SYSLOG_FACILITY: LOCAL0-7 (default USER)
    usyslog: str | None = None  # CVMFS_USYSLOG: this file instead of syslog
    debuglog: str | None = None  # CVMFS_DEBUGLOG: every message, debug ones too
    syslog_socket: str = SYSLOG_SOCKET


def _has_syslog(settings: LogSettings) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(settings.syslog_socket).st_mode)
    except OSError:
        return False


def destination(settings: LogSettings, fallback_file: str) -> str:
    """Where a detached mount's messages go: what `mount failed; see ...` names."""
    if settings.usyslog:
        return settings.usyslog
    if _has_syslog(settings):
        return "syslog (journalctl -t cvmfs-client)"
    return fallback_file


class _SyslogHandler(logging.handlers.SysLogHandler):
    def __init__(self, settings: LogSettings):
        facility = (
            self.LOG_USER
            if settings.syslog_facility is None
            else self.LOG_LOCAL0 + settings.syslog_facility
        )
        super().__init__(address=settings.syslog_socket, facility=facility)
        self.ident = f"cvmfs-client[{os.getpid()}]: "
        self.info_priority = {1: "debug", 2: "info"}.get(settings.syslog_level or 0, "notice")

    def mapPriority(self, levelName: str) -> str:  # noqa: N802 (logging's name)
        if levelName == "INFO":
            return self.info_priority
        return super().mapPriority(levelName)


class _Repository(logging.Filter):
    def __init__(self, name: str):
        super().__init__()
        self.repository = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.repository = self.repository
        return True


def start_logging(
    settings: LogSettings, *, repository: str, foreground: bool, fallback_file: str
) -> str:
    """Route the process's log records for a mount of `repository`; returns where they
    go. A foreground mount writes to stderr; a detached one to the file CVMFS_USYSLOG
    names, else to syslog, else (no syslog socket, as in a container) to fallback_file.
    CVMFS_DEBUGLOG adds a file with the debug messages as well."""
    handlers: list[logging.Handler] = []
    if foreground:
        main: logging.Handler = logging.StreamHandler(sys.stderr)
        where = "stderr"
    elif settings.usyslog:
        main = logging.handlers.RotatingFileHandler(
            settings.usyslog, maxBytes=USYSLOG_MAX_BYTES, backupCount=1
        )
        where = settings.usyslog
    elif _has_syslog(settings):
        main = _SyslogHandler(settings)
        main.setFormatter(logging.Formatter("(%(repository)s) %(message)s"))
        where = destination(settings, fallback_file)
    else:
        main = logging.FileHandler(fallback_file)
        where = fallback_file
    main.setLevel(logging.INFO)
    handlers.append(main)
    if settings.debuglog:
        debug = logging.FileHandler(settings.debuglog)
        debug.setLevel(logging.DEBUG)
        handlers.append(debug)
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handler.addFilter(_Repository(repository))
    level = logging.DEBUG if settings.debuglog else logging.INFO
    logging.basicConfig(level=level, handlers=handlers, force=True)
    return where
