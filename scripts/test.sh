#!/usr/bin/env bash
# Set everything up (scripts/bootstrap.sh), check formatting and lint (ruff), then run the whole
# test suite on 2 worker processes (pytest-xdist; each test file stays on one worker, so its
# module fixtures are built once). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -k attention -x`; `-n 0` runs in one process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "[test] ruff format --check . && ruff check ."
"$VPY" -m ruff format --check . || { echo "[test] formatting differs: run $VPY -m ruff format ." >&2; exit 1; }
"$VPY" -m ruff check .
echo "[test] running the test suite: $VPY -m pytest tests -n ${TEST_WORKERS:-2} --dist loadfile $*"
exec "$VPY" -m pytest tests -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
