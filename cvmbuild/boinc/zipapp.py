"""Build the wrapper as one Python zipapp (`cvm_vmwrapper_<version>.pyz`), the BOINC
app version's main program: the cvmbuild.boinc package, an empty cvmbuild/__init__.py
and a __main__.py, with fixed timestamps and sorted entries, so the same sources give
the same bytes (a BOINC file's name must always mean the same content).
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = b"import sys\n\nfrom cvmbuild.boinc.wrapper import main\n\nsys.exit(main(sys.argv[1:]))\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def zipapp_entries() -> dict[str, bytes]:
    """Archive name -> content of every file the zipapp holds."""
    package = Path(__file__).parent
    entries = {"__main__.py": MAIN, "cvmbuild/__init__.py": b""}
    for source in package.glob("*.py"):
        entries[f"cvmbuild/boinc/{source.name}"] = source.read_bytes()
    return entries


def build_zipapp(dest: Path) -> Path:
    """Write the zipapp to `dest` (a file path), executable; returns `dest`."""
    partial = dest.with_name(dest.name + ".part")
    with open(partial, "wb") as file:
        file.write(SHEBANG)
        with zipfile.ZipFile(file, "w") as archive:
            for name, data in sorted(zipapp_entries().items()):
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, data)
    partial.chmod(0o755)
    os.replace(partial, dest)
    return dest
