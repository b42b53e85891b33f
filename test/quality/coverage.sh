#!/bin/sh
# make coverage: see test/quality/coverage.py (line and branch coverage of apm-ext.c).
exec python3 "$(dirname "$0")/coverage.py" "$@"
