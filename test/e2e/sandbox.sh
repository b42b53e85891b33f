#!/bin/sh
# The bare-sandbox test of the layer zips (both arches): see test/e2e/sandbox.py.
#
#   sh test/e2e/sandbox.sh [sandbox.py options: --arch, --qemu auto|binfmt|copy, -k, --keep]
#
# Needs root (chroot), python3 and openssl (test CA), and for arm64
# qemu-user-static; as root it installs what is missing with apt-get. Builds
# the zips with layer/build.sh when they are missing or older than the sources.
set -eu
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
	echo "FAIL setup: the sandbox test needs root (chroot)"
	echo "0 passed, 1 failed"
	exit 1
fi
missing=""
[ -x /usr/bin/qemu-aarch64-static ] || missing="$missing qemu-user-static"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v unshare >/dev/null 2>&1 || missing="$missing util-linux"
if [ -n "$missing" ]; then
	echo "sandbox: installing:$missing"
	log=${TMPDIR:-/tmp}/apm-ext-sandbox-deps.log
	# shellcheck disable=SC2086 # one word per package
	{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $missing; } \
		>"$log" 2>&1 || { tail -20 "$log"; echo "FAIL setup: could not install$missing"
		echo "0 passed, 1 failed"; exit 1; }
fi
stale=0
for z in layer/apm-ext-x86_64.zip layer/apm-ext-arm64.zip; do
	for src in apm-ext.c apm-ext.h Makefile layer/build.sh; do
		if ! [ -f "$z" ] || [ -n "$(find "$src" -newer "$z")" ]; then stale=1; fi
	done
done
if [ $stale = 1 ]; then
	sh layer/build.sh || { echo "FAIL setup: layer/build.sh failed"; echo "0 passed, 1 failed"; exit 1; }
fi
exec python3 test/e2e/sandbox.py "$@"
