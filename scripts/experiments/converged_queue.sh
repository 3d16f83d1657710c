#!/usr/bin/env bash
# The converged-recipe runs of docs/results.md, one after the other, single-threaded and niced.
# Run it again after an interruption: finished runs (recorded in docs/results/multi30k_converged.jsonl)
# are skipped and an interrupted one resumes from its checkpoint_last.pt.
#
#   nohup bash scripts/experiments/converged_queue.sh > work/experiments/converged_queue.log 2>&1 &
#
# SEEDS (default "1 2 3") and CODE (the plugin commit every run uses) can be overridden.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
CODE=${CODE:-83b18ea}
PY=${PY:-.venv/bin/python}
R=(nice -n 10 "$PY" -m scripts.experiments.run_side_by_side run --recipe converged --dataset multi30k --code "$CODE")
[ -f work/experiments/data/multi30k/dataset.json ] || "$PY" -m scripts.experiments.run_side_by_side prepare multi30k
for s in ${SEEDS:-1 2 3}; do
    "${R[@]}" --models transformer --seeds "$s"
    "${R[@]}" --models clusterformer --seeds "$s"
    "${R[@]}" --models clusterformer --seeds "$s" --label decoder-full -- --self-attention-decoder full
done
