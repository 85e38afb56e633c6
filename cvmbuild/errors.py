"""The publisher's exception hierarchy."""

from repo_server.errors import RepoError


class BuildError(RepoError):
    """Base of cvmbuild's own errors."""


class SourceError(BuildError):
    """Something in the source tree cannot be published as it is."""
