"""The server side's exception hierarchy."""

from cvmfs_client.errors import ClientError


class RepoError(ClientError):
    """Base of the errors repo-server and the publisher raise on purpose."""


class KeyError_(RepoError):
    """A key file is missing, unreadable or of the wrong kind."""


class LockTimeout(RepoError):
    """Another publish holds the repository lock."""
