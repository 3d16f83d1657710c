#!/usr/bin/env python3
"""Measure how faithfully the Python recipe steps (mt_prep.py) reproduce fairseq's Perl-based
preparation, on the reference data available offline (../shared/data):

1. IWSLT14 dev/test XML -> number of segments per set and language, against the reference
   tokenised files (``iwslt14/tok/IWSLT14.*``), which fairseq's grep/sed pipeline produced.
2. Moses tokenisation + lowercasing of those segments -> exact-match rate per line against the
   reference tokenised files.
3. subword-nmt BPE with the reference codes (``iwslt14/code``) applied to the reference tokenised
   test/valid -> exact-match rate against the reference BPE'd ``test``/``valid``.
4. The whole chain, raw XML -> tokenised, lowercased, BPE'd test set (dev2010 + TEDX.dev2012 +
   tst2010-2012, in fairseq's order) -> exact-match rate against ``iwslt14/test.{de,en}``.

Usage:  python -m scripts.check_offline [--data ../shared/data] [--show-diffs N]
"""

import argparse
import sys
import time
from pathlib import Path

from fairseq_clusterformer.tools import mt_prep

IWSLT_SETS = [  # fairseq's test set order
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
]
LANGS = ("de", "en")


def _match(ours, ref):
    same = sum(a == b for a, b in zip(ours, ref))
    diffs = [(i, a, b) for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    return same, len(ref), diffs


def iwslt_xml_counts(data):
    """{(set, lang): (segments parsed, reference lines)}"""
    out = {}
    for s in IWSLT_SETS:
        for lang in LANGS:
            segs = list(mt_prep.xml_segs(mt_prep.open_text(data / "iwslt14/orig" / f"{s}.de-en.{lang}.xml")))
            ref = mt_prep.read_lines(data / "iwslt14/tok" / f"{s}.de-en.{lang}")
            out[(s, lang)] = (len(segs), len(ref))
    return out


def iwslt_tokenized(data, lang):
    """Our tokenised+lowercased test set (fairseq order) for LANG, per set: {set: lines}"""
    return {
        s: list(
            mt_prep.tokenize(
                mt_prep.xml_segs(mt_prep.open_text(data / "iwslt14/orig" / f"{s}.de-en.{lang}.xml")),
                lang,
                lowercase=True,
            )
        )
        for s in IWSLT_SETS
    }


def iwslt_tok_match(data, tokenized=None):
    """{(set, lang): (same, total, diffs)} for tokenisation + lowercasing."""
    out = {}
    for lang in LANGS:
        per_set = tokenized[lang] if tokenized else iwslt_tokenized(data, lang)
        for s in IWSLT_SETS:
            ref = mt_prep.read_lines(data / "iwslt14/tok" / f"{s}.de-en.{lang}")
            out[(s, lang)] = _match(per_set[s], ref)
    return out


def iwslt_bpe_match(data):
    """{(split, lang): (same, total, diffs)}: reference codes on the reference tokenised text."""
    out = {}
    for split in ("test", "valid"):
        for lang in LANGS:
            tok = mt_prep.read_lines(data / "iwslt14/tok" / f"{split}.{lang}")
            ref = mt_prep.read_lines(data / "iwslt14" / f"{split}.{lang}")
            ours = list(mt_prep.apply_bpe(tok, data / "iwslt14/code"))
            out[(split, lang)] = _match(ours, ref)
    return out


def iwslt_chain_match(data, tokenized=None):
    """{lang: (same, total, diffs)}: raw XML -> tok -> lowercase -> BPE vs iwslt14/test.LANG."""
    out = {}
    for lang in LANGS:
        per_set = tokenized[lang] if tokenized else iwslt_tokenized(data, lang)
        tok = [line for s in IWSLT_SETS for line in per_set[s]]
        ours = list(mt_prep.apply_bpe(tok, data / "iwslt14/code"))
        out[lang] = _match(ours, mt_prep.read_lines(data / "iwslt14" / f"test.{lang}"))
    return out


def _pct(a, b):
    return f"{a}/{b} = {100.0 * a / b:.2f}%"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, required=True, help="the folder holding iwslt14/ and wmt/ (e.g. ../shared/data)"
    )
    p.add_argument("--show-diffs", type=int, default=3, help="differing lines to print per item")
    a = p.parse_args(argv)
    data = a.data
    if not (data / "iwslt14").is_dir():
        sys.exit(f"reference data not found under {data} (pass --data)")
    t0 = time.time()

    def show(diffs):
        for i, ours, ref in diffs[: a.show_diffs]:
            print(f"      line {i + 1}:\n        ours: {ours[:200]}\n        ref:  {ref[:200]}")

    print("1. IWSLT14 dev/test XML -> segments (ours / reference tokenised file)")
    for (s, lang), (n, ref) in iwslt_xml_counts(data).items():
        print(f"   {s}.{lang}: {n} / {ref} {'ok' if n == ref else 'MISMATCH'}")

    tokenized = {lang: iwslt_tokenized(data, lang) for lang in LANGS}
    print("2. Moses tokenisation + lowercasing (sacremoses) vs iwslt14/tok, exact lines")
    totals = {lang: [0, 0] for lang in LANGS}
    for (s, lang), (same, n, diffs) in iwslt_tok_match(data, tokenized).items():
        totals[lang][0] += same
        totals[lang][1] += n
        print(f"   {s}.{lang}: {_pct(same, n)}")
        show(diffs)
    for lang in LANGS:
        print(f"   all five sets, {lang}: {_pct(*totals[lang])}")

    print("3. BPE (subword-nmt, reference codes) on reference tokenised text vs reference BPE'd text")
    for (split, lang), (same, n, diffs) in iwslt_bpe_match(data).items():
        print(f"   {split}.{lang}: {_pct(same, n)}")
        show(diffs)

    print("4. whole chain: raw XML -> tokenise -> lowercase -> BPE vs iwslt14/test.{de,en}")
    for lang, (same, n, diffs) in iwslt_chain_match(data, tokenized).items():
        print(f"   test.{lang}: {_pct(same, n)}")
        show(diffs)

    print(f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
