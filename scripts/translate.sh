#!/usr/bin/env bash
# Translate German (one sentence a line, on standard input) into English with the model that
# `bash scripts/demo.sh` trained. Same preprocessing as the demo: Moses tokenisation (sacremoses),
# the demo's BPE (or sentencepiece) model, fairseq-interactive (beam 5), detokenisation.
#
# Usage:  echo "Ein Hund rennt über eine Wiese." | bash scripts/translate.sh
#         bash scripts/translate.sh < german.txt > english.txt
# Environment: DEMO_WORK (default: work/demo), DEMO_BEAM (default: 5),
#              TRANSLATE_CHECKPOINT (default: the demo's checkpoint_last.pt)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
die() {
    echo "[translate] ERROR: $*" >&2
    exit 1
}
WORK="${DEMO_WORK:-$ROOT/work/demo}"
BEAM="${DEMO_BEAM:-5}"
SEG="$(cat "$WORK/latest" 2>/dev/null || echo bpe)"
SEGDIR="$WORK/$SEG"
CKPT="${TRANSLATE_CHECKPOINT:-$SEGDIR/checkpoints/checkpoint_last.pt}"
BIN="$SEGDIR/data-bin"

if [[ ! -f "$CKPT" || ! -f "$BIN/dict.de.txt" || ! -f "$SEGDIR/checkpoints/.done" && -z "${TRANSLATE_CHECKPOINT:-}" ]]; then
    die "no trained demo model in $SEGDIR: run bash scripts/demo.sh first"
fi
[[ -x "$VPY" ]] || die "no Python environment at $VENV: run bash scripts/demo.sh first"
PREP=("$VPY" "$ROOT/fairseq_clusterformer/tools/mt_prep.py")
if [[ $SEG == bpe ]]; then
    SEGMENT=("${PREP[@]}" apply-bpe -c "$SEGDIR/code" - -)
    REMOVE_BPE=(--remove-bpe)
else
    SEGMENT=("${PREP[@]}" spm-encode -m "$SEGDIR/spm.model" - -)
    REMOVE_BPE=(--remove-bpe sentencepiece)
fi

cd "$ROOT"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Hypotheses are put back in input order by their ids: one output line per input line.
cat >"$tmp/input.de"
"${PREP[@]}" tokenize --lang de "$tmp/input.de" - 2>/dev/null | "${SEGMENT[@]}" 2>/dev/null >"$tmp/input.seg"
n=$(wc -l <"$tmp/input.seg")
((n > 0)) || exit 0
fairseq-interactive "$BIN" --user-dir fairseq_clusterformer --path "$CKPT" \
    --source-lang de --target-lang en --beam "$BEAM" "${REMOVE_BPE[@]}" --max-len-a 1.2 --max-len-b 10 \
    --buffer-size 64 --batch-size 32 --cpu --input "$tmp/input.seg" \
    >"$tmp/interactive.out" 2>"$tmp/interactive.log" ||
    { tail -n 20 "$tmp/interactive.log" >&2; die "fairseq-interactive failed"; }
"$VPY" - "$tmp/interactive.out" "$n" >"$tmp/hyp.tok" <<'EOF'
import re, sys
hyps = {}
for line in open(sys.argv[1], encoding="utf-8"):
    m = re.match(r"^H-(\d+)\t[^\t]*\t(.*)$", line.rstrip("\n"))
    if m:
        hyps.setdefault(int(m.group(1)), m.group(2))
for i in range(int(sys.argv[2])):
    print(hyps.get(i, ""))
EOF
"${PREP[@]}" detokenize --lang en "$tmp/hyp.tok" - 2>/dev/null
