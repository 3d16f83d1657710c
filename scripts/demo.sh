#!/usr/bin/env bash
# The demo: set up, then train a small ClusterFormer on the shipped Multi30k corpus (data/multi30k),
# translate test_2016 (German -> English) and print its BLEU. CPU only, no network, about 10 minutes on
# 2 cores the first time; a second run reuses every finished step.
#
# Usage: bash scripts/demo.sh [--retrain] [--redo-data] [--sentencepiece] [--help]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

# ---- settings (environment variables override them) -----------------------------------------------
ARCH="${DEMO_ARCH:-clusterformer_iwslt}"
CRITERION="${DEMO_CRITERION:-label_smoothed_cross_entropy_with_clustering}"
# Model size: the small setting of docs/results.md (3+3 layers, d 128, 4 heads, k = 3, 2 of the 4
# decoder heads local), 800 updates (docs/results.md, "The demo's setting": 28.7 BLEU over two
# seeds, against 19.9 at 400 updates).
MODEL_ARGS=(${DEMO_MODEL_ARGS:---encoder-layers 3 --decoder-layers 3
    --encoder-embed-dim 128 --decoder-embed-dim 128
    --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
    --encoder-attention-heads 4 --decoder-attention-heads 4})
EXTRA_TRAIN_ARGS=(${DEMO_TRAIN_ARGS:-})        # appended to fairseq-train, e.g. "--num-clusters 4"
MAX_UPDATE="${DEMO_MAX_UPDATE:-800}"
MAX_MINUTES="${DEMO_MAX_MINUTES:-10}"            # safety net: training stops after this long anyway
LR="${DEMO_LR:-0.002}"
WARMUP="${DEMO_WARMUP:-100}"
# The learning-rate schedule after warm-up: linear (decayed to 0 at the last update, fairseq's
# polynomial_decay) or inverse_sqrt. (If the time limit stops training first, the rate has not
# reached 0 and the model is worse than it would be.)
SCHEDULE="${DEMO_SCHEDULE:-inverse_sqrt}"
MAX_TOKENS="${DEMO_MAX_TOKENS:-2048}"
DROPOUT="${DEMO_DROPOUT:-0.1}"
BPE_OPS="${DEMO_BPE_OPS:-8000}"                 # subword-nmt merges (or sentencepiece vocabulary)
BEAM="${DEMO_BEAM:-5}"
SEED="${DEMO_SEED:-1}"
WORK="${DEMO_WORK:-$ROOT/work/demo}"
DATA="${DEMO_DATA:-$ROOT/data/multi30k}"
SRC=de
TGT=en

usage() {
    cat <<EOF
Usage: bash scripts/demo.sh [--retrain] [--redo-data] [--sentencepiece] [--help]

Sets up the environment (scripts/bootstrap.sh), then on the shipped Multi30k corpus (data/multi30k):
  1. tokenises with the Moses tokenizer (sacremoses) and learns a joint BPE ($BPE_OPS merges,
     subword-nmt) on the training set,
  2. binarises it (fairseq-preprocess --joined-dictionary),
  3. trains a small model on the CPU ($MAX_UPDATE updates, learning rate $SCHEDULE, at most
     $MAX_MINUTES minutes; arch $ARCH),
  4. translates all 1000 sentences of test_2016_flickr (beam $BEAM) and prints sacrebleu BLEU on
     the detokenised output, with a few sample translations.
Outputs go to $WORK (ignored by git). A second run reuses every finished step.

Options:
  --retrain        train the model again from scratch (keeps the prepared data)
  --redo-data      prepare the data again too (implies --retrain)
  --sentencepiece  segment with sentencepiece (vocabulary $BPE_OPS) instead of subword-nmt BPE
                   (kept in its own folder, $WORK/spm)
  -h, --help       show this help

Environment: DEMO_ARCH, DEMO_CRITERION, DEMO_MODEL_ARGS, DEMO_TRAIN_ARGS, DEMO_MAX_UPDATE,
DEMO_MAX_MINUTES,
DEMO_LR, DEMO_WARMUP, DEMO_SCHEDULE (linear or inverse_sqrt), DEMO_MAX_TOKENS, DEMO_DROPOUT, DEMO_BPE_OPS, DEMO_BEAM, DEMO_SEED,
DEMO_WORK, DEMO_DATA (another corpus with the same file names), DEMO_SKIP_SETUP=1 (no
bootstrap) (current: arch=$ARCH criterion=$CRITERION max_update=$MAX_UPDATE).
Afterwards, translate your own German: echo "Ein Hund läuft im Park." | bash scripts/translate.sh
EOF
}

