#!/usr/bin/env bash
# The runs of docs/results.md's converged study (the `annealed` recipe, scripts/experiments/recipes.py),
# in priority order, on LANES parallel lanes (default 2: one single-threaded, niced run per core).
# Run it again after an interruption: finished runs (recorded in docs/results/multi30k_annealed.jsonl)
# are skipped and an interrupted one resumes from its checkpoint_last.pt.
#
#   nohup bash scripts/experiments/converged_queue.sh > work/experiments/converged_queue.log 2>&1 &
#
# Environment: LANES (default 2); SEEDS (default "1 2 3"); CODE (the plugin commit every run uses,
# default 9d0e43a3ba5e, that of the study's first runs, so that all of them run the same code; a
# resumed run keeps the commit it started with); RECIPE (default annealed); ONLY (a bash pattern:
# run only the queue entries whose label matches it, e.g. ONLY='@(decoder-full|routing) s1').
#
# To free the machine (for timings, say) without losing work: `touch work/experiments/queue.pause`.
# The lanes finish the runs they are in and start no new one until the file is removed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
CODE=${CODE:-9d0e43a3ba5e}
PY=${PY:-.venv/bin/python}
RECIPE=${RECIPE:-annealed}
LANES=${LANES:-2}
ONLY=${ONLY:-}
R=(nice -n 10 "$PY" -m scripts.experiments.run_side_by_side run --recipe "$RECIPE" --dataset multi30k --code "$CODE")
[ -f work/experiments/data/multi30k/dataset.json ] || "$PY" -m scripts.experiments.run_side_by_side prepare multi30k

# One entry per run: "label|runner arguments". Seeds first (the main table; within a seed the systems
# the paper's claims compare come before the encoder-only variant), then the k sweep (it decides
# whether clusterformer-choose-k needs more work), then the loss ablation, then a second seed of k = 4
# and k = 8.
QUEUE=()
for s in ${SEEDS:-1 2 3}; do
    QUEUE+=("transformer s$s|--models transformer --seeds $s")
    QUEUE+=("clusterformer s$s|--models clusterformer --seeds $s")
    QUEUE+=("routing s$s|--models clusterformer --seeds $s --label routing -- --self-attention-encoder routing --self-attention-decoder routing")
    QUEUE+=("lsh s$s|--models clusterformer --seeds $s --label lsh -- --self-attention-encoder lsh --self-attention-decoder lsh")
    QUEUE+=("decoder-full s$s|--models clusterformer --seeds $s --label decoder-full -- --self-attention-decoder full")
done
for k in 2 4 6 8; do
    QUEUE+=("k$k s1|--models clusterformer --seeds 1 --variants= --ks $k")
done
for s in 1 2; do
    for v in no-clustering-loss no-sorting-loss no-cluster-losses; do
        QUEUE+=("$v s$s|--models clusterformer --seeds $s --variants $v")
    done
done
# A second seed of the best converged k at seed 1 (4) and of clusterformer-choose-k's pick (8): the
# chooser check compares the best k with the pick, and one seed each cannot tell their gap from noise.
for k in 4 8; do
    QUEUE+=("k$k s2|--models clusterformer --seeds 2 --variants= --ks $k")
done

# Like-for-like baselines (three seeds each): routing without its rotary local heads in the encoder,
# and LSH with 1 and 2 hash rounds (8 rounds reach the whole of a Multi30k sentence).
for s in ${SEEDS:-1 2 3}; do
    QUEUE+=("routing-local-heads=0 s$s|--models clusterformer --seeds $s --label routing-local-heads=0 -- --self-attention-encoder routing --self-attention-decoder routing --routing-local-heads 0")
    QUEUE+=("lsh-n-hashes=1 s$s|--models clusterformer --seeds $s --label lsh-n-hashes=1 -- --self-attention-encoder lsh --self-attention-decoder lsh --lsh-n-hashes 1")
    QUEUE+=("lsh-n-hashes=2 s$s|--models clusterformer --seeds $s --label lsh-n-hashes=2 -- --self-attention-encoder lsh --self-attention-decoder lsh --lsh-n-hashes 2")
done
# ClusterFormer's encoder with half of its heads local, routing's local-head budget (the encoder
# --local-heads option is newer than the study's code: these runs use the commit that added it).
for s in ${SEEDS:-1 2 3}; do
    QUEUE+=("local-heads=half s$s|--models clusterformer --seeds $s --label local-heads=half --code 574b05d -- --local-heads half")
done
# The Sparse Transformer (fixed pattern on both sides) and the Linformer (encoder only; the
# decoder stays ClusterFormer's, so the row differs from ClusterFormer's in the encoder alone), at
# the commit that added them.
for s in ${SEEDS:-1 2 3}; do
    QUEUE+=("sparse s$s|--models clusterformer --seeds $s --label sparse --code 95dbe7f -- --self-attention-encoder sparse --self-attention-decoder sparse")
    QUEUE+=("linformer s$s|--models clusterformer --seeds $s --label linformer --code 95dbe7f -- --self-attention-encoder linformer")
done

# shellcheck source=scripts/experiments/_queue_lib.sh
source scripts/experiments/_queue_lib.sh # (the working directory is the repository root)
run_queue work/experiments/queue_claims
