"""The publisher's exception hierarchy (a sibling of the client's and the server's)."""

from cvmfs_format.errors import CvmfsError


class BuildError(CvmfsError):
    """Base of cvmbuild's own errors."""


class SourceError(BuildError):
    """Something in the source tree cannot be published as it is."""
