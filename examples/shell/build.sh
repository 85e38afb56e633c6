#!/bin/sh
# A release assembled by a shell script and published with cvmbuild.
#   ./build.sh 1.0 [PREFIX]
set -eu
version="${1:-1.0}"
prefix="${2:-$PWD/install}"
here="$(cd "$(dirname "$0")" && pwd)"

mkdir -p "$prefix/bin" "$prefix/share/hello"
sed "s/@VERSION@/$version/" "$here/hello.sh.in" > "$prefix/bin/hello"
chmod 755 "$prefix/bin/hello"
echo "hello $version, assembled on $(uname -m)" > "$prefix/share/hello/README"

cvmbuild publish "$prefix" --path "/sw/hello-shell/$version" --tag "hello-shell-$version"
