#!/usr/bin/env bash
# IWSLT'14 German-English, prepared exactly like fairseq's examples/translation/prepare-iwslt14.sh
# (itself adapted from MIXER's prepareData.sh), with Python tools from PyPI instead of cloned
# Moses/subword-nmt repositories:
#
#   download de-en.tgz -> train.tags: drop <url>/<talkid>/<keywords> lines, strip <title>/<description>
#   -> Moses tokenizer (sacremoses) -> clean-corpus-n (ratio 1.5, 1-175 words) -> lowercase
#   dev/test XML: <seg> lines, ’ -> ' -> tokenize -> lowercase
#   valid = every 23rd line of train; test = dev2010 + TEDX.dev2012 + tst2010 + tst2011 + tst2012
#   joint BPE, 10000 merges (subword-nmt) learned on train.de + train.en, applied to everything
#
# Usage:
#   bash examples/translation/prepare-iwslt14.sh [--sentencepiece] [--help]
#
# Environment (all optional):
#   ORIG=DIR        raw data folder (default: ./orig). The archive is downloaded to DIR/de-en.tgz
#                   unless DIR already holds it, or its extracted de-en/ folder, or the raw files
#                   (train.tags.de-en.{de,en}, IWSLT14.TED*.de-en.{de,en}.xml) directly.
#   PREP=DIR        output folder (default: ./iwslt14.tokenized.de-en), intermediate files in DIR/tmp
#   BPE_TOKENS=N    BPE merges, or the sentencepiece vocabulary size (default: 10000)
#   SENTENCEPIECE=1 same as --sentencepiece: a joint sentencepiece model (PREP/spm.model) on the
#                   tokenised, lowercased text instead of subword-nmt BPE; then use
#                   `--remove-bpe sentencepiece` instead of `--remove-bpe` when generating
#   WORKERS=N       processes for tokenisation (default: number of CPUs)
#   PYTHON=PATH     interpreter with sacremoses and subword-nmt (default: the repo's .venv, or python3)
#
# Every step leaves a marker in PREP/tmp/markers; rerunning the script skips finished steps.
# Output: PREP/{train,valid,test}.{de,en} and PREP/code (BPE codes) - binarise them with
#   fairseq-preprocess --source-lang de --target-lang en --trainpref PREP/train --validpref PREP/valid \
#       --testpref PREP/test --destdir data-bin/iwslt14.tokenized.de-en --joined-dictionary --workers 8
set -euo pipefail
RECIPE_NAME=prepare-iwslt14
source "$(dirname "${BASH_SOURCE[0]}")/_recipe_lib.sh"

URL="http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
GZ=de-en.tgz
src=de
tgt=en
lang=de-en
BPE_TOKENS="${BPE_TOKENS:-10000}"
ORIG="${ORIG:-orig}"
PREP="${PREP:-iwslt14.tokenized.de-en}"
SEG=bpe
[[ "${SENTENCEPIECE:-0}" == 1 ]] && SEG=spm

for arg in "$@"; do
    case "$arg" in
        --sentencepiece) SEG=spm ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$arg' (see --help)" ;;
    esac
done

need_python_packages sacremoses subword_nmt
[[ $SEG == spm ]] && need_python_packages sentencepiece
tmp="$PREP/tmp"
MARKERS="$tmp/markers"
mkdir -p "$ORIG" "$tmp" "$MARKERS"

# ---- download (or use the pre-downloaded raw files) -----------------------------------------------
find_raw() {
    local d
    for d in "$ORIG/$lang" "$ORIG"; do
        if [[ -f "$d/train.tags.$lang.$src" && -f "$d/train.tags.$lang.$tgt" ]] &&
            compgen -G "$d/IWSLT14.TED*.$lang.$src.xml" >/dev/null; then
            RAW="$d"
            return 0
        fi
    done
    return 1
}
if ! find_raw; then
    fetch "$URL" "$ORIG/$GZ"
    check_tgz "$ORIG/$GZ" || die "$ORIG/$GZ is not a complete .tgz archive; delete it and rerun"
    say "extracting $ORIG/$GZ"
    tar -xzf "$ORIG/$GZ" -C "$ORIG" || die "could not extract $ORIG/$GZ"
    find_raw || die "$ORIG/$GZ did not contain $lang/train.tags.$lang.{$src,$tgt} and the IWSLT14.TED*.xml files"
