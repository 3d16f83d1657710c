#!/usr/bin/env bash
# The document-level study: every system at the same settings (the `documents` recipe,
# scripts/experiments/recipes.py) on de-en documents of 200-500 BPE tokens (DATASET below, prepared
# here if missing), on LANES parallel lanes (default 2: one single-threaded, niced run per core). One
# seed of every system first, then seeds 2 and 3. Run it again after an interruption: finished runs
# (recorded in docs/results/<DATASET>_documents.jsonl) are skipped and an interrupted one resumes
# from its checkpoint_last.pt.
#
#   nohup bash scripts/experiments/documents_queue.sh > work/experiments/documents_queue.log 2>&1 &
#   DATASET=multi30k-docs nohup bash scripts/experiments/documents_queue.sh > work/experiments/m30k_docs.log 2>&1 &
#
# Environment: DATASET, the documents (iwslt14-docs, the default: real TED talks, built by
# scripts/experiments/long_documents.py from SOURCE; multi30k-docs: Multi30k pseudo-documents, built
# by scripts/experiments/multi30k_documents.py from the shipped corpus; multi30k-docs-mr: the same
# documents, trained on together with shorter groups of captions); LANES (default 2); SEEDS
# (default "1 2 3"); CODE (the plugin commit every run uses; default: HEAD when the queue first
# starts, kept in work/experiments/documents_queue.<DATASET>.code so that a restarted queue runs the
# same code; a resumed run keeps the commit it started with); ONLY (a bash pattern: run only the
# entries whose label matches it, e.g. ONLY='@(lsh|routing) s1'); SOURCE (the IWSLT14 material,
# default ../shared/data/iwslt14); DATA (default work/experiments/data/<DATASET>).
#
# To free the machine without losing work: `touch work/experiments/queue.pause` (the same file
# converged_queue.sh obeys). The lanes finish the runs they are in and start no new one until the
# file is removed.
set -euo pipefail
shopt -s extglob # ONLY may use @(a|b) patterns
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
LANES=${LANES:-2}
ONLY=${ONLY:-}
SOURCE=${SOURCE:-../shared/data/iwslt14}
DATASET=${DATASET:-iwslt14-docs}
case "$DATASET" in
    iwslt14-docs) BUILD=(-m scripts.experiments.long_documents prepare --source "$SOURCE") ;;
    multi30k-docs) BUILD=(-m scripts.experiments.multi30k_documents prepare) ;;
    multi30k-docs-mr) BUILD=(-m scripts.experiments.multi30k_documents prepare --multi-resolution) ;;
    *)
        echo "documents_queue: DATASET must be iwslt14-docs, multi30k-docs or multi30k-docs-mr, not '$DATASET'" >&2
        exit 2
        ;;
esac
DATA=${DATA:-work/experiments/data/$DATASET}
PIN=work/experiments/documents_queue.$DATASET.code
mkdir -p work/experiments
if [[ -z "${CODE:-}" ]]; then
    [[ -f "$PIN" ]] || git rev-parse --short=12 HEAD > "$PIN"
    CODE=$(cat "$PIN")
fi
[[ -f "$DATA/dataset.json" ]] || "$PY" "${BUILD[@]}" --out "$DATA"

# The runner takes the data set's generation settings (a length bound for documents) from its
# dataset.json, and names the runs after the recipe's budget (doc<updates>).
R=(nice -n 10 "$PY" -m scripts.experiments.run_side_by_side run --recipe documents --dataset "$DATA" --code "$CODE")
echo "[queue $(date +%H:%M:%S)] documents study on $DATASET: code $CODE"

# One entry per run: "label|runner arguments". Within a seed: the Transformer and ClusterFormer (k = 3,
# the paper's) first, then k = auto (ceil(sqrt(L)) clusters per document in the encoder, the paper's
# setting for long texts; the decoder needs an integer, 3 as for the others), then the baselines at
# ClusterFormer's k (routing; LSH with 2 hash rounds), ClusterFormer's encoder with a full decoder, the
# Sparse Transformer (blocks of ceil(L/3) in the encoder, of --causal-window in the decoder) and the
# Linformer encoder (32 projected rows) with ClusterFormer's decoder; last, the like-for-like pair of
# the sentence-level study: routing without its rotary local heads, and ClusterFormer with half of its
# encoder heads local (routing's budget).
QUEUE=()
for s in ${SEEDS:-1 2 3}; do
    QUEUE+=("transformer s$s|--models transformer --seeds $s")
    QUEUE+=("clusterformer s$s|--models clusterformer --seeds $s")
    QUEUE+=("k=auto s$s|--models clusterformer --seeds $s --label k=auto -- --num-clusters auto --causal-num-clusters 3")
    QUEUE+=("routing s$s|--models clusterformer --seeds $s --label routing -- --self-attention-encoder routing --self-attention-decoder routing")
    QUEUE+=("lsh-n-hashes=2 s$s|--models clusterformer --seeds $s --label lsh-n-hashes=2 -- --self-attention-encoder lsh --self-attention-decoder lsh --lsh-n-hashes 2")
    QUEUE+=("decoder-full s$s|--models clusterformer --seeds $s --label decoder-full -- --self-attention-decoder full")
    QUEUE+=("sparse s$s|--models clusterformer --seeds $s --label sparse -- --self-attention-encoder sparse --self-attention-decoder sparse")
    QUEUE+=("linformer s$s|--models clusterformer --seeds $s --label linformer -- --self-attention-encoder linformer")
    QUEUE+=("routing-local-heads=0 s$s|--models clusterformer --seeds $s --label routing-local-heads=0 -- --self-attention-encoder routing --self-attention-decoder routing --routing-local-heads 0")
    QUEUE+=("local-heads=half s$s|--models clusterformer --seeds $s --label local-heads=half -- --local-heads half")
done

# shellcheck source=scripts/experiments/_queue_lib.sh
source scripts/experiments/_queue_lib.sh # (the working directory is the repository root)
run_queue "work/experiments/documents_queue_claims.$DATASET"
