#!/usr/bin/env bash
# The converged study at d 256 on one GPU: the `annealed-d256` recipe (scripts/experiments/recipes.py;
# the `annealed` recipe of docs/results.md with the model twice as wide) for each system, seed 1,
# all systems at once on the one GPU, through the same runner as the CPU study
# (`run_side_by_side run --device cuda`). Prepared to fit one device call: run from the repository
# root on the GPU machine, with the wheels of scripts/gpu/prepare.sh in .whl/ and the prepared
# Multi30k data (`python -m scripts.experiments.run_side_by_side prepare multi30k`) carried along:
#
#   # device call: carry .whl, work/experiments/data/multi30k/data-bin, work/experiments/data/multi30k/dataset.json
#   bash scripts/gpu/converged.sh              # on the GPU machine: writes everything to $OUT
#   bash scripts/gpu/converged.sh --dry-run    # on any CPU machine: the same steps, tiny and short
#
# Options: --dry-run; --out DIR (default $OUT, else a new folder under /tmp).
# Environment: SYSTEMS (default "transformer clusterformer"; any of transformer, clusterformer,
# routing, lsh, decoder-full), SEED (default 1), LIMIT (seconds each run may take, training and
# translating, default 420), CLUSTERFORMER_GIT_COMMIT (the commit the copy was made from, which
# the records name: the GPU machine's copy has no .git; give `git rev-parse --short HEAD` of
# here), PYTHON (default python3), CHECK_SITE (where the wheels go, default /tmp/clusterformer-site).
#
# Files in the output folder (4): converged.log (everything, with fairseq's progress lines),
# results.jsonl (one record per finished run, as the runner appends them to
# docs/results/multi30k_annealed-d256.jsonl), hyps.tar.gz (their translations, the paths under
# docs/results/hyps/ the records name), train_logs.tar.gz (each run's train.log: the learning
# curve, also of a run stopped at LIMIT).
#
# Back here, in the repository root: `cat results.jsonl >> docs/results/multi30k_annealed-d256.jsonl`
# and `tar -xzf hyps.tar.gz`; a generated block in docs/results.md that names that file (as the
# annealed block names its own) is then rebuilt by `python -m scripts.experiments.run_side_by_side report`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO="$PWD"

source scripts/gpu/_common.sh
gpu_parse_args "${BASH_SOURCE[0]}" "$@"

# The runner's arguments of each system (those of scripts/experiments/converged_queue.sh).
system_args() {
    case "$1" in
        transformer) echo "--models transformer" ;;
        clusterformer) echo "--models clusterformer" ;;
        routing) echo "--models clusterformer --label routing -- --self-attention-encoder routing --self-attention-decoder routing" ;;
        lsh) echo "--models clusterformer --label lsh -- --self-attention-encoder lsh --self-attention-decoder lsh" ;;
        decoder-full) echo "--models clusterformer --label decoder-full -- --self-attention-decoder full" ;;
        *) return 1 ;;
    esac
}
SYSTEMS="${SYSTEMS:-transformer clusterformer}"
for s in $SYSTEMS; do
    system_args "$s" >/dev/null || {
        echo "unknown system in SYSTEMS: $s (transformer, clusterformer, routing, lsh, decoder-full)" >&2
        exit 2
    }
done

