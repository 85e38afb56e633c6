"""The server side's exception hierarchy (a sibling of the client's and the format's)."""

from cvmfs_format.errors import CvmfsError


class RepoError(CvmfsError):
    """Base of the errors repo-server raises on purpose."""


class KeyError_(RepoError):
    """A key file is missing, unreadable or of the wrong kind."""


class ObjectMissing(RepoError):
    """An object the verified chain names is not in the repository's storage."""


class Refused(RepoError):
    """A change that would do more than was asked (remove paths, move a tag) or nothing
    at all; the message names what, and the option that allows it."""


class UnknownRevision(RepoError):
    """A revision number or tag the history does not hold."""
