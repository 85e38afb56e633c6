"""Repositories on storage: layout, signing, publishing, serving and operations."""
