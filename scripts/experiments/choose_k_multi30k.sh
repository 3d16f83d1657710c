#!/usr/bin/env bash
# clusterformer-choose-k on Multi30k at the short budget docs/results.md documents ("Choosing k"),
# published as docs/results/choose_k_multi30k.json (paths made relative to the checkout), the raw
# result behind that section's generated table and behind the converged study's chooser check.
# About 12 minutes on one core; then `python -m scripts.experiments.run_side_by_side report`.
#
# Environment: PY (default .venv/bin/python), KS (default 1,2,3,4,6,8), MAX_UPDATE (default 150),
# SEEDS (default 1), SCHEDULE (inverse_sqrt or anneal; default inverse_sqrt), ANNEAL_OVER (with
# SCHEDULE=anneal: decay over this many updates and stop at MAX_UPDATE, i.e. train the first part of
# a longer schedule; default MAX_UPDATE), TOLERANCE (bits/token or auto; default 0.05), NAME
# (default choose_k_multi30k: the work/ folder and the published docs/results/NAME.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
NAME=${NAME:-choose_k_multi30k}
OUT=work/$NAME
[ -f work/experiments/data/multi30k/dataset.json ] || "$PY" -m scripts.experiments.run_side_by_side prepare multi30k
"$PY" -m fairseq_clusterformer.tools.choose_k --data work/experiments/data/multi30k/data-bin \
    --ks "${KS:-1,2,3,4,6,8}" --max-update "${MAX_UPDATE:-150}" --seeds "${SEEDS:-1}" \
    --schedule "${SCHEDULE:-inverse_sqrt}" ${ANNEAL_OVER:+--anneal-over "$ANNEAL_OVER"} \
    --tolerance "${TOLERANCE:-0.05}" --out "$OUT"
"$PY" - "$OUT/choose_k.json" "docs/results/$NAME.json" <<'PYEOF'
import json
import sys
from pathlib import Path

from scripts.experiments.expkit import portable

result = portable(json.loads(Path(sys.argv[1]).read_text()))
result["invocation"] = result["invocation"].replace("clusterformer-choose-k", "OMP_NUM_THREADS=1 clusterformer-choose-k", 1)
Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
print(f"published {sys.argv[2]}")
PYEOF
