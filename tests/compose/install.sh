#!/usr/bin/env bash
# What tests/compose needs that pip cannot install into labq's venv: rootful Podman with
# runc, netavark and aardvark-dns (service names), debootstrap for the base image, all
# from Debian's packages; and podman-compose from PyPI (1.6 fixes healthcheck quoting and
# override merging that Debian's 1.0.3 breaks) in a venv of its own.
# Without root or apt it installs nothing and says so: the test then skips, saying why.
set -euo pipefail
cache=${LABQ_CI_CACHE:-/var/cache/labq-ci}
python=${PYTHON:-python3}
export DEBIAN_FRONTEND=noninteractive PATH="$PATH:/usr/sbin:/sbin"

if [ "$(id -u)" != 0 ]; then
  echo "tests/compose: not root, nothing installed (the compose test will skip)"; exit 0
fi
missing=()
for pair in podman:podman runc:runc netavark:/usr/lib/podman/netavark \
            aardvark-dns:/usr/lib/podman/aardvark-dns debootstrap:debootstrap; do
  pkg=${pair%%:*} probe=${pair#*:}
  if [ "${probe#/}" != "$probe" ]; then [ -x "$probe" ] || missing+=("$pkg")
  else command -v "$probe" >/dev/null || missing+=("$pkg"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "tests/compose: no apt-get to install ${missing[*]} (the compose test will skip)"; exit 0
  fi
  echo "tests/compose: installing ${missing[*]} (apt-get)"
  apt-get update -q
  apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
    "${missing[@]}" iptables >/dev/null
fi

if [ ! -x "$cache/podman-compose/bin/podman-compose" ]; then
  echo "tests/compose: installing podman-compose into $cache/podman-compose"
  mkdir -p "$cache"
  rm -rf "$cache/podman-compose"
  "$python" -m venv "$cache/podman-compose"
  "$cache/podman-compose/bin/python" -m pip install --quiet --disable-pip-version-check \
    'podman-compose>=1.6,<1.7'
fi
echo "tests/compose: $(podman --version), $(runc --version | head -1)," \
     "$("$cache/podman-compose/bin/podman-compose" --version 2>/dev/null | head -1)"
