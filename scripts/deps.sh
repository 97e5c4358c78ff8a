#!/usr/bin/env bash
# Install every host dependency of CZone on Debian 12, idempotently.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

PKGS=(
	# kernel
	build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
	linux-source-6.12 git rsync
	# qemu
	meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev
	libslirp-dev libfdt-dev zlib1g-dev dpkg-dev python3-venv
	# firmware for -L (the dfsg tarball has none)
	seabios ipxe-qemu qemu-system-data
	# guest image
	debootstrap squashfs-tools dropbear-bin busybox-static openssh-client
	# device tests (vq_harden.py disables RAM discards the way vfio does)
	gdb
	# static in-guest tools
	libc6-dev libcap-dev
	# the libvirt backend: the tests start a private libvirtd; libvirt-dev
	# builds libvirt-python
	libvirt-daemon-system libvirt-dev
	# a "remote" libvirt host in the tests: qemu+ssh to an sshd the test starts
	openssh-server netcat-openbsd
)

if [ "$(id -u)" -ne 0 ]; then
	echo "deps.sh: run as root (apt-get needs it)" >&2
	exit 1
fi

# apt-get source qemu needs a deb-src entry.
src=/etc/apt/sources.list.d/czone-deb-src.list
if ! grep -rqs '^deb-src .*bookworm ' /etc/apt/sources.list /etc/apt/sources.list.d/ &&
   ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/; then
	echo "deb-src http://deb.debian.org/debian bookworm main" > "$src"
	echo "deb-src http://deb.debian.org/debian-security bookworm-security main" >> "$src"
	rm -f /var/lib/czone-apt-updated
fi

missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
stamp=/var/lib/czone-apt-updated
if [ ${#missing[@]} -gt 0 ] || [ ! -e "$stamp" ]; then
	apt-get update -qq
	touch "$stamp"
fi
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	# Installing starts no service (sshd on port 22, the system libvirtd):
	# the tests start their own, on 127.0.0.1 or a private socket.
	policy=/usr/sbin/policy-rc.d
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' > "$policy"
		chmod 755 "$policy"
		trap 'rm -f "$policy"' EXIT
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
	echo "deps: Debian packages already installed"
fi

venv=$here/.venv
if [ ! -x "$venv/bin/python" ]; then
	python3 -m venv "$venv"
fi
# Reinstall only when the package metadata changed.
extras=dev,bench,libvirt
want=$( (cat "$here/pyproject.toml"; echo "$extras") | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.czone-installed" 2>/dev/null)" != "$want" ]; then
	"$venv/bin/pip" install -q --disable-pip-version-check -e "$here[$extras]"
	echo "$want" > "$venv/.czone-installed"
	echo "deps: Python package installed in $venv"
else
	echo "deps: Python package up to date in $venv"
fi
