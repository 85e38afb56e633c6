"""The client's own errors; the format's (FormatError, VerificationError, NotFoundError)
are their siblings under cvmfs_format.errors.CvmfsError."""

from cvmfs_format.errors import CvmfsError


class ClientError(CvmfsError):
    """Base of the errors the client raises on purpose."""


class FetchError(ClientError):
    """An object or file could not be downloaded from any mirror."""
