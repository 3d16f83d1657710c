#!/usr/bin/env bash
# Set everything up (scripts/bootstrap.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k attention -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "[test] running the test suite: $VPY -m pytest tests $*"
exec "$VPY" -m pytest tests "$@"
