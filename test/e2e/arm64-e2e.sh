#!/bin/sh
# The end-to-end suite against the arm64 binary of the layer, run under
# qemu-aarch64-static. A wrapper named like the extension execs qemu on the
# binary, so the name it registers with is still apm-lambda-extension.
# Scenarios that depend on tight timing are left to the native runs (qemu is
# 5-20x slower); the set below covers the lifecycle, forwarding, TLS,
# telemetry and shutdown. Extra arguments go to test/e2e/e2e.py.
set -eu
cd "$(dirname "$0")/../.."
bin=build/aarch64/apm-lambda-extension
[ -x "$bin" ] || sh layer/build.sh >/dev/null
command -v qemu-aarch64-static >/dev/null || {
	echo "FAIL setup: qemu-aarch64-static missing (apt-get install qemu-user-static)"
	echo "0 passed, 1 failed"
	exit 1
}
wrap=build/arm64-wrap
mkdir -p "$wrap"
cat >"$wrap/apm-lambda-extension" <<WRAP
#!/bin/sh
exec qemu-aarch64-static "$PWD/$bin" "\$@"
WRAP
chmod 755 "$wrap/apm-lambda-extension"
for k in init_register sync_three background agents_and_encodings payload_1mb \
	shutdown_delivery proxy_get_root register_transaction keepalive \
	missing_server_url platform_report function_logs tls_ca_file \
	tls_refused_wrong_host timeout_reports; do
	set -- "$@" -k "$k"
done
exec python3 test/e2e/e2e.py --binary "$wrap/apm-lambda-extension" "$@"