RETRAIN=0
REDO_DATA=0
SEG=bpe
for arg in "$@"; do
    case "$arg" in
        --retrain) RETRAIN=1 ;;
        --redo-data) REDO_DATA=1; RETRAIN=1 ;;
        --sentencepiece) SEG=spm ;;
        -h | --help) usage; exit 0 ;;
        *) echo "[demo] unknown option: $arg (see --help)" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
say() { echo "[demo $(($(date +%s) - T0))s] $*"; }
die() {
    echo "[demo] ERROR: $*" >&2
    exit 1
}
case "$SCHEDULE" in
    linear) SCHEDULE_ARGS=(--lr-scheduler polynomial_decay --total-num-update "$MAX_UPDATE" --end-learning-rate 0 --power 1) ;;
    inverse_sqrt) SCHEDULE_ARGS=(--lr-scheduler inverse_sqrt --warmup-init-lr 1e-07) ;;
    *) die "DEMO_SCHEDULE must be linear or inverse_sqrt, not '$SCHEDULE'" ;;
esac

# ---- 0. setup -----------------------------------------------------------------------------------
if [[ -n "${DEMO_SKIP_SETUP:-}" ]]; then
    say "DEMO_SKIP_SETUP is set: not running scripts/bootstrap.sh"
    [[ -x "$VPY" ]] || die "no Python environment at $VENV (unset DEMO_SKIP_SETUP to create it)"
else
    bash "$ROOT/scripts/bootstrap.sh"
fi
cd "$ROOT"
for f in train val test_2016_flickr; do
    for l in $SRC $TGT; do
        [[ -s "$DATA/$f.$l.gz" ]] || die "missing $DATA/$f.$l.gz (the shipped corpus; see data/multi30k/README.md)"
    done
done
PREP=("$VPY" "$ROOT/fairseq_clusterformer/tools/mt_prep.py")
NCPU="$(nproc 2>/dev/null || echo 1)"
SEGDIR="$WORK/$SEG"
TOK="$WORK/tok"
BIN="$SEGDIR/data-bin"
CKPT="$SEGDIR/checkpoints"
OUT="$SEGDIR/output"
if ((REDO_DATA)); then
    say "--redo-data: removing $TOK and $SEGDIR"
    rm -rf "$TOK" "$SEGDIR"
fi
if ((RETRAIN)) && [[ -d "$CKPT" ]]; then
    say "--retrain: removing the trained model in $CKPT and the old outputs"
    rm -rf "$CKPT" "$OUT"
fi
mkdir -p "$TOK" "$SEGDIR" "$CKPT" "$OUT"
echo "$SEG" >"$WORK/latest"

# ---- 1. tokenise (Moses tokenizer via sacremoses; case kept) -------------------------------------
if [[ -f "$TOK/.done" ]]; then
    say "1/5 tokenised data exists, skipping ($TOK)"
else
    say "1/5 tokenising Multi30k with the Moses tokenizer (sacremoses) -> $TOK"
    for f in train val test_2016_flickr; do
        for l in $SRC $TGT; do
            "${PREP[@]}" tokenize --lang $l --workers "$NCPU" "$DATA/$f.$l.gz" "$TOK/$f.$l"
        done
    done
    touch "$TOK/.done"
fi

# ---- 2. subword segmentation ---------------------------------------------------------------------
if [[ -f "$SEGDIR/.seg.done" ]]; then
    say "2/5 $SEG segmentation exists, skipping ($SEGDIR)"
    if [[ "$(cat "$SEGDIR/.seg.done")" != "$SEG $BPE_OPS" ]]; then
        say "    note: it was made with '$(cat "$SEGDIR/.seg.done")', not '$SEG $BPE_OPS'; --redo-data makes it again"
    fi
else
    if [[ $SEG == bpe ]]; then
        say "2/5 learning a joint BPE ($BPE_OPS merges, subword-nmt) on train.$SRC + train.$TGT"
        "${PREP[@]}" learn-bpe -s "$BPE_OPS" "$TOK/train.$SRC" "$TOK/train.$TGT" "$SEGDIR/code"
        for f in train val test_2016_flickr; do
            for l in $SRC $TGT; do
                "${PREP[@]}" apply-bpe -c "$SEGDIR/code" "$TOK/$f.$l" "$SEGDIR/$f.$l"
            done
        done
    else
        say "2/5 training a joint sentencepiece model (vocabulary $BPE_OPS) on train.$SRC + train.$TGT"
        "${PREP[@]}" spm-train --vocab-size "$BPE_OPS" "$TOK/train.$SRC" "$TOK/train.$TGT" "$SEGDIR/spm"
        for f in train val test_2016_flickr; do
            for l in $SRC $TGT; do
                "${PREP[@]}" spm-encode -m "$SEGDIR/spm.model" "$TOK/$f.$l" "$SEGDIR/$f.$l"
            done
        done
    fi
    echo "$SEG $BPE_OPS" >"$SEGDIR/.seg.done"
