#!/usr/bin/env bash
# WMT'14 English-German, prepared exactly like fairseq's examples/translation/prepare-wmt14en2de.sh,
# with Python tools from PyPI instead of cloned Moses/subword-nmt repositories:
#
#   download Europarl v7, CommonCrawl, News Commentary v12 (v9 with --icml17), dev, test-full
#   train: normalize-punctuation -> remove-non-printing-char -> Moses tokenizer -a (sacremoses)
#   test (newstest2014, full 3003 segments): <seg> lines, ’ -> ' -> Moses tokenizer -a
#   valid = every 100th line of train
#   joint BPE, 40000 merges (subword-nmt) learned on train.en + train.de, applied to everything
#   clean-corpus-n (ratio 1.5, 1-250 tokens) on the BPE'd train and valid; test is kept whole
#
# Usage:
#   bash examples/translation/prepare-wmt14en2de.sh [--icml17] [--sentencepiece] [--help]
#
#   --icml17         News Commentary v9 instead of v12, output folder wmt14_en_de (the data of
#                    "Convolutional Sequence to Sequence Learning" and of most WMT14 en-de papers);
#                    without it the output folder is wmt17_en_de, as in fairseq
#   --sentencepiece  joint sentencepiece model (PREP/spm.model, vocabulary BPE_TOKENS) on the
#                    tokenised text instead of subword-nmt BPE (generate with --remove-bpe sentencepiece)
#
# Environment (all optional):
#   ORIG=DIR        raw data folder (default: ./orig). Archives are downloaded into DIR and extracted
#                   there, unless DIR already holds the extracted files:
#                   training/europarl-v7.de-en.{en,de}, commoncrawl.de-en.{en,de},
#                   training/news-commentary-v12.de-en.{en,de} (v9 with --icml17),
#                   test-full/newstest2014-deen-src.en.sgm, test-full/newstest2014-deen-ref.de.sgm
#   PREP=DIR        output folder (default: wmt14_en_de or wmt17_en_de), intermediate files in DIR/tmp
#   BPE_TOKENS=N    BPE merges, or the sentencepiece vocabulary size (default: 40000)
#   SENTENCEPIECE=1 same as --sentencepiece
#   WORKERS=N       processes for tokenisation and BPE (default: number of CPUs)
#   PYTHON=PATH     interpreter with sacremoses and subword-nmt (default: the repo's .venv, or python3)
#
# Every step leaves a marker in PREP/tmp/markers; rerunning the script skips finished steps.
# BLEU on WMT14 en-de is traditionally reported with compound splitting ("##AT##-##AT##"): see
# README.md in this folder and compound_split_bleu.sh.
set -euo pipefail
RECIPE_NAME=prepare-wmt14en2de
source "$(dirname "${BASH_SOURCE[0]}")/_recipe_lib.sh"

BPE_TOKENS="${BPE_TOKENS:-40000}"
URLS=(
    "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"
    "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz"
    "http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz"
    "http://data.statmt.org/wmt17/translation-task/dev.tgz"
    "http://statmt.org/wmt14/test-full.tgz"
)
FILES=(
    "training-parallel-europarl-v7.tgz"
    "training-parallel-commoncrawl.tgz"
    "training-parallel-nc-v12.tgz"
    "dev.tgz"
    "test-full.tgz"
)
CORPORA=(
    "training/europarl-v7.de-en"
    "commoncrawl.de-en"
    "training/news-commentary-v12.de-en"
)
OUTDIR=wmt17_en_de
SEG=bpe
[[ "${SENTENCEPIECE:-0}" == 1 ]] && SEG=spm
for arg in "$@"; do
    case "$arg" in
        --icml17)
            # This makes the dataset compatible with "Convolutional Sequence to Sequence Learning"
            # (https://arxiv.org/abs/1705.03122).
            URLS[2]="http://statmt.org/wmt14/training-parallel-nc-v9.tgz"
            FILES[2]="training-parallel-nc-v9.tgz"
            CORPORA[2]="training/news-commentary-v9.de-en"
            OUTDIR=wmt14_en_de
            ;;
        --sentencepiece) SEG=spm ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$arg' (see --help)" ;;
    esac
done

src=en
tgt=de
lang=en-de
ORIG="${ORIG:-orig}"
PREP="${PREP:-$OUTDIR}"
tmp="$PREP/tmp"
MARKERS="$tmp/markers"
TEST_SGM=("test-full/newstest2014-deen-src.$src.sgm" "test-full/newstest2014-deen-ref.$tgt.sgm")

