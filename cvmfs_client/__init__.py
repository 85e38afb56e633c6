"""Read side of the repository format: verification, catalogs, fetching, cache, FUSE.

Carried inside the appliance, so it depends on nothing from cvmbuild or repo_server.
"""
