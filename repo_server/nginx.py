"""nginx in front of a repository directory: the configuration docs/OPERATING.md gives,
as text, for the tests and benchmarks that run a real nginx (and a test keeps the
documented block equal to it).
"""

from __future__ import annotations

from repo_server.http_caching import IMMUTABLE, SIGNED_DOCUMENT

# Objects never change: cache them for a year. The manifest and whitelist change at
# every publish: a minute. Nothing else in the directory (.lock, txn/) is served.
REPOSITORY_LOCATIONS = (
    f'location = /manifest  {{ add_header Cache-Control "{SIGNED_DOCUMENT}"; }}',
    f'location = /whitelist {{ add_header Cache-Control "{SIGNED_DOCUMENT}"; }}',
    f'location /data/       {{ add_header Cache-Control "{IMMUTABLE}"; }}',
)
NOTHING_ELSE = (
    "location /            { return 404; }   # .lock and txn/ are not part of the repository"
)


def repository_server(
    root: str, listen: str, *, listings: bool = False, access_log: str | None = None
) -> str:
    """The server block that serves a repository (or a mirror of one) as static files.

    listings=True turns on directory listings instead of the final 404, for tools that
    mirror by following links (wget --mirror); a client needs none.
    """
    lines = [f"listen {listen};"]
    if access_log is not None:
        lines.append(f"access_log {access_log};")
    lines += [f"root {root};", "default_type application/octet-stream;"]
    lines += ["autoindex on;"] if listings else []
    lines += REPOSITORY_LOCATIONS
    lines += [] if listings else [NOTHING_ELSE]
    return "server {\n" + "".join(f"    {line}\n" for line in lines) + "}\n"


def standalone(
    work: str, servers: list[str], *, workers: int = 1, as_root: bool = False, http: str = ""
) -> str:
    """A whole nginx.conf that runs in the foreground (`nginx -c CONF -p WORK`), keeping
    its pid, logs and temporary files under work. as_root lets the workers read files
    only root may read; http holds extra lines for the http block (a log_format)."""
    temp = "".join(
        f"    {kind}_temp_path {work}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    blocks = "".join("    " + block.replace("\n", "\n    ").rstrip() + "\n" for block in servers)
    extra = "".join(f"    {line}\n" for line in http.splitlines() if line.strip())
    return (
        "daemon off;\n"
        "master_process on;\n"
        f"worker_processes {workers};\n"
        + ("user root;\n" if as_root else "")
        + f"pid {work}/nginx.pid;\n"
        f"error_log {work}/error.log;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"    access_log {work}/access.log;\n"
        + extra
        + temp
        + "    sendfile on;\n"
        + blocks
        + "}\n"
    )
