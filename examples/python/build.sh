#!/bin/sh
# A Python release: pip installs the package into a prefix, cvmbuild publishes it.
#   ./build.sh [PREFIX]
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
prefix="${1:-$here/install}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/pyproject.toml")"

python3 -m pip install --quiet --no-warn-script-location --prefix "$prefix" "$here"

cvmbuild publish "$prefix" --path "/sw/hello-py/$version"
