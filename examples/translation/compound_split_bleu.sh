#!/usr/bin/env bash
# Tokenised BLEU with compound splitting, the convention behind the WMT14 en-de numbers of
# "Attention Is All You Need", "Scaling Neural Machine Translation" and fairseq
# (fairseq's scripts/compound_split_bleu.sh, which the pip package does not ship):
#
#   every hyphen between two non-space characters, "a-b", becomes "a ##AT##-##AT## b" in both the
#   hypotheses and the references, i.e.  perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'
#   then BLEU-4 on the tokenised text (fairseq-score, the same statistic as multi-bleu.perl).
#
# Usage: bash examples/translation/compound_split_bleu.sh GENERATE_OUTPUT [EXPECTED_SENTENCES]
#   GENERATE_OUTPUT  what `fairseq-generate ... --remove-bpe --required-batch-size-multiple 1`
#                    printed (H-/T- lines; hydra's warnings in it are ignored)
#   EXPECTED_SENTENCES  optional: fail unless exactly this many hypotheses (3003 for newstest2014)
# Writes GENERATE_OUTPUT.sys and GENERATE_OUTPUT.ref (compound-split) next to it.
set -euo pipefail
RECIPE_NAME=compound_split_bleu
source "$(dirname "${BASH_SOURCE[0]}")/_recipe_lib.sh"

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 1 || exit 0
fi
GEN="$1"
[[ -f "$GEN" ]] || die "no such file: $GEN"
expect=()
[[ -n "${2:-}" ]] && expect=(--expect "$2")
SYS="$GEN.sys"
REF="$GEN.ref"
prep hyps-refs "${expect[@]}" "$GEN" "$SYS.nosplit" "$REF.nosplit" 2>/dev/null ||
    die "$GEN does not hold the expected hypotheses (did fairseq-generate finish? pass --required-batch-size-multiple 1)"
[[ -s "$SYS.nosplit" ]] || die "no H- lines in $GEN"
prep compound-split "$SYS.nosplit" "$SYS" 2>/dev/null
prep compound-split "$REF.nosplit" "$REF" 2>/dev/null
rm -f "$SYS.nosplit" "$REF.nosplit"
FAIRSEQ_SCORE="$(dirname "$PY")/fairseq-score"
[[ -x "$FAIRSEQ_SCORE" ]] || FAIRSEQ_SCORE="$(command -v fairseq-score || true)"
[[ -n "$FAIRSEQ_SCORE" ]] || die "fairseq-score not found (is fairseq installed for $PY?)"
"$FAIRSEQ_SCORE" --sys "$SYS" --ref "$REF" 2>/dev/null | grep -E '^BLEU'
