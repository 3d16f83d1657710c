#!/usr/bin/env python3
"""Multi30k pseudo-documents: inputs of 200-500 BPE tokens from the shipped corpus alone.

    python -m scripts.experiments.multi30k_documents prepare [--multi-resolution] [--out DIR]
    DATASET=multi30k-docs bash scripts/experiments/documents_queue.sh      # the study's runs
    DATASET=multi30k-docs-mr bash scripts/experiments/documents_queue.sh   # multi-resolution training

Why a second document set: the IWSLT14 material offline (scripts/experiments/long_documents.py) has
real talks to test on but only about 16,000 training sentences, too few for the study's small
models to translate TED talks well (docs/results.md, "Where attention length matters"). Multi30k's
29,000 training captions train the same models to about 40 BLEU at the sentence level, so
documents made of them test what the document study asks, whether an attention that cannot see the
whole input keeps the translation quality of one that can, on models that translate well. The
captions of a document are unrelated to each other (no discourse to carry across sentences); what
grows with the document is the input each attention layer has to search: 200-500 tokens, about
20 times Multi30k's sentences. Trained on these documents alone, the study's models do not yet
translate within the `documents` recipe's 2,060 updates (docs/results.md, "Where attention length
matters"). `--multi-resolution` (data set multi30k-docs-mr) also trains on the captions alone and in
groups of 2, 4 and 8, with the same valid and test documents: the multi-resolutional training that
Sun et al. (2022) found to let document models learn to translate, and under which the study's
models do (docs/results.md).

Made from the Multi30k of ``python -m scripts.experiments.prepare_data multi30k`` (built here if
missing: Moses-tokenised, BPE'd with the study's 8,000-merge codes, from data/multi30k of this
checkout, no other source): each split's captions in corpus order, cut into documents of
consecutive captions by long_documents.chunk with this module's bounds (8-20 captions, 200-500
source tokens; a caption that starts no valid document is dropped). train = train, valid = val,
test = test_2016_flickr (label test_2016), test1 = test_2017_flickr (label test_2017). A document's
line is its captions joined by a space, on both sides; its reference is the raw captions (cased,
untokenised, as the sentence-level study's) joined the same way, gzipped to
docs/results/refs/multi30k-docs.<label>.ref.en.gz so that the committed translations rescore without
rebuilding anything. Output folder:

    raw/{train,valid,test,test1}.{de,en}   one document a line, BPE'd
    raw/{test_2016,test_2017}.ref.en       the references (also committed, gzipped)
    counts.json                            documents, captions and token lengths per split, the rule
    data-bin/, data-bin.source             fairseq-preprocess --joined-dictionary; the digest of raw/ it
                                           was made from (a changed raw/ rebuilds it)
    dataset.json                           what run_side_by_side.load_dataset reads (name "multi30k-docs",
                                           or "multi30k-docs-mr" with --multi-resolution)
"""

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from fairseq_clusterformer.tools import mt_prep

from . import long_documents, prepare_data
from .expkit import REPO

NAME = "multi30k-docs"
# --multi-resolution: the training captions also in consecutive groups of these sizes, besides the
# documents (multi-resolutional training, Sun et al. 2022, "Rethinking Document-level Neural
# Machine Translation": models trained on long documents alone can fail to learn to translate;
# shorter groups of the same text teach the alignment). Valid and test stay the documents.
RESOLUTIONS = (1, 2, 4, 8)
NAME_MR = "multi30k-docs-mr"
SENTENCES = REPO / "work" / "experiments" / "data" / "multi30k"
REFS = REPO / "docs" / "results" / "refs"
SRC, TGT = "de", "en"
# The document rule: long_documents.chunk's, with at most 20 captions (Multi30k's captions are
# about 14 BPE tokens, so 20 give documents of about 280 tokens and each test set about 50).
MIN_SENTS, MAX_SENTS = 8, 20
MIN_TOKENS, MAX_TOKENS = long_documents.MIN_TOKENS, long_documents.MAX_TOKENS
# fairseq split -> (Multi30k file stem, test label or None)
SPLITS = {
    "train": ("train", None),
    "valid": ("val", None),
    "test": ("test_2016_flickr", "test_2016"),
    "test1": ("test_2017_flickr", "test_2017"),
}


def say(msg):
    print(f"[multi30k_documents] {msg}", flush=True)


def groups_of(lines, size):
    """LINES in consecutive groups of SIZE joined by a space (the last group may be shorter)."""
    return [" ".join(lines[i : i + size]) for i in range(0, len(lines), size)]


