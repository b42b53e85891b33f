#!/bin/sh
# fuzz.sh [SECONDS [TARGET...]] - build the libFuzzer targets of test/fuzz/
# into build/ and run each for SECONDS (default 60) from a scratch copy of
# its seed corpus test/fuzz/corpus/<target>/, so runs add nothing to the
# repository. One summary line per target; exit status 1 if a target failed
# to build or crashed (its input and log are kept in
# build/fuzz-artifacts/<target>/).
#
# Needs clang with libFuzzer, and libbearssl-dev; as root it installs them
# with apt-get when missing. Environment: CC_FUZZ (default clang),
# BEARSSL_A (the static BearSSL library).
set -u
cd "$(dirname "$0")/../.." || exit 1

SECS=${1:-60}
[ $# -gt 0 ] && shift
TARGETS=${*:-"fuzz_http_request fuzz_http_response fuzz_chunked fuzz_json \
fuzz_url_settings fuzz_telemetry"}
CC_FUZZ=${CC_FUZZ:-clang}
BEARSSL_A=${BEARSSL_A:-/usr/lib/$(uname -m)-linux-gnu/libbearssl.a}
# undefined behaviour aborts (is a crash) rather than being printed
FLAGS="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
-D_GNU_SOURCE -DAPM_EXT_TEST -I/usr/include/bearssl -I."

work=$(mktemp -d "${TMPDIR:-/tmp}/apm-fuzz.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM

# libFuzzer is there when a trivial target links.
have_libfuzzer() {
	cat > "$work/probe.c" <<-'EOF'
	int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n)
	{ (void)d; (void)n; return 0; }
	EOF
	command -v "$CC_FUZZ" >/dev/null 2>&1 &&
	    "$CC_FUZZ" -fsanitize=fuzzer "$work/probe.c" -o "$work/probe" \
	    >/dev/null 2>&1
}

install_deps() {
	if [ "$(id -u)" != 0 ]; then
		echo "fuzz.sh: needs clang with libFuzzer and libbearssl-dev;" \
		    "run as root to install them" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq clang libbearssl-dev >/dev/null
	# libFuzzer ships in libclang-rt-N-dev (Debian 12 on),
	# libclang-common-N-dev before
	if ! have_libfuzzer; then
		v=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' |
		    head -n 1)
		apt-get install -y -qq "libclang-rt-$v-dev" >/dev/null 2>&1 ||
		    apt-get install -y -qq "libclang-common-$v-dev" >/dev/null 2>&1
	fi
}

if ! have_libfuzzer || [ ! -f "$BEARSSL_A" ]; then
	install_deps
fi
if ! have_libfuzzer; then
	echo "fuzz.sh: $CC_FUZZ cannot link -fsanitize=fuzzer" >&2
	exit 1
fi

mkdir -p build
status=0
built=""
for t in $TARGETS; do
	# shellcheck disable=SC2086
	if $CC_FUZZ $FLAGS "test/fuzz/$t.c" apm-ext.c "$BEARSSL_A" -o "build/$t" \
	    2> "$work/$t.build"; then
		built="$built $t"
	else
		echo "$t: BUILD FAILED"
		head -n 20 "$work/$t.build"
		status=1
	fi
done

for t in $built; do
	art="build/fuzz-artifacts/$t"
	rm -rf "$art"
	mkdir -p "$art" "$work/$t"
	cp test/fuzz/corpus/"$t"/* "$work/$t/" 2>/dev/null
	"./build/$t" "$work/$t" -max_total_time="$SECS" -max_len=65536 \
	    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	    -artifact_prefix="$art/" > "$work/$t.log" 2>&1
	rc=$?
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
	cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1 | cut -d' ' -f2)
	ft=$(grep -o 'ft: [0-9]*' "$work/$t.log" | tail -n 1 | cut -d' ' -f2)
	corp=$(find "$work/$t" -type f | wc -l)
	if [ "$rc" -eq 0 ]; then
		echo "$t: ok, ${runs:-?} runs in ${SECS}s, cov ${cov:-?}," \
		    "ft ${ft:-?}, corpus $corp"
	else
		cp "$work/$t.log" "$art/log.txt"
		crash=""
		for f in "$art"/crash-* "$art"/leak-* "$art"/timeout-* \
		    "$art"/oom-*; do
			[ -f "$f" ] && crash=$f && break
		done
		why=$(grep -m 1 -E 'invariant failed|ERROR: AddressSanitizer|'`
		    `'runtime error|ERROR: libFuzzer' "$work/$t.log")
		echo "$t: CRASH after ${runs:-?} runs, cov ${cov:-?}:" \
		    "${crash:-see $art/log.txt}"
		echo "    $why"
		status=1
	fi
done
exit $status
