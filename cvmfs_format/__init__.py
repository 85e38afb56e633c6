"""The repository format (docs/FORMAT.md): objects, signed documents, catalogs, history,
the trust rules, and writing catalogs. It imports none of the three programs."""
