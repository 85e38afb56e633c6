"""The client's exception hierarchy: every failure a reader can meet has a type here."""


class ClientError(Exception):
    """Base of every error the client raises on purpose; the CLI prints it in one line."""


class FormatError(ClientError):
    """Bytes that do not follow docs/FORMAT.md (malformed manifest, whitelist, catalog)."""


class VerificationError(ClientError):
    """A signature, hash, expiry or revision check failed: the data must not be used."""


class FetchError(ClientError):
    """An object or file could not be downloaded from any mirror."""


class NotFoundError(ClientError):
    """A path does not exist in the repository revision."""
