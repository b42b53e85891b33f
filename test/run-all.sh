#!/bin/sh
# make test: every suite in turn, each must end with "N passed, N failed".
# Prints a line per suite and, last, the totals as "N passed, N failed".
# Suites: unit (ASan+UBSan), SigV4 vs AWS's suite, the fakes' self-tests,
# end to end (release binary), end to end (ASan+UBSan build of the binary).
# E2E_ARGS adds arguments to both e2e runs (e.g. "-k sync").
set -u
cd "$(dirname "$0")/.."
mkdir -p build
pass=0
fail=0
summary=""

suite() { # name, command...
	name=$1
	shift
	log="build/test-$name.log"
	start=$(date +%s)
	"$@" >"$log" 2>&1
	rc=$?
	last=$(grep -E '^([A-Za-z]+: )?[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
	p=$(echo "$last" | sed -n 's/.*\b\([0-9][0-9]*\) passed.*/\1/p')
	f=$(echo "$last" | sed -n 's/.* \([0-9][0-9]*\) failed.*/\1/p')
	if [ -z "$p" ]; then # a suite that crashed before its summary
		p=0
		f=1
	elif [ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then
		f=1
	fi
	pass=$((pass + p))
	fail=$((fail + f))
	secs=$(( $(date +%s) - start ))
	line=$(printf '%-14s %6s passed %4s failed  (%ss, log: %s)' "$name" "$p" "$f" "$secs" "$log")
	echo "$line"
	summary="$summary
$line"
	if [ "$f" -ne 0 ]; then
		echo "---- $name: failures (from $log)"
		grep -E '^FAIL|FAIL |Error|error:' "$log" | head -n 40
		tail -n 15 "$log"
		echo "----"
	fi
}

# A runner for python unittest files: prints "N passed, N failed".
pyunit() {
	python3 "$1" 2>&1 | tee /dev/stderr | awk '
		/^Ran [0-9]+ test/ { ran = $2 }
		/^FAILED/ { n = 0; if (match($0, /failures=[0-9]+/)) n += substr($0, RSTART+9, RLENGTH-9);
		            if (match($0, /errors=[0-9]+/)) n += substr($0, RSTART+7, RLENGTH-7); failed = n }
		END { printf "%d passed, %d failed\n", ran - failed, failed; exit failed != 0 }'
}

[ -x test/node/node_modules/.bin/../elastic-apm-node/start.js ] ||
	[ -d test/node/node_modules/elastic-apm-node ] ||
	npm ci --prefix test/node --no-audit --no-fund >build/npm.log 2>&1 ||
	echo "warning: npm ci --prefix test/node failed (see build/npm.log)"

suite unit ./build/unit
suite sigv4 ./build/sigv4
suite fake_apm pyunit test/test_fake_apm.py
[ -f test/test_fake_aws.py ] && suite fake_aws pyunit test/test_fake_aws.py
suite e2e python3 test/e2e.py --binary ./apm-ext ${E2E_ARGS:-}
suite e2e_asan env ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	python3 test/e2e.py --binary ./build/apm-ext-asan ${E2E_ARGS:-}

echo
echo "make test:$summary"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
