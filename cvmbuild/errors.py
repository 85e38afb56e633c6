"""The publisher's exception hierarchy (a sibling of the client's and the server's)."""

from cvmfs_format.errors import CvmfsError


class BuildError(CvmfsError):
    """Base of cvmbuild's own errors."""


class SourceError(BuildError):
    """Something in the source tree cannot be published as it is."""


class SourceChanged(SourceError):
    """A file or directory changed between the scan and its read, or while read."""

    def __init__(self, path: str, how: str):
        super().__init__(
            f"{path}: changed while publishing ({how}); publish again once nothing "
            "writes to the tree"
        )
