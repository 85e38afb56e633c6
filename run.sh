#!/usr/bin/env bash
# The project's two entry points on a fresh Debian 12 machine (as root, or with sudo):
#   ./run.sh demo   install everything, then run the main job on the embedded default
#   ./run.sh test   install everything, then run the tests (tox: ruff, mypy, pytest)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

SYSTEM_PACKAGES=(
  python3 python3-venv python3-dev build-essential pkg-config
  libcurl4-openssl-dev libssl-dev curl ca-certificates
  fuse libfuse2 libfuse3-3 nginx squid borgbackup restic cmake
  mmdebstrap squashfs-tools dosfstools mtools syslinux syslinux-common
  syslinux-efi qemu-utils qemu-system-x86 ovmf
  boinc-client libboinc-app7 redis-server autofs systemd
  cloud-image-utils genisoimage e2fsprogs
)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_system() {
  local missing=()
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_python() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[test]" tox==4.67.13
}

demo() {
  export PATH="$here/.venv/bin:$PATH"
  work="$(mktemp -d)"
  export CVMBUILD_CACHE_DIR="$work/statcache"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  set -x
  repo-server init "$work/repo" --name demo.example.org
  cvmbuild publish examples/hello-release --repo "$work/repo" --path /sw/hello/1.0 --tag v1.0 --message "quick start"
  repo-server serve "$work/repo" --listen "127.0.0.1:$port" &
  server=$!
  { set +x; } 2>/dev/null
  trap 'mountpoint -q "$work/mnt" && umount "$work/mnt"; kill $server 2>/dev/null; rm -rf "$work"' EXIT
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  key="$work/repo.keys/demo.example.org.pub"
  set -x
  cvmfs-client ls -l "http://127.0.0.1:$port" /sw/hello/1.0/bin --key "$key"
  cvmfs-client cat "http://127.0.0.1:$port" /sw/hello/1.0/bin/hello.py --key "$key" | python3 -
  mkdir -p "$work/mnt"
  cvmfs-client mount "http://127.0.0.1:$port" "$work/mnt" --key "$key" --cache-dir "$work/cache"
  python3 "$work/mnt/sw/hello/1.0/bin/hello.py"
  cvmfs-client umount "$work/mnt"
  repo-server check "$work/repo"
  repo-server info "$work/repo"
  { set +x; } 2>/dev/null
  echo "demo ok: published, served on 127.0.0.1:$port, read back verified, mounted and run"
}

case "${1:-}" in
  demo) install_system; install_python; demo ;;
  test) shift; install_system; install_python; exec .venv/bin/tox -e py311 -- "$@" ;;
  *) echo "usage: $0 demo|test [pytest args]" >&2; exit 2 ;;
esac
