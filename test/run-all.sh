#!/bin/sh
# make test: every suite in turn, one line each as it ends, then a recap and,
# last, the totals: "N passed, N failed", with ", N skipped" appended when
# anything was skipped. Exit status 1 if anything failed.
#
#     sh test/run-all.sh [--total FILE]
#
# --total FILE: write the totals line to FILE instead of printing it (make
# test prints it after make's own error line; see the test rule of the
# Makefile). make builds the binaries first; run alone, this script uses
# those already in build/.
#
# Suites (output in build/test-NAME.log): unit (ASan+UBSan), SigV4 (the
# signer against published cases and AWS's test suite), the fakes'
# self-tests, end to end (release binary), end to end (ASan+UBSan build of
# the binary). test/count.sh reads each suite's result from its log and exit
# status (the rules are there; in short: a suite that prints no summary, or
# exits non-zero, counts at least 1 failed). E2E_ARGS adds arguments to both
# e2e runs (e.g. "-k sync").
#
# Optional external test data, passed on to the suites when set:
#   APM_INTAKE_SPEC_DIR  the APM intake v2 JSON schemas (elastic/apm-data's
#                        docs/spec/v2); default ../shared/apm-intake-spec/v2
#                        next to the repository if it exists; set but empty:
#                        none. Without them the fake APM server checks
#                        every event's structure only.
#   AWS_SIGV4_TESTSUITE  AWS's SigV4 test suite (botocore's
#                        tests/unit/auth/aws4_testsuite); default (also when
#                        empty) ../shared/aws-sigv4-testsuite if it exists.
#                        Without it the SigV4 checks use their embedded cases
#                        and the suite's tests count as skipped.
# One line says which of them was found.
set -u
cd "$(dirname "$0")/.." || exit 1
total_file=""
case $# in
0) ;;
2) [ "$1" = --total ] && total_file=$2 ;;
esac
if [ $# -ne 0 ] && [ -z "$total_file" ]; then
	echo "usage: sh test/run-all.sh [--total FILE]" >&2
	exit 2
fi
mkdir -p build
[ -n "$total_file" ] && rm -f "$total_file"
pass=0
fail=0
skip=0
recap=""

# The folder $1 as an absolute path, if it is one.
absdir() {
	(cd "$1" 2>/dev/null && pwd)
}

# -- the optional external test data
if [ "${APM_INTAKE_SPEC_DIR+set}" = set ]; then
	export APM_INTAKE_SPEC_DIR
	spec=$APM_INTAKE_SPEC_DIR
else
	spec=../shared/apm-intake-spec/v2
fi
spec_abs=$(absdir "$spec")
for kind in metadata transaction span error metricset; do
	[ -n "$spec_abs" ] && [ ! -f "$spec_abs/$kind.json" ] && spec_abs=""
done
if [ -n "$spec_abs" ]; then
	spec_text=$spec_abs
elif [ "${APM_INTAKE_SPEC_DIR-unset}" = "" ]; then
	spec_text="none (APM_INTAKE_SPEC_DIR is empty; structural checks only)"
elif [ "${APM_INTAKE_SPEC_DIR+set}" = set ] && [ ! -d "$spec" ]; then
	spec_text="none (no folder $spec; structural checks only)"
elif [ "${APM_INTAKE_SPEC_DIR+set}" = set ]; then
	spec_text="none (no schemas in $spec; structural checks only)"
else
	spec_text="none (structural checks only)"
fi
if [ -n "${AWS_SIGV4_TESTSUITE:-}" ]; then
	export AWS_SIGV4_TESTSUITE
	sv4=$AWS_SIGV4_TESTSUITE
else
	sv4=../shared/aws-sigv4-testsuite
fi
sv4_abs=$(absdir "$sv4")
if [ -n "$sv4_abs" ]; then
	sv4_text=$sv4_abs
elif [ -n "${AWS_SIGV4_TESTSUITE:-}" ]; then
	sv4_text="none (no folder $sv4; embedded cases only)"
else
	sv4_text="none (embedded cases only)"
fi
data="test data: APM intake schemas: $spec_text; SigV4 suite: $sv4_text"
echo "$data"

# -- the real Node.js agent (pinned by test/node/package-lock.json)
if [ ! -f test/node/node_modules/elastic-apm-node/package.json ]; then
	if command -v npm >/dev/null 2>&1; then
		echo "installing the Node.js agent: npm ci --prefix test/node"
		npm ci --prefix test/node --no-audit --no-fund --prefer-offline \
			>build/npm.log 2>&1 ||
			echo "warning: npm ci --prefix test/node failed (see build/npm.log)"
	else
		echo "warning: npm is missing: the Node.js agent scenarios will fail" \
			"(Debian: apt-get install nodejs npm)"
	fi
fi
# -- the OpenTelemetry JS SDK (pinned by test/otel/package-lock.json)
if [ ! -f test/otel/node_modules/@opentelemetry/exporter-trace-otlp-proto/package.json ] &&
	command -v npm >/dev/null 2>&1; then
	echo "installing the OpenTelemetry SDK: npm ci --prefix test/otel"
	npm ci --prefix test/otel --no-audit --no-fund --prefer-offline \
		>build/npm-otel.log 2>&1 ||
		echo "warning: npm ci --prefix test/otel failed (see build/npm-otel.log)"
fi

suite() { # name, command...
	name=$1
	shift
	log=build/test-$name.log
	start=$(date +%s)
	"$@" >"$log" 2>&1
	rc=$?
	secs=$(($(date +%s) - start))
	# shellcheck disable=SC2046 # three numbers
	set -- $(sh test/count.sh "$log" "$rc")
	pass=$((pass + $1))
	fail=$((fail + $2))
	skip=$((skip + $3))
	line=$(printf '%-9s %6d passed %4d failed %4d skipped %5ss  %s' \
		"$name" "$1" "$2" "$3" "$secs" "$log")
	[ "$rc" -ne 0 ] && line="$line  (exit $rc)"
	echo "$line"
	recap="$recap
$line"
	if [ "$2" -ne 0 ]; then
		echo "---- $name: failures (from $log)"
		grep -E '^(FAIL|ERROR)|FAIL |Error|error:' "$log" | head -n 40
		tail -n 15 "$log"
		echo "----"
	fi
}

suite unit ./build/unit
suite sigv4 ./build/sigv4
suite sim ./build/sim --quick
suite fake_apm python3 test/fakes/test_fake_apm.py -v
[ -f test/fakes/test_fake_aws.py ] && suite fake_aws python3 test/fakes/test_fake_aws.py -v
# shellcheck disable=SC2086 # E2E_ARGS: one word per argument
suite e2e python3 test/e2e/e2e.py --binary ./apm-ext ${E2E_ARGS:-}
# shellcheck disable=SC2086
suite e2e_asan env ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	python3 test/e2e/e2e.py --binary ./build/apm-ext-asan ${E2E_ARGS:-}

total="$pass passed, $fail failed"
[ "$skip" -ne 0 ] && total="$total, $skip skipped"
echo
echo "make test:$recap"
echo "$data"
if [ -n "$total_file" ]; then
	echo "$total" >"$total_file"
else
	echo "$total"
fi
[ "$fail" -eq 0 ]
