#!/bin/sh
# count.sh LOG RC - what one test suite or CI step passed, failed and skipped,
# from its output (LOG) and its exit status (RC). Prints "PASSED FAILED
# SKIPPED" (three numbers). Used by test/run-all.sh (make test) and .ci/run,
# so both count alike.
#
# The result is read from the LAST of these lines in LOG:
#  - a summary line: "N passed, N failed" or "N passed, N failed, N skipped",
#    at the start of the line or after one "word: " prefix ("sandbox: 3
#    passed, 0 failed"); anything may follow the numbers ("... (12s)");
#  - Python unittest's result, the line after "Ran N tests in ...": "OK",
#    "OK (skipped=2)", "FAILED (failures=1, errors=2, skipped=3)" or "NO TESTS
#    RAN". failed = failures + errors + unexpected successes, skipped =
#    skipped, passed = ran - failed - skipped (expected failures pass).
# Then:
#  - no such line: "0 1 0", whatever the exit status. A suite that crashed
#    before its summary failed; so did one that exited 0 without a summary
#    (it stopped early, or does not count what it checks). Steps that print
#    no summary by design (CI gates: layer/build.sh --verify, test/fuzz/fuzz.sh,
#    test/bench/bench.py) are run by .ci/run through its `gate` function, which
#    adds "1 passed, 0 failed" or "0 passed, 1 failed" for their exit status;
#  - a summary but a non-zero exit status with 0 failed (a crash after the
#    summary, a sanitizer report at exit): failed = 1;
#  - failures in the summary count even if the exit status is 0.
# A missing or unreadable LOG is a log without a summary.
log=${1:-}
rc=${2:-1}
case $rc in '' | *[!0-9]*) rc=1 ;; esac
[ -n "$log" ] && [ -r "$log" ] || log=/dev/null
awk -v rc="$rc" '
# The number after "KEY=" in a unittest result, 0 when absent. KEY must follow
# "(" or ",", so "failures" does not match "expected failures".
function num(s, key) {
	if (!match(s, "[(,] *" key "=[0-9]+"))
		return 0
	s = substr(s, RSTART, RLENGTH)
	sub(/.*=/, "", s)
	return s + 0
}
/^([A-Za-z0-9_.-]+: )?[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?([^0-9A-Za-z]|$)/ {
	s = $0
	sub(/^[A-Za-z0-9_.-]+: /, "", s)
	n = split(s, w, /[ ,]+/)  # 3 passed 1 failed [2 skipped] ...
	p = w[1] + 0
	f = w[3] + 0
	k = (n >= 6 && w[6] ~ /^skipped/) ? w[5] + 0 : 0
	found = 1
	unit = 0
	next
}
/^Ran [0-9]+ tests? in / {
	ran = $2 + 0
	unit = 1
	next
}
unit && /^(OK|FAILED|NO TESTS RAN)/ {
	f = num($0, "failures") + num($0, "errors") + num($0, "unexpected successes")
	k = num($0, "skipped")
	p = ran - f - k
	if (p < 0)
		p = 0
	found = 1
	unit = 0
	next
}
END {
	if (!found)
		print "0 1 0"
	else
		print p, (rc != 0 && f == 0 ? 1 : f), k
}' "$log"