def build_raw(sentences, out, raw_corpus=prepare_data.MULTI30K, resolutions=()):
    """raw/ (documents of SENTENCES's BPE'd captions; with RESOLUTIONS, the training captions also
    in groups of each of those sizes), the references, counts.json."""
    raw = Path(out) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rule = {"sentences": [MIN_SENTS, MAX_SENTS], "source_tokens": [MIN_TOKENS, MAX_TOKENS]}
    rule["train_resolutions"] = list(resolutions)
    counts = {"name": NAME_MR if resolutions else NAME, "rule": rule, "splits": {}}
    for split, (stem, label) in SPLITS.items():
        src = mt_prep.read_lines(Path(sentences) / "bpe" / f"{stem}.{SRC}")
        tgt = mt_prep.read_lines(Path(sentences) / "bpe" / f"{stem}.{TGT}")
        if len(src) != len(tgt) or not src:
            raise SystemExit(f"multi30k_documents: {stem}: {len(src)} source and {len(tgt)} target captions")
        spans, dropped = long_documents.chunk(
            [len(line.split()) for line in src], MIN_SENTS, MAX_SENTS, MIN_TOKENS, MAX_TOKENS
        )
        src_docs = [" ".join(src[a:b]) for a, b in spans]
        tgt_docs = [" ".join(tgt[a:b]) for a, b in spans]
        if split == "train":  # the shorter groups first; fairseq shuffles the training pairs anyway
            src_docs = [g for size in resolutions for g in groups_of(src, size)] + src_docs
            tgt_docs = [g for size in resolutions for g in groups_of(tgt, size)] + tgt_docs
        longest = max(len(d.split()) for d in src_docs + tgt_docs)
        if longest + 1 > long_documents.MAX_POSITIONS:
            raise SystemExit(f"multi30k_documents: {split}: a document of {longest} tokens does not fit the positions")
        mt_prep.write_lines(raw / f"{split}.{SRC}", src_docs)
        mt_prep.write_lines(raw / f"{split}.{TGT}", tgt_docs)
        src_len, tgt_len = [len(d.split()) for d in src_docs], [len(d.split()) for d in tgt_docs]
        counts["splits"][split] = {
            "file": stem,
            "documents": len(spans),
            "training_pairs": len(src_docs),
            "sentences": sum(b - a for a, b in spans),
            "sentences_available": len(src),
            "sentences_dropped": len(dropped),
            "src_tokens": long_documents._stats(src_len),
            "tgt_tokens": long_documents._stats(tgt_len),
            "targets_over_generate_bound": sum(
                b > long_documents.LEN_A * a + long_documents.LEN_B for a, b in zip(src_len, tgt_len)
            ),
        }
        if label:
            refs = mt_prep.read_lines(Path(raw_corpus) / f"{stem}.{TGT}.gz")
            if len(refs) != len(src):
                raise SystemExit(f"multi30k_documents: {stem}: {len(refs)} references for {len(src)} captions")
            mt_prep.write_lines(raw / f"{label}.ref.{TGT}", [" ".join(refs[a:b]) for a, b in spans])
        c = counts["splits"][split]
        say(
            f"{split} ({stem}): {c['documents']} documents, {c['sentences']} of {len(src)} captions "
            f"({len(dropped)} dropped); source tokens {c['src_tokens']}"
        )
    (Path(out) / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def write_dataset_json(out, counts, data_bin, refs_dir=REFS):
    out = Path(out)
    tests = []
    for split, (_stem, label) in SPLITS.items():
        if label:
            ref = long_documents.commit_reference(
                out / "raw" / f"{label}.ref.{TGT}", Path(refs_dir) / f"{NAME}.{label}.ref.en.gz"
            )
            tests.append({"subset": split, "label": label, "ref": str(ref)})
    c = counts["splits"]
    resolutions = counts["rule"].get("train_resolutions") or []
    also = (
        f" (and the training captions in groups of {', '.join(map(str, resolutions))}: "
        f"{c['train']['training_pairs']} training pairs)"
        if resolutions
        else ""
    )
    meta = {
        "name": counts["name"],
        "description": "Multi30k de-en pseudo-documents (scripts/experiments/multi30k_documents.py): "
        f"{MIN_SENTS}-{MAX_SENTS} consecutive captions of {MIN_TOKENS}-{MAX_TOKENS} BPE tokens (source); train "
        f"{c['train']['documents']}{also}, valid {c['valid']['documents']}, test_2016 {c['test']['documents']}, "
        f"test_2017 {c['test1']['documents']} documents",
        "src": SRC,
        "tgt": TGT,
        "data_bin": str(data_bin),
        "remove_bpe": "subword_nmt",
        "detok_lang": TGT,
        "tests": tests,
        "generate_args": long_documents.generate_args(),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(f"wrote {out / 'dataset.json'}")
    return meta


def prepare(out=None, sentences=SENTENCES, refs_dir=REFS, multi_resolution=False):
    name = NAME_MR if multi_resolution else NAME
    out = REPO / "work" / "experiments" / "data" / name if out is None else out
    out, sentences = Path(out).resolve(), Path(sentences).resolve()
    if not (sentences / "dataset.json").exists():
        say(f"building the sentence-level Multi30k first: {sentences}")
        prepare_data.prepare_multi30k(sentences)
    out.mkdir(parents=True, exist_ok=True)
    counts = build_raw(sentences, out, resolutions=RESOLUTIONS if multi_resolution else ())
    # prepare_data.binarise reuses a finished data-bin/: drop it when the documents changed
    digest = hashlib.sha256(
        b"".join((out / "raw" / f"{split}.{lang}").read_bytes() for split in SPLITS for lang in (SRC, TGT))
    ).hexdigest()
    stamp = out / "data-bin.source"
    if not stamp.exists() or stamp.read_text().strip() != digest:
        shutil.rmtree(out / "data-bin", ignore_errors=True)
    data_bin = prepare_data.binarise(out / "raw", out / "data-bin", SRC, TGT, tests=("test", "test1"))
    stamp.write_text(digest + "\n")
    return write_dataset_json(out, counts, data_bin, refs_dir)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="build the pseudo-document data set (reuses the sentence-level data)")
    s.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default: work/experiments/data/{NAME} or {NAME_MR})"
    )
    s.add_argument(
        "--sentences", type=Path, default=SENTENCES, help="the prepared sentence-level Multi30k (default: %(default)s)"
    )
    s.add_argument(
        "--multi-resolution",
        action="store_true",
        help=f"data set {NAME_MR}: also train on the captions in groups of {', '.join(map(str, RESOLUTIONS))}",
    )
    a = p.parse_args(argv)
    prepare(a.out, a.sentences, multi_resolution=a.multi_resolution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
