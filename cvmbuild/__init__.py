"""Publishing build trees into repositories, and building the thin appliance."""

__version__ = "0.1.0"
