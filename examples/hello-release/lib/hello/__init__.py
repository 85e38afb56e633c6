"""Placeholder library of the quick-start release."""

VERSION = "1.0"