fi
say "raw data: $RAW"

# ---- train: untag, tokenise, clean, lowercase -----------------------------------------------------
tokenize_train() {
    local l
    for l in $src $tgt; do
        prep train-tags "$RAW/train.tags.$lang.$l" - |
            prep tokenize --lang $l --workers "$WORKERS" - "$tmp/train.tags.$lang.tok.$l"
    done
}
run_step train-tokenize tokenize_train
run_step train-clean prep clean --ratio 1.5 "$tmp/train.tags.$lang.tok" $src $tgt "$tmp/train.tags.$lang.clean" 1 175
lowercase_train() {
    local l
    for l in $src $tgt; do
        prep lowercase "$tmp/train.tags.$lang.clean.$l" "$tmp/train.tags.$lang.$l"
    done
}
run_step train-lowercase lowercase_train

# ---- valid/test XML ------------------------------------------------------------------------------
prepare_xml() {
    local l o fname
    for l in $src $tgt; do
        for o in "$RAW"/IWSLT14.TED*.$l.xml; do
            fname=${o##*/}
            prep xml-segs "$o" - | prep tokenize --lang $l --lowercase - "$tmp/${fname%.*}"
        done
    done
}
run_step dev-test prepare_xml

# ---- train/valid/test ----------------------------------------------------------------------------
make_splits() {
    local l s
    for l in $src $tgt; do
        prep split --every 23 "$tmp/train.tags.$lang.$l" "$tmp/train.$l" "$tmp/valid.$l"
        for s in IWSLT14.TED.dev2010 IWSLT14.TEDX.dev2012 IWSLT14.TED.tst2010 IWSLT14.TED.tst2011 IWSLT14.TED.tst2012; do
            [[ -f "$tmp/$s.$lang.$l" ]] || die "missing $tmp/$s.$lang.$l (was $RAW/$s.$lang.$l.xml there?)"
        done
        cat "$tmp/IWSLT14.TED.dev2010.$lang.$l" \
            "$tmp/IWSLT14.TEDX.dev2012.$lang.$l" \
            "$tmp/IWSLT14.TED.tst2010.$lang.$l" \
            "$tmp/IWSLT14.TED.tst2011.$lang.$l" \
            "$tmp/IWSLT14.TED.tst2012.$lang.$l" \
            >"$tmp/test.$l.part" && mv "$tmp/test.$l.part" "$tmp/test.$l"
    done
}
run_step splits make_splits

# ---- subword segmentation --------------------------------------------------------------------------
segmentation_key "$SEG-$BPE_TOKENS"
if [[ $SEG == bpe ]]; then
    run_step "bpe-learn-$BPE_TOKENS" prep learn-bpe -s "$BPE_TOKENS" "$tmp/train.$src" "$tmp/train.$tgt" "$PREP/code"
    apply_all() {
        local L f
        for L in $src $tgt; do
            for f in train.$L valid.$L test.$L; do
                prep apply-bpe -c "$PREP/code" --workers "$WORKERS" "$tmp/$f" "$PREP/$f"
            done
        done
    }
    run_step "bpe-apply-$BPE_TOKENS" apply_all
else
    run_step "spm-train-$BPE_TOKENS" prep spm-train --vocab-size "$BPE_TOKENS" "$tmp/train.$src" "$tmp/train.$tgt" "$PREP/spm"
    encode_all() {
        local L f
        for L in $src $tgt; do
            for f in train.$L valid.$L test.$L; do
                prep spm-encode -m "$PREP/spm.model" "$tmp/$f" "$PREP/$f"
            done
        done
    }
    run_step "spm-encode-$BPE_TOKENS" encode_all
fi

say "done: $PREP/{train,valid,test}.{$src,$tgt} ($(wc -l <"$PREP/train.$src") / $(wc -l <"$PREP/valid.$src") / $(wc -l <"$PREP/test.$src") lines)"
