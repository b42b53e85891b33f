#!/bin/sh
# Build the two Lambda layer zips (run by `make layer`):
#
#   build/x86_64/apm-lambda-extension    static musl binary, x86_64
#   build/aarch64/apm-lambda-extension   static musl binary, arm64 (cross-built)
#   layer/apm-ext-x86_64.zip             each zip holds exactly
#   layer/apm-ext-arm64.zip              extensions/apm-lambda-extension (0755)
#
# Lambda unpacks a layer into /opt and starts every file in /opt/extensions, so
# the zip holds that one path and nothing else (no directory entries).
#
# Reproducible: same sources and toolchain => same bytes. The compiler flags
# come from the Makefile (CFLAGS_REL, LDFLAGS_REL); the file's mtime is fixed
# (SOURCE_DATE_EPOCH, default 1980-01-01T00:00:00Z, the earliest DOS time),
# zip runs with TZ=UTC, -X (no uid/gid or extra timestamps), -D (no directory
# entries), one file, fixed mode; umask 022.
#
#   sh layer/build.sh            build both binaries and zips
#   sh layer/build.sh --verify   ...then rebuild from scratch in build/verify/
#                                and fail unless both zips are byte-identical
#
# Needs an x86_64 Debian/Ubuntu host with: musl-tools libbearssl-dev zip
# gcc-aarch64-linux-gnu musl-dev:arm64 libbearssl-dev:arm64. Run as root it
# installs what is missing with apt-get; otherwise it prints the command.
set -eu
umask 022
export LC_ALL=C TZ=UTC

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

MAX_BYTES=262144                       # 256 KiB per stripped binary
SDE=${SOURCE_DATE_EPOCH:-315532800}    # 1980-01-01T00:00:00Z
[ "$SDE" -ge 315532800 ] || SDE=315532800
MUSL_CC=${MUSL_CC:-musl-gcc}
CROSS_CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
BEARSSL_X86=${BEARSSL_X86:-/usr/lib/x86_64-linux-gnu/libbearssl.a}
BEARSSL_ARM=${BEARSSL_ARM:-/usr/lib/aarch64-linux-gnu/libbearssl.a}
MUSL_SPECS_X86=/usr/lib/x86_64-linux-musl/musl-gcc.specs
MUSL_LIBC_ARM=/usr/lib/aarch64-linux-musl/libc.a
NAME=apm-lambda-extension

die() { echo "layer: $*" >&2; exit 1; }

VERIFY=0
case "${1:-}" in
--verify) VERIFY=1 ;;
"") ;;
*) die "usage: sh layer/build.sh [--verify]" ;;
esac

[ "$(uname -m)" = x86_64 ] || die "this script cross-builds from an x86_64 host (found $(uname -m))"

# ---------------------------------------------------------------- dependencies

missing=""
arm_missing=0
command -v "$MUSL_CC" >/dev/null 2>&1 || missing="$missing musl-tools"
[ -f "$BEARSSL_X86" ] || missing="$missing libbearssl-dev"
command -v zip >/dev/null 2>&1 || missing="$missing zip"
command -v unzip >/dev/null 2>&1 || missing="$missing unzip"
command -v "$CROSS_CC" >/dev/null 2>&1 || missing="$missing gcc-aarch64-linux-gnu"
[ -f "$MUSL_LIBC_ARM" ] || { missing="$missing musl-dev:arm64"; arm_missing=1; }
[ -f "$BEARSSL_ARM" ] || { missing="$missing libbearssl-dev:arm64"; arm_missing=1; }
if [ -n "$missing" ]; then
	add_arch=""
	[ $arm_missing = 1 ] && add_arch="dpkg --add-architecture arm64 && "
	cmd="${add_arch}apt-get update && apt-get install -y$missing"
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "layer: installing:$missing"
		log=${TMPDIR:-/tmp}/apm-ext-layer-deps.log
		DEBIAN_FRONTEND=noninteractive sh -c "$cmd" >"$log" 2>&1 ||
			{ tail -20 "$log" >&2; die "could not install:$missing (log: $log)"; }
	else
		die "missing:$missing; install them as root with: $cmd"
	fi
fi
[ -f "$MUSL_SPECS_X86" ] || die "$MUSL_SPECS_X86 not found (package musl-dev)"

# The release flags, read from the Makefile so there is one place to change them.
# shellcheck disable=SC2016 # $($*) is make's, not the shell's
mkvar() { make -s --no-print-directory -f "$ROOT/Makefile" --eval 'print-%: ; @echo $($*)' "print-$1"; }
CFLAGS_REL=$(mkvar CFLAGS_REL)
LDFLAGS_REL=$(mkvar LDFLAGS_REL)
POSTLINK=$(mkvar POSTLINK)
CROSS_OBJCOPY=${CROSS_OBJCOPY:-aarch64-linux-gnu-objcopy}
if [ -z "$CFLAGS_REL" ] || [ -z "$LDFLAGS_REL" ]; then
	die "cannot read CFLAGS_REL/LDFLAGS_REL from the Makefile"
