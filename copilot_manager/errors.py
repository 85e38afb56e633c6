"""The manager's errors: ManagerError for the CLI (one line, exit 1), ApiError for an
HTTP answer chosen on purpose (a status and a message saying what to do)."""

from __future__ import annotations


class ManagerError(Exception):
    """Raised on purpose; the message says what failed and what to do."""


class ApiError(Exception):
    """An HTTP answer: this status, this one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
