#!/usr/bin/env bash
# The CPU speed measurements behind docs/benchmarks.md's summary, N = 2048 check, profiles and
# translation rows, rewritten in docs/data/cpu/ (about 30 minutes; run it on an otherwise idle
# machine: the point is the ratios at one thread and at every core). Then:
#
#   bash scripts/benchmark_cpu_speed.sh && python -m scripts.benchmark_tables
#
# Environment: PY (default .venv/bin/python, else python3); IWSLT (default ../shared/data/iwslt14,
# the offline IWSLT14 de-en material the translation rows read); THREADS (default: the number of
# cores, the "default threads" rows).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
IWSLT=${IWSLT:-../shared/data/iwslt14}
THREADS=${THREADS:-$(nproc)}
D=docs/data/cpu
TMP=$(mktemp -d /tmp/clusterformer-cpu-speed.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
export PYTHONWARNINGS=ignore
say() { echo "[cpu-speed $(date +%H:%M:%S)] $*"; }
say "load average $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; default threads $THREADS"

for t in 1 "$THREADS"; do
    out=$D/check2048.csv
    [[ $t == 1 ]] || out=$D/check2048_t$t.csv
    say "N = 2048 training step, 5 rounds, $t thread(s) -> $out"
    "$PY" -m scripts.benchmark_attention --mode train --lengths 2048 --impl cluster,cluster-causal,full,sdpa,proj \
        --k sqrt --repeats 5 --warmup 1 --budget 200 --time-cap 60 --mem-cap-gb 14 --threads "$t" --csv "$out"
    say "profile of one N = 2048 training step, batch 20, $t thread(s)"
    "$PY" -m scripts.profile_attention --n 2048 --batch 20 --steps 2 --warmup 1 --threads "$t" 2>&1 |
        grep -v USDT >"$D/profile_2048_t$t.txt"
done

MT=(--settings mt --data-dir "$IWSLT" --train-steps 4 --warmup 1 --gen-batches 3 --gen-batch-size 16
    --gen-warmup 1 --work-dir "$TMP/bt")
say "translation, MT lengths, 1 thread, with the profile"
"$PY" -m scripts.benchmark_translation "${MT[@]}" --threads 1 --profile 15 --csv "$TMP/mt.csv" 2>&1 |
    grep -v USDT | tee "$D/profile_mt_t1.txt"
say "translation, MT lengths, $THREADS threads, with the profile"
"$PY" -m scripts.benchmark_translation "${MT[@]}" --threads "$THREADS" --tag "threads$THREADS" --profile 15 \
    --csv "$TMP/mt_t.csv" 2>&1 | grep -v USDT | tee "$D/profile_mt_t$THREADS.txt"
# full: the clusterformer model with fairseq's full attention on both sides, the floor of what the
# plugin's model and criterion cost beside the Transformer; lsh, routing: the baselines
for b in full lsh routing; do
    say "translation, MT lengths, 1 thread, $b self-attention on both sides"
    "$PY" -m scripts.benchmark_translation "${MT[@]}" --threads 1 --tag "$b" \
        --cluster-args "--self-attention-encoder $b --self-attention-decoder $b" --csv "$TMP/mt_$b.csv"
done
# translation.csv: these MT rows first, then the synthetic-length rows it already holds
{
    cat "$TMP/mt.csv"
    for f in "$TMP/mt_t.csv" "$TMP/mt_full.csv" "$TMP/mt_lsh.csv" "$TMP/mt_routing.csv"; do tail -n +2 "$f"; done
    grep -v '^mt' "$D/translation.csv" | tail -n +2
} >"$TMP/translation.csv"
mv "$TMP/translation.csv" "$D/translation.csv"
say "done: docs/data/cpu rewritten; now python -m scripts.benchmark_tables"
