"""A package installed with pip into a prefix and published with cvmbuild."""

__version__ = "1.0"


def main() -> None:
    print(f"hello from a pip build, version {__version__}")
