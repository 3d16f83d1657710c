#!/usr/bin/env bash
# The GPU check: one prepared run that proves the CUDA path and fp16/bf16 training, and measures
# the attention layer against flash attention. Run from the repository root on the GPU machine,
# after scripts/gpu/prepare.sh has filled .whl/ on a machine with network:
#
#   bash scripts/gpu/check.sh              # on the GPU machine: writes everything to $OUT
#   bash scripts/gpu/check.sh --dry-run    # on any CPU machine: the same steps at tiny sizes
#
# Options: --dry-run; --out DIR (default $OUT, else a new folder under /tmp).
# Environment: PYTHON (default python3); CHECK_SITE, the folder the wheels go to
# (default /tmp/clusterformer-site); CHECK_STEPS, the steps to run (default all:
# "tests precision attention translation"; install always runs), so that one lease can run the
# check in two calls that each fit the device's 10-minute limit; CHECK_LENGTHS, the attention
# step's lengths (default 512,1024,...,65536); CHECK_IMPLS, its implementations (default: the list
# under "attention" below); CHECK_SETTINGS, the translation step's lengths (default 512,2048);
# CHECK_TESTS_S, CHECK_ATTENTION_S, CHECK_TRANSLATION_S, CHECK_COMPILE_S: the limits of the tests,
# attention, translation and translation-compile steps (default 240, 240, 120, 200 s);
# CHECK_COMPILE_MODE, the translation-compile step's --cluster-compile-mode (default "default";
# "reduce-overhead": CUDA graphs, rows tagged clusterformer_iwslt+compile-reduce-overhead);
# CHECK_CLUSTER_IMPL, both translation steps' --cluster-impl (default "fast"; "flex": FlexAttention,
# rows tagged clusterformer_iwslt+flex and +flex-compile..., CUDA only). The remaining H200
# targets, each in one call (docs/benchmarks.md, "Running it again", gives the order), e.g.:
#   CHECK_STEPS=attention CHECK_LENGTHS=2048,8192 CHECK_ATTENTION_S=420 \
#     CHECK_IMPLS=cluster,cluster-flex,cluster-causal,cluster-causal-flex,sdpa,flash bash scripts/gpu/check.sh
#   CHECK_STEPS=translation CHECK_COMPILE_MODE=reduce-overhead CHECK_TRANSLATION_S=180 CHECK_COMPILE_S=360 \
#     bash scripts/gpu/check.sh
#
# Steps, each under its own time limit (over the device's 10-minute limit together: run them in two
# calls with CHECK_STEPS, e.g. "tests precision" and "attention translation"), each recorded in the
# summary whatever happens to the others:
#   install      the .whl/ wheels into CHECK_SITE with pip --no-index --no-deps --target (torch is
#                never touched), then fairseq and this package must import from there
#   tests        pytest -m cuda tests (tests/test_cuda.py); the dry run runs them on the CPU
#   precision    fairseq-train --fp16, fairseq-hydra-train common.bf16=true (fairseq-train --bf16
#                implies --tpu in these fairseq builds), fairseq-train --memory-efficient-fp16;
#                each followed by fairseq-generate and --score-reference (scripts/gpu/cli_precision.py).
#                The dry run runs bf16 and memory-efficient-fp16 on the CPU (fairseq's plain --fp16
#                optimizer needs CUDA)
#   attention    python -m scripts.benchmark_attention --device cuda: cluster, cluster-causal and
#                both with --cluster-compile (torch.compile), full, sdpa, flash (torch's flash
#                kernel alone), naive, and the baselines lsh-8, routing, sparse, sparse-causal
#                and linformer-256, in bf16, N 512 .. 65536, batch 20 up to N = 8192, CSV and plot
#   translation  python -m scripts.benchmark_translation --device cuda: clusterformer_iwslt
#                against transformer_iwslt_de_en, synthetic pairs of 512 and 2048 tokens, bf16;
#                then the same with --cluster-compile (rows tagged clusterformer_iwslt+compile)
# The step limits add up to 990 s (install 60, tests 240, precision 130, attention 240, translation
# 120 + 200 compiled); a step that reaches its limit is recorded as "timeout" and
# what it wrote so far (CSV rows are flushed one by one) stays.
#
# Files in the output folder (8): summary.txt, check.log, pytest_cuda.xml, cli_precision.json,
# cli_commands.log, attention.csv, attention_train_<device>.png, translation.csv.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO="$PWD"

source scripts/gpu/_common.sh
gpu_parse_args "${BASH_SOURCE[0]}" "$@"
gpu_output_dir clusterformer-gpu-check
PY="${PYTHON:-python3}"
SITE="${CHECK_SITE:-/tmp/clusterformer-site}"
WORK="$(mktemp -d /tmp/clusterformer-gpu-work.XXXXXX)"
LOG="$OUTDIR/check.log"
STATUS="$WORK/status.tsv"
: >"$LOG"
: >"$STATUS"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
T_START=$SECONDS
STEPS=" ${CHECK_STEPS:-tests precision attention translation} "
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

if [[ $DRY == 1 ]]; then
    export CLUSTERFORMER_CUDA_TESTS_DEVICE=cpu OMP_NUM_THREADS=1
fi

