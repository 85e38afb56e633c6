"""The root of every error the project raises on purpose, and the format's own errors.

The programs' errors (ClientError, RepoError, BuildError) are siblings of the format's
under CvmfsError, which the command lines turn into one line that says what to do.
"""


class CvmfsError(Exception):
    """Base of every error raised on purpose; the CLIs print it in one line."""


class FormatError(CvmfsError):
    """Bytes that do not follow docs/FORMAT.md (malformed manifest, whitelist, catalog)."""


class VerificationError(CvmfsError):
    """A signature, hash, size, name, expiry or revision check failed: do not use the data."""


class NotFoundError(CvmfsError):
    """A path, revision or tag does not exist in the repository."""


class PathConflict(CvmfsError):
    """A publish cannot be grafted where it was asked to go (a file is in the way)."""
