"""How long web servers and proxies may keep a repository's files (Cache-Control), in one
place for `repo-server serve`, the nginx configuration, S3 uploads, and gc, which keeps
a replaced revision readable for as long as a proxy may still hand out its manifest."""

IMMUTABLE = "public, max-age=31536000, immutable"  # objects never change
SIGNED_DOCUMENT_MAX_AGE_S = 60  # the manifest and whitelist change at every publish
SIGNED_DOCUMENT = f"public, max-age={SIGNED_DOCUMENT_MAX_AGE_S}"