gpu_output_dir clusterformer-gpu-converged
PY="${PYTHON:-python3}"
SITE="${CHECK_SITE:-/tmp/clusterformer-site}"
SEED="${SEED:-1}"
LIMIT="${LIMIT:-420}"
LOG="$OUTDIR/converged.log"
WORKDIR="$REPO/work/experiments" # the runner's --work: data/multi30k (carried) and runs/
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
: >"$LOG"
say() { echo "[gpu-converged $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [[ $DRY == 1 ]]; then
    # a scratch copy of this checkout's prepared data (DRY_DATA), as the device call carries it
    SCRATCH="$(mktemp -d /tmp/clusterformer-gpu-converged-dry.XXXXXX)"
    say "DRY RUN on the CPU with $PY in $SCRATCH: the quick recipe, a tiny model, 4 updates, beam 1"
    src="${DRY_DATA:-$REPO/work/experiments/data/multi30k}"
    [[ -d "$src/data-bin" ]] || {
        say "no prepared data at $src: run $PY -m scripts.experiments.run_side_by_side prepare multi30k (or set DRY_DATA)"
        exit 1
    }
    WORKDIR="$SCRATCH/work"
    mkdir -p "$WORKDIR/data/multi30k"
    cp -r "$src/data-bin" "$src/dataset.json" "$WORKDIR/data/multi30k/"
    RESULTS="$SCRATCH/results.jsonl"
    RUN=(--device cpu --recipe quick --max-update 4 --beam 1 --generate-args "--max-len-b 5" --results "$RESULTS" --hyp-dir "$SCRATCH/hyps"
        --model-args "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 --decoder-attention-heads 2 --share-all-embeddings")
    export OMP_NUM_THREADS=1
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
    say "installing the wheels of .whl/ into $SITE"
    gpu_install_wheels >>"$LOG" 2>&1 || {
        say "installing the wheels failed (see $LOG)"
        exit 1
    }
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    RESULTS="$REPO/docs/results/multi30k_annealed-d256.jsonl"
    RUN=(--device cuda --recipe annealed-d256)
    export OMP_NUM_THREADS=2 # 16 cores, a few processes at once
fi

# The carried data set was prepared in another checkout: point its dataset.json at this one.
DATA="$WORKDIR/data/multi30k"
[[ -f "$DATA/dataset.json" && -d "$DATA/data-bin" ]] || {
    say "no prepared data in $DATA (carry work/experiments/data/multi30k/data-bin and .../dataset.json)"
    exit 1
}
"$PY" - "$DATA" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

folder = Path(sys.argv[1]).resolve()
meta = json.loads((folder / "dataset.json").read_text())
meta["data_bin"] = str(folder / "data-bin")
for t in meta["tests"]:
    t["ref"] = str((Path("data") / meta["name"] / Path(t["ref"]).name).resolve())  # data/multi30k in this checkout
    assert Path(t["ref"]).is_file(), f"reference {t['ref']} is missing"
(folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
print(f"data: {meta['data_bin']}; references: {', '.join(t['ref'] for t in meta['tests'])}")
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1
before=$(cat "$RESULTS" 2>/dev/null | wc -l)

# All systems at once, each under LIMIT seconds (a run stopped there leaves its train.log).
pids=()
for s in $SYSTEMS; do
    # shellcheck disable=SC2046  # system_args prints a word list
    set -- $(system_args "$s")
    say "starting $s (seed $SEED): run_side_by_side run --dataset $DATA --work $WORKDIR --seeds $SEED --code worktree ${RUN[*]} $*"
    timeout --kill-after=10 "$LIMIT" "$PY" -m scripts.experiments.run_side_by_side run --dataset "$DATA" \
        --work "$WORKDIR" --seeds "$SEED" --code worktree "${RUN[@]}" "$@" >"$OUTDIR/$s.log" 2>&1 &
    pids+=($!)
done
set -- $SYSTEMS
failed=0 started=$#
for pid in "${pids[@]}"; do
    wait "$pid"
    rc=$?
    ((rc == 0)) && say "$1: done" || {
        say "$1: exit $rc$( ((rc == 124 || rc == 137)) && echo " (stopped at the ${LIMIT} s limit)")"
        failed=$((failed + 1))
    }
    shift
done
for s in $SYSTEMS; do
    { echo "===== $s"; cat "$OUTDIR/$s.log"; } >>"$LOG"
    rm -f "$OUTDIR/$s.log"
done

# What comes back: the new records, their translations, every run's train.log.
tail -n +"$((before + 1))" "$RESULTS" >"$OUTDIR/results.jsonl" 2>/dev/null || : >"$OUTDIR/results.jsonl"
"$PY" - "$OUTDIR/results.jsonl" "$OUTDIR/hyps.tar.gz" "$REPO" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, tarfile
from pathlib import Path

records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
repo = Path(sys.argv[3])
with tarfile.open(sys.argv[2], "w:gz") as tar:
    for r in records:
        for t in r["tests"]:
            if t.get("hyp_file"):
                path = Path(t["hyp_file"])
                tar.add(path if path.is_absolute() else repo / path, arcname=str(path))
        print(f"{r['run_id']}: valid nll {r['best_valid_nll']}, "
              + ", ".join(f"{t['label']} sacreBLEU {t['sacrebleu']} chrF {t.get('chrf')}" for t in r["tests"])
              + f", {r['train_wall_clock_s'] / 60:.1f} min, {r['tokens_per_s']} tok/s")
print(f"{len(records)} run(s) recorded")
EOF
(cd "$WORKDIR" && find runs -name train.log -newer "$DATA/dataset.json" -print0 2>/dev/null |
    tar -czf "$OUTDIR/train_logs.tar.gz" --null -T - 2>>"$LOG")
say "done: $failed of $started run(s) did not finish; files in $OUTDIR"
[[ $failed == 0 ]]
