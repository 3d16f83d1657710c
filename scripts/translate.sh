#!/usr/bin/env bash
# Translate German (one sentence a line, on standard input) into English with the model that
# `bash scripts/demo.sh` trained. Same preprocessing as the demo: Moses tokenisation (sacremoses),
# the demo's BPE (or sentencepiece) model, fairseq-interactive (beam 5), detokenisation.
#
# Usage:  echo "Ein Hund rennt über eine Wiese." | bash scripts/translate.sh
#         bash scripts/translate.sh < german.txt > english.txt
# Environment: DEMO_WORK (default: work/demo), DEMO_BEAM (default: 5),
#              TRANSLATE_CHECKPOINT (default: the demo's checkpoint_last.pt),
#              TRANSLATE_MAX_TOKENS (default: 1000 subword tokens; longer lines are cut)
#
# Any input gives exactly one output line per input line, in order (a line ends at "\n" only;
# Windows line endings are fine). Bytes that are not UTF-8 become U+FFFD; control characters (a
# lone "\r" too) become spaces; an empty or blank line gives an empty line; a line longer than
# TRANSLATE_MAX_TOKENS subwords is cut to them. Each is reported on standard error by line number.
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

MAX_TOKENS="${TRANSLATE_MAX_TOKENS:-1000}"  # below the demo model's 1024 positions (with </s>)
[[ $MAX_TOKENS =~ ^[1-9][0-9]*$ ]] || die "TRANSLATE_MAX_TOKENS must be a positive integer, got '$MAX_TOKENS'"

# The input guard, in three steps: clean (bytes -> one sanitised line per input line), select
# (the segmented lines the model is given, each cut to MAX_TOKENS; blank ones are not), collect
# (one hypothesis per input line, by id). Messages name input line numbers, from 1.
read -r -d '' GUARD <<'EOF' || true
import re, sys, unicodedata

def say(msg):
    print(f"[translate] {msg}", file=sys.stderr)

def clean(raw, out):
    data = open(raw, "rb").read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start another
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for n, b in enumerate(lines, 1):
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                text = b.decode("utf-8", errors="replace")
                say(f"line {n}: bytes that are not UTF-8 replaced by U+FFFD")
            if b.endswith(b"\r"):
                text = text[:-1]  # Windows line ending
            # Control characters and line/paragraph separators: tools downstream could read them
            # as line breaks (a lone "\r", "\x0b", "\x1c", "\x85", "\u2028") or choke on them.
            fixed = "".join(" " if c != "\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
            if fixed != text:
                say(f"line {n}: control characters replaced by spaces")
            f.write(fixed + "\n")
    print(len(lines))

def select(seg, model_in, ids, max_tokens):
    with open(model_in, "w", encoding="utf-8", newline="\n") as m, open(ids, "w") as idf:
        for n, line in enumerate(open(seg, encoding="utf-8", newline="\n"), 1):
            toks = line.split()
            if not toks:
                say(f"line {n}: empty, not translated (empty output line)")
                continue
            if len(toks) > max_tokens:
                cut = toks[:max_tokens]
                while cut and cut[-1].endswith("@@"):  # do not end inside a BPE-split word
                    cut.pop()
                say(f"line {n}: {len(toks)} subword tokens, cut to the first {len(cut)} (TRANSLATE_MAX_TOKENS={max_tokens})")
                toks = cut
            m.write(" ".join(toks) + "\n")
            idf.write(f"{n}\n")

def collect(out, ids, n_lines):
    hyps = {}
    for line in open(out, encoding="utf-8", errors="replace"):
        m = re.match(r"^H-(\d+)\t[^\t]*\t(.*)$", line.rstrip("\n"))
        if m:
            hyps.setdefault(int(m.group(1)), m.group(2))
    line_of = [int(x) for x in open(ids)]
    by_line = {}
    for i, n in enumerate(line_of):
        if i in hyps:
            by_line[n] = hyps[i]
        else:
            say(f"line {n}: skipped by fairseq-interactive (see its warning), empty output line")
    for n in range(1, int(n_lines) + 1):
        print(by_line.get(n, ""))

cmd, *args = sys.argv[1:]
if cmd == "select":
    select(*args[:3], int(args[3]))
else:
    {"clean": clean, "collect": collect}[cmd](*args)
EOF

cd "$ROOT"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/input.raw"
n=$("$VPY" -c "$GUARD" clean "$tmp/input.raw" "$tmp/input.de")
((n > 0)) || exit 0
"${PREP[@]}" tokenize --lang de "$tmp/input.de" - 2>"$tmp/prep.log" | "${SEGMENT[@]}" 2>>"$tmp/prep.log" >"$tmp/input.seg" ||
    { tail -n 20 "$tmp/prep.log" >&2; die "tokenisation or segmentation failed"; }
(($(wc -l <"$tmp/input.seg") == n)) || die "tokenisation changed the number of lines (bug)"
"$VPY" -c "$GUARD" select "$tmp/input.seg" "$tmp/model.in" "$tmp/model.ids" "$MAX_TOKENS"
if [[ -s "$tmp/model.in" ]]; then
    # --skip-invalid-size-inputs-valid-test: a line still too long for the model is skipped
    # (fairseq warns; `collect` reports it) rather than stopping the whole run.
    fairseq-interactive "$BIN" --user-dir fairseq_clusterformer --path "$CKPT" \
        --source-lang de --target-lang en --beam "$BEAM" "${REMOVE_BPE[@]}" --max-len-a 1.2 --max-len-b 10 \
        --buffer-size 64 --batch-size 32 --cpu --input "$tmp/model.in" --skip-invalid-size-inputs-valid-test \
        >"$tmp/interactive.out" 2>"$tmp/interactive.log" ||
        { tail -n 20 "$tmp/interactive.log" >&2; die "fairseq-interactive failed"; }
    grep -h "WARNING" "$tmp/interactive.log" | grep -i "skip\|invalid" >&2 || true
else
    : >"$tmp/interactive.out"
fi
"$VPY" -c "$GUARD" collect "$tmp/interactive.out" "$tmp/model.ids" "$n" >"$tmp/hyp.tok"
"${PREP[@]}" detokenize --lang en "$tmp/hyp.tok" - 2>/dev/null