# step NAME LIMIT_SECONDS COMMAND...: run, log, record status and time; never stops the script.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status="timeout"
    ((rc != 0 && rc != 124 && rc != 137)) && status="failed (exit $rc)"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$STATUS"
    echo "== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [[ $DRY == 1 ]]; then
    echo "DRY RUN on the CPU with $PY: tiny sizes; the wheels are not installed (they are for CPython 3.12 on the GPU machine)" | tee -a "$LOG"
    printf 'install\tskipped (dry run)\t0\n' >>"$STATUS"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
    export -f gpu_install_wheels
    export PY SITE
    step install 60 bash -c gpu_install_wheels
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
fi

# (a) the cuda-marked tests
wanted tests && step tests "${CHECK_TESTS_S:-240}" "$PY" -m pytest -m cuda tests -q -rs -p no:cacheprovider --junitxml="$OUTDIR/pytest_cuda.xml"

# (b) reduced-precision training, each decoded exactly
if [[ $DRY == 1 ]]; then
    PREC=(--device cpu --precisions bf16,memory-efficient-fp16 --max-update 6 --warmup 3 --jobs 2)
else
    PREC=(--device cuda --precisions fp16,bf16,memory-efficient-fp16 --max-update 60 --warmup 20 --jobs 3)
fi
wanted precision && step precision 130 "$PY" -m scripts.gpu.cli_precision "${PREC[@]}" --work "$WORK/cli" \
    --json "$OUTDIR/cli_precision.json" --log "$OUTDIR/cli_commands.log"

# (c) the attention layer against flash attention
if [[ $DRY == 1 ]]; then
    ATTN=(--device cpu --dtype bfloat16 --in-process --lengths 64,128 --batch 2 --d 32 --heads 4 --repeats 1
        --warmup 0 --threads 1 --fit 64,128)
else
    ATTN=(--device cuda --dtype bfloat16 --lengths "${CHECK_LENGTHS:-512,1024,2048,4096,8192,16384,32768,65536}"
        --repeats 3 --warmup 1 --budget 10 --time-cap 20 --fit 4096,65536)
fi
IMPLS=${CHECK_IMPLS:-cluster,cluster-compiled,cluster-causal,cluster-causal-compiled,full,sdpa,flash,naive,lsh-8,routing,sparse,sparse-causal,linformer-256}
# the dry run leaves out the compiled layers: inductor's CPU compile takes minutes there
# (tests/test_compile.py and the cuda tests compare the compiled path with the eager one)
if [[ $DRY == 1 ]]; then
    # and the FlexAttention layers (FlexAttention has no CPU backward)
    for compiled in cluster-compiled cluster-causal-compiled cluster-graphs cluster-causal-graphs \
        cluster-flex cluster-causal-flex cluster-flex-compiled cluster-causal-flex-compiled; do
        IMPLS=${IMPLS//,$compiled/}
    done
fi
wanted attention && step attention "${CHECK_ATTENTION_S:-240}" "$PY" -m scripts.benchmark_attention "${ATTN[@]}" --mode train \
    --impl "$IMPLS" --k sqrt --csv "$OUTDIR/attention.csv" --plot "$OUTDIR"

# (d) whole translation models
if [[ $DRY == 1 ]]; then
    MT=(--device cpu --dtype bfloat16 --settings 48 --layers 1 --embed-dim 32 --ffn-dim 64 --heads 4 --train-steps 1 --warmup 1
        --gen-batches 1 --gen-warmup 0 --gen-batch-size 2 --gen-len-long 4 --max-tokens 400 --threads 1)
else
    MT=(--device cuda --dtype bfloat16 --settings "${CHECK_SETTINGS:-512,2048}" --train-steps 10 --warmup 2 --gen-batches 2
        --gen-warmup 1 --gen-batch-size 16 --gen-len-long 64)
fi
if wanted translation; then
    IMPL=${CHECK_CLUSTER_IMPL:-fast}
    if [[ $IMPL == fast ]]; then
        IMPL_ARGS=() TAG_PREFIX=""
    else
        IMPL_ARGS=(--cluster-args="--cluster-impl $IMPL" --tag "$IMPL") TAG_PREFIX="$IMPL-"
    fi
    step translation "${CHECK_TRANSLATION_S:-120}" "$PY" -m scripts.benchmark_translation "${MT[@]}" --work-dir "$WORK/mt" \
        "${IMPL_ARGS[@]}" --csv "$OUTDIR/translation.csv"
    MODE=${CHECK_COMPILE_MODE:-default}
    TAG=$TAG_PREFIX$([[ $MODE == default ]] && echo compile || echo "compile-$MODE")
    step translation-compile "${CHECK_COMPILE_S:-200}" "$PY" -m scripts.benchmark_translation "${MT[@]}" --work-dir "$WORK/mt" \
        --cluster-args="--cluster-impl $IMPL --cluster-compile --cluster-compile-mode $MODE" --tag "$TAG" \
        --csv "$WORK/translation_compile.csv"
    # one CSV for both runs (the device returns at most 8 files)
    [[ -f "$WORK/translation_compile.csv" ]] && tail -n +2 "$WORK/translation_compile.csv" >>"$OUTDIR/translation.csv"
fi

"$PY" -m scripts.gpu.summary --status "$STATUS" --out "$OUTDIR" --log "$LOG" --dry-run "$DRY" \
    --seconds "$((SECONDS - T_START))" | tee "$OUTDIR/summary.txt"
failed="$(grep -cv $'\tok\t\|\tskipped' "$STATUS")"
rm -rf "$WORK"
[[ "$failed" == 0 ]]