fi
if [[ $SEG == bpe ]]; then REMOVE_BPE=(--remove-bpe); else REMOVE_BPE=(--remove-bpe sentencepiece); fi

# ---- 3. binarise ---------------------------------------------------------------------------------
if [[ -f "$BIN/.done" ]]; then
    say "3/5 binarised data exists, skipping ($BIN)"
else
    say "3/5 binarising with fairseq-preprocess --joined-dictionary -> $BIN"
    rm -rf "$BIN"
    fairseq-preprocess --source-lang $SRC --target-lang $TGT \
        --trainpref "$SEGDIR/train" --validpref "$SEGDIR/val" --testpref "$SEGDIR/test_2016_flickr" \
        --destdir "$BIN" --joined-dictionary --workers "$NCPU" 2>"$BIN.log" >>"$BIN.log" ||
        { tail -n 30 "$BIN.log" >&2; die "fairseq-preprocess failed (log: $BIN.log)"; }
    grep -E "\[(de|en)\] .*(Dictionary|sents)" "$BIN.log" | sed -E 's/^.*(\| INFO \| fairseq_cli.preprocess \| |INFO:fairseq_cli.preprocess:)/    /' || true
    touch "$BIN/.done"
fi

# ---- 4. train ------------------------------------------------------------------------------------
TRAIN_CMD=(fairseq-train "$BIN" --user-dir fairseq_clusterformer
    --arch "$ARCH" "${MODEL_ARGS[@]}" --share-all-embeddings
    --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0
    --lr "$LR" --warmup-updates "$WARMUP" "${SCHEDULE_ARGS[@]}"
    --dropout "$DROPOUT" --weight-decay 0.0001
    --criterion "$CRITERION" --label-smoothing 0.1
    --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --required-batch-size-multiple 1
    --stop-time-hours "$(awk "BEGIN {print $MAX_MINUTES / 60}")"
    --save-dir "$CKPT" --no-epoch-checkpoints --save-interval-updates 250 --keep-interval-updates 1
    --seed "$SEED" --cpu --num-workers 0
    --log-format simple --log-interval 50 --no-progress-bar
    "${EXTRA_TRAIN_ARGS[@]}")
# fairseq's log lines -> one short progress line every 50 updates, validation results, errors.
PROGRESS_FILTER='
import re, sys
for line in sys.stdin:
    m = re.search(r"\| epoch (\d+):\s+\d+ / \d+ (.*)$", line)
    if m:
        kv = dict(x.split("=", 1) for x in m.group(2).split(", ") if "=" in x)
        print("    update %s/%s  epoch %d  loss %s  ppl %s  %s updates/s  %s s" % (kv.get("num_updates"),
              sys.argv[1], int(m.group(1)), kv.get("loss"), kv.get("ppl"), kv.get("ups"), kv.get("wall")))
        continue
    m = re.search(r"\| valid on .valid. subset \| (.*)$", line)
    if m:
        kv = dict(x.split(" ", 1) for x in m.group(1).split(" | ") if " " in x)
        print("    validation after update %s: loss %s  ppl %s" % (kv.get("num_updates"), kv.get("loss"), kv.get("ppl")))
    elif "done training" in line or "Stopping training" in line or re.search(r"Error|error:|Traceback", line):
        print("    " + line.split(" | ")[-1].rstrip())
'
TRAIN_LOG="$CKPT/train.log"
if [[ -f "$CKPT/.done" ]]; then
    say "4/5 trained model exists, skipping training ($CKPT/checkpoint_last.pt; --retrain trains again)"
    if [[ "$(cat "$CKPT/.done")" != "${TRAIN_CMD[*]}" ]]; then
        say "    note: it was trained with other settings than the current ones:"
        echo "      then: $(cat "$CKPT/.done")"
        echo "      now:  ${TRAIN_CMD[*]}"
        say "    pass --retrain to train with the current settings"
    fi
else
    if [[ -f "$CKPT/checkpoint_last.pt" ]]; then
        say "4/5 resuming the interrupted training from $CKPT/checkpoint_last.pt"
    else
        say "4/5 training $ARCH ($CRITERION) on the CPU for $MAX_UPDATE updates; progress every 50 updates"
    fi
    echo "    ${TRAIN_CMD[*]}"
    t_train=$(date +%s)
    # fairseq logs to stderr; show the progress lines, keep everything in train.log.
    set +e
    "${TRAIN_CMD[@]}" 2>&1 | tee -a "$TRAIN_LOG" |
        "$VPY" -u -c "$PROGRESS_FILTER" "$MAX_UPDATE"
    rc=${PIPESTATUS[0]}
    set -e
    ((rc == 0)) || die "fairseq-train failed (exit $rc); the end of $TRAIN_LOG:
