#!/bin/sh
# make demo: the real Elastic APM Node.js agent -> ./apm-ext -> a fake APM
# server, all on 127.0.0.1 (see test/e2e/demo.py). make builds ./apm-ext first;
# this installs the agent (test/node, pinned by its package-lock.json) if it
# is missing. Needs python3 and node/npm (Debian: apt-get install nodejs npm).
#
# make demo OTEL=1 (or OTEL=1 sh test/e2e/demo.sh): the OpenTelemetry JS SDK
# instead, over OTLP/HTTP (test/otel, pinned by its package-lock.json);
# OTEL=json: the same with OTEL_EXPORTER_OTLP_PROTOCOL=http/json.
set -eu
cd "$(dirname "$0")/../.."
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "demo: node and npm are needed (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
case ${OTEL:-} in
"" | 0 | no | false) ;;
*)
    if [ ! -f test/otel/node_modules/@opentelemetry/exporter-trace-otlp-proto/package.json ]; then
        echo "demo: installing the OpenTelemetry SDK: npm ci --prefix test/otel"
        npm ci --prefix test/otel --no-audit --no-fund --loglevel=error
    fi
    if [ "$OTEL" = json ]; then
        exec python3 test/e2e/demo.py --otel --protocol http/json "$@"
    fi
    exec python3 test/e2e/demo.py --otel "$@"
    ;;
esac
if [ ! -f test/node/node_modules/elastic-apm-node/package.json ]; then
    echo "demo: installing the Node.js agent: npm ci --prefix test/node"
    npm ci --prefix test/node --no-audit --no-fund --loglevel=error
fi
exec python3 test/e2e/demo.py "$@"