need_python_packages sacremoses subword_nmt
[[ $SEG == spm ]] && need_python_packages sentencepiece
mkdir -p "$ORIG" "$tmp" "$MARKERS"

# ---- download (or use the pre-downloaded raw files) -----------------------------------------------
raw_complete() {
    local f l
    for f in "${CORPORA[@]}"; do
        for l in $src $tgt; do
            [[ -s "$ORIG/$f.$l" ]] || return 1
        done
    done
    for f in "${TEST_SGM[@]}"; do
        [[ -s "$ORIG/$f" ]] || return 1
    done
}
if raw_complete; then
    say "raw data found in $ORIG, nothing to download"
else
    for ((i = 0; i < ${#URLS[@]}; ++i)); do
        file=${FILES[i]}
        fetch "${URLS[i]}" "$ORIG/$file"
        if [[ ! -f "$ORIG/.$file.extracted" ]]; then
            check_tgz "$ORIG/$file" || die "$ORIG/$file is not a complete .tgz archive; delete it and rerun"
            say "extracting $file"
            tar -xzf "$ORIG/$file" -C "$ORIG" || die "could not extract $ORIG/$file"
            touch "$ORIG/.$file.extracted"
        fi
    done
    raw_complete || die "after downloading, some raw files are still missing in $ORIG (expected ${CORPORA[*]} .$src/.$tgt and ${TEST_SGM[*]})"
fi

# ---- train: normalise punctuation, remove non-printing characters, tokenise (-a) ------------------
tokenize_train() {
    local l f
    for l in $src $tgt; do
        local ins=()
        for f in "${CORPORA[@]}"; do ins+=("$ORIG/$f.$l"); done
        prep tokenize --lang $l --normalize-punct --remove-non-printing --aggressive-dash \
            --workers "$WORKERS" "${ins[@]}" "$tmp/train.tags.$lang.tok.$l"
    done
}
run_step train-tokenize tokenize_train

# ---- test: newstest2014 (full) -------------------------------------------------------------------
prepare_test() {
    prep xml-segs "$ORIG/${TEST_SGM[0]}" - | prep tokenize --lang $src --aggressive-dash - "$tmp/test.$src"
    prep xml-segs "$ORIG/${TEST_SGM[1]}" - | prep tokenize --lang $tgt --aggressive-dash - "$tmp/test.$tgt"
}
run_step test prepare_test

# ---- train/valid split ---------------------------------------------------------------------------
split_train() {
    local l
    for l in $src $tgt; do
        prep split --every 100 "$tmp/train.tags.$lang.tok.$l" "$tmp/train.$l" "$tmp/valid.$l"
    done
}
run_step splits split_train

# ---- subword segmentation --------------------------------------------------------------------------
segmentation_key "$SEG-$BPE_TOKENS"
if [[ $SEG == bpe ]]; then
    run_step "bpe-learn-$BPE_TOKENS" prep learn-bpe -s "$BPE_TOKENS" "$tmp/train.$src" "$tmp/train.$tgt" "$PREP/code"
    apply_all() {
        local L f
        for L in $src $tgt; do
            for f in train.$L valid.$L test.$L; do
                prep apply-bpe -c "$PREP/code" --workers "$WORKERS" "$tmp/$f" "$tmp/bpe.$f"
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
                prep spm-encode -m "$PREP/spm.model" "$tmp/$f" "$tmp/bpe.$f"
            done
        done
    }
    run_step "spm-encode-$BPE_TOKENS" encode_all
fi

# ---- clean train/valid (after segmentation, as fairseq does); test is kept whole ---------------------
finish() {
    prep clean --ratio 1.5 "$tmp/bpe.train" $src $tgt "$PREP/train" 1 250
    prep clean --ratio 1.5 "$tmp/bpe.valid" $src $tgt "$PREP/valid" 1 250
    local L
    for L in $src $tgt; do
        cp "$tmp/bpe.test.$L" "$PREP/test.$L"
    done
}
run_step "clean-$SEG-$BPE_TOKENS" finish

say "done: $PREP/{train,valid,test}.{$src,$tgt} ($(wc -l <"$PREP/train.$src") / $(wc -l <"$PREP/valid.$src") / $(wc -l <"$PREP/test.$src") lines)"