$(tail -n 25 "$TRAIN_LOG")"
    grep -q "done training" "$TRAIN_LOG" || die "fairseq-train did not finish (see $TRAIN_LOG)"
    [[ -f "$CKPT/checkpoint_last.pt" ]] || die "no checkpoint written in $CKPT"
    printf '%s\n' "${TRAIN_CMD[*]}" >"$CKPT/.done"
    n_upd=$(grep -oE "num_updates[ =][0-9]+" "$TRAIN_LOG" | tail -n 1 | grep -oE "[0-9]+$" || echo "?")
    say "4/5 training took $(($(date +%s) - t_train))s (fairseq start-up included), $n_upd updates"
fi

# ---- 5. translate test_2016 and score ------------------------------------------------------------
N_TEST=$(wc -l <"$SEGDIR/test_2016_flickr.$SRC")
if [[ -f "$OUT/.done" ]]; then
    say "5/5 translations exist, skipping ($OUT/hyp.detok.$TGT)"
else
    say "5/5 translating all $N_TEST sentences of test_2016_flickr (beam $BEAM)"
    fairseq-generate "$BIN" --user-dir fairseq_clusterformer --path "$CKPT/checkpoint_last.pt" \
        --gen-subset test --source-lang $SRC --target-lang $TGT --beam "$BEAM" "${REMOVE_BPE[@]}" \
        --max-len-a 1.2 --max-len-b 10 --batch-size 128 --required-batch-size-multiple 1 --cpu --num-workers 0 \
        >"$OUT/generate.out" 2>"$OUT/generate.log" ||
        { tail -n 25 "$OUT/generate.log" >&2; die "fairseq-generate failed (log: $OUT/generate.log)"; }
    n_h=$(grep -c '^H-' "$OUT/generate.out" || true)
    ((n_h == N_TEST)) || die "fairseq-generate translated $n_h of $N_TEST test sentences (see $OUT/generate.out)"
    "${PREP[@]}" hyps-refs --expect "$N_TEST" "$OUT/generate.out" "$OUT/hyp.tok.$TGT" "$OUT/ref.tok.$TGT" "$OUT/src.tok.$SRC" 2>/dev/null ||
        die "the hypotheses in $OUT/generate.out do not cover ids 0..$((N_TEST - 1))"
    "${PREP[@]}" detokenize --lang $TGT "$OUT/hyp.tok.$TGT" "$OUT/hyp.detok.$TGT" 2>/dev/null
    touch "$OUT/.done"
fi
zcat "$DATA/test_2016_flickr.$TGT.gz" >"$OUT/ref.$TGT"
zcat "$DATA/test_2016_flickr.$SRC.gz" >"$OUT/src.$SRC"
n_hyp=$(wc -l <"$OUT/hyp.detok.$TGT")
((n_hyp == N_TEST)) || die "$OUT/hyp.detok.$TGT has $n_hyp lines, expected $N_TEST"

echo
echo "Sample translations (test_2016_flickr):"
for i in 1 2 3 $(((N_TEST + 1) / 2)) "$N_TEST"; do
    echo "  source:     $(sed -n "${i}p" "$OUT/src.$SRC")"
    echo "  reference:  $(sed -n "${i}p" "$OUT/ref.$TGT")"
    echo "  hypothesis: $(sed -n "${i}p" "$OUT/hyp.detok.$TGT")"
    echo
done
grep -E '^Generate test with beam' "$OUT/generate.out" | sed 's/^/  fairseq-generate (tokenised BLEU): /' || true
sacrebleu "$OUT/ref.$TGT" -i "$OUT/hyp.detok.$TGT" -m bleu >"$OUT/sacrebleu.json" ||
    die "sacrebleu failed"
BLEU=$("$VPY" -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["score"])' "$OUT/sacrebleu.json")
echo "  sacrebleu signature: $("$VPY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["signature"], "|", d["verbose_score"])' "$OUT/sacrebleu.json")"
echo
echo "Model:        $CKPT/checkpoint_last.pt (dictionary and data: $BIN)"
echo "Outputs:      $OUT (generate.out, hyp.detok.$TGT = detokenised translations, sacrebleu.json)"
echo "Translate:    echo 'Zwei Hunde spielen im Schnee.' | bash scripts/translate.sh"
echo "Total time:   $(($(date +%s) - T0))s"
echo "demo BLEU (sacrebleu, Multi30k test_2016, de-en): $BLEU"
