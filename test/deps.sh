#!/bin/sh
# Install what `make` needs to build ./apm-ext (Debian): musl-gcc and a static
# BearSSL. As root it runs apt-get; otherwise it says exactly what to run.
set -eu
missing=""
command -v musl-gcc >/dev/null 2>&1 || missing="$missing musl-tools"
[ -f /usr/lib/x86_64-linux-gnu/libbearssl.a ] || missing="$missing libbearssl-dev"
command -v cc >/dev/null 2>&1 || missing="$missing gcc"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	echo "installing:$missing"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
else
	echo "apm-ext needs:$missing" >&2
	echo "run: sudo apt-get install$missing" >&2
	exit 1
fi