fi

# ---------------------------------------------------------------- build

# build_all OUTDIR: both binaries in OUTDIR/<arch>/, zips in OUTDIR/zip/
build_all() {
	out=$1
	rm -rf "$out/x86_64" "$out/aarch64" "$out/zip" "$out/stage"
	mkdir -p "$out/x86_64" "$out/aarch64" "$out/zip"

	# Debian's musl-gcc.specs with every x86_64 turned into aarch64 (it is
	# what musl-dev:arm64 ships as /usr/lib/aarch64-linux-musl/musl-gcc.specs).
	sed 's/x86_64/aarch64/g' "$MUSL_SPECS_X86" >"$out/aarch64/musl-gcc.specs"

	# Relative source path, fixed flags: nothing of the build machine in the output.
	# shellcheck disable=SC2086 # the flag lists are meant to split
	$MUSL_CC $CFLAGS_REL -o "$out/x86_64/$NAME" apm-ext.c "$BEARSSL_X86" $LDFLAGS_REL
	# shellcheck disable=SC2086
	$CROSS_CC -specs="$out/aarch64/musl-gcc.specs" $CFLAGS_REL -o "$out/aarch64/$NAME" \
		apm-ext.c "$BEARSSL_ARM" $LDFLAGS_REL
	# shellcheck disable=SC2086
	objcopy $POSTLINK "$out/x86_64/$NAME"
	# shellcheck disable=SC2086
	$CROSS_OBJCOPY $POSTLINK "$out/aarch64/$NAME"

	for arch in x86_64 aarch64; do
		bin="$out/$arch/$NAME"
		size=$(stat -c %s "$bin")
		[ "$size" -le $MAX_BYTES ] || die "$bin is $size bytes, over the $MAX_BYTES-byte limit"
		check_elf "$bin" "$arch"
		zarch=$arch
		[ "$arch" = aarch64 ] && zarch=arm64
		stage="$out/stage/$zarch"
		mkdir -p "$stage/extensions"
		cp "$bin" "$stage/extensions/$NAME"
		chmod 0755 "$stage/extensions" "$stage/extensions/$NAME"
		touch -d "@$SDE" "$stage/extensions/$NAME" "$stage/extensions"
		(cd "$stage" && zip -q -X -D -9 "../../zip/apm-ext-$zarch.zip" "extensions/$NAME")
		check_zip "$out/zip/apm-ext-$zarch.zip"
	done
}

# check_elf FILE ARCH: a static, stripped ELF for ARCH (no interpreter, no symbols).
check_elf() {
	info=$(file -b "$1" 2>/dev/null || true)
	case "$2" in
	x86_64) want="x86-64" ;;
	aarch64) want="aarch64" ;;
	esac
	if [ -n "$info" ]; then
		case "$info" in
		*"$want"*statically\ linked*stripped*) ;;
		*) die "$1 is not a static stripped $2 ELF: $info" ;;
		esac
	fi
}

# check_zip ZIP: exactly one entry, extensions/apm-lambda-extension, mode 0755.
check_zip() {
	listing=$(unzip -Z "$1" | sed -n '/^-/p')
	n=$(printf '%s\n' "$listing" | grep -c .)
	[ "$n" = 1 ] || die "$1 holds $n entries, want 1: $listing"
	case "$listing" in
	"-rwxr-xr-x "*" extensions/$NAME") ;;
	*) die "$1: unexpected entry: $listing" ;;
	esac
}

build_all build
cp build/zip/apm-ext-x86_64.zip build/zip/apm-ext-arm64.zip layer/

for arch in x86_64 aarch64; do
	printf 'binary  build/%s/%s  %d bytes (limit %d)\n' "$arch" "$NAME" \
		"$(stat -c %s "build/$arch/$NAME")" $MAX_BYTES
done
for z in layer/apm-ext-x86_64.zip layer/apm-ext-arm64.zip; do
	printf 'zip     %s  %d bytes  sha256 %s\n' "$z" "$(stat -c %s "$z")" \
		"$(sha256sum "$z" | cut -d' ' -f1)"
done

if [ $VERIFY = 1 ]; then
	build_all build/verify
	for z in apm-ext-x86_64.zip apm-ext-arm64.zip; do
		a=$(sha256sum "layer/$z" | cut -d' ' -f1)
		b=$(sha256sum "build/verify/zip/$z" | cut -d' ' -f1)
		[ "$a" = "$b" ] || die "$z is not reproducible: $a vs $b (build/verify/zip/$z)"
		echo "reproducible: $z ($a)"
	done
	rm -rf build/verify
fi
