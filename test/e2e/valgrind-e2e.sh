#!/bin/sh
# The end-to-end suite once under valgrind (memcheck) on the real static
# binary: any invalid read/write, use of uninitialised memory or leak of a
# definitely-lost block fails the run (--error-exitcode), and every report is
# kept in build/valgrind/. Timing-sensitive scenarios run with a larger
# forwarder timeout budget through the wrapper's slower start-up; the TLS and
# node agent scenarios are included.
set -eu
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || {
	echo "FAIL setup: valgrind missing (apt-get install valgrind)"
	echo "0 passed, 1 failed"
	exit 1
}
dir=build/valgrind
rm -rf "$dir"
mkdir -p "$dir/bin"
cp apm-ext "$dir/bin/apm-lambda-extension"
cat >"$dir/wrap" <<WRAP
#!/bin/sh
exec valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
	--log-file=$PWD/$dir/vg.%p.log "$PWD/$dir/bin/apm-lambda-extension" "\$@"
WRAP
chmod 755 "$dir/wrap"
set +e
APM_E2E_UNDER_VALGRIND=1 python3 test/e2e/e2e.py --binary "$dir/wrap" "$@"
rc=$?
set -e
bad=0
for f in "$dir"/vg.*.log; do
	[ -s "$f" ] || continue
	echo "valgrind report $f:"
	head -n 40 "$f"
	bad=$((bad + 1))
done
if [ "$bad" -ne 0 ]; then
	echo "valgrind: $bad processes reported errors"
	echo "0 passed, $bad failed"
	exit 1
fi
exit $rc
