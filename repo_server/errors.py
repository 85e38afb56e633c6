"""The server side's exception hierarchy (a sibling of the client's and the format's)."""

from cvmfs_format.errors import CvmfsError


class RepoError(CvmfsError):
    """Base of the errors repo-server raises on purpose."""


class KeyError_(RepoError):
    """A key file is missing, unreadable or of the wrong kind."""


class ObjectMissing(RepoError):
    """An object the verified chain names is not in the repository's storage."""
