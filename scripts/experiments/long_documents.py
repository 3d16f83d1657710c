#!/usr/bin/env python3
"""Document-level IWSLT14 de-en: inputs of 200-500 BPE tokens, where the length of self-attention matters.

Multi30k's sentences are about 13 tokens long, too short for a clustering attention to make any
difference. This builds a data set of documents instead, from the offline IWSLT14 material
(../shared/data/iwslt14; ../shared/data/README.md):

    python -m scripts.experiments.long_documents prepare --out work/experiments/data/iwslt14-docs \\
        [--source ../shared/data/iwslt14]
    python -m scripts.experiments.run_side_by_side run --dataset work/experiments/data/iwslt14-docs \\
        --recipe documents --models clusterformer --seeds 1 ...     # scripts/experiments/documents_queue.sh

Evaluation documents are real talks. Each dev/test set's XML (orig/) gives every talk (<doc docid=...>)
and its number of segments; the talks are mapped onto the lines of the set's tokenised, lowercased
file (tok/: the same segments in the same order; the counts must match exactly), the lines are BPE'd
with the reference codes (subword-nmt, as fairseq's prepare-iwslt14.sh; the result is checked against
the reference test.de/test.en, line for line), and each talk is cut into documents of consecutive
sentences by the rule of :func:`chunk`. valid = the documents of dev2010; test = those of tst2010,
tst2011, tst2012 and TEDX.dev2012 (the rest of fairseq's test set), in that order.

Training documents are pseudo-documents: the training sample has no talk order (train-sample/ holds
random training pairs), so consecutive lines of train-sample/train, then of sample2.de+en.tsv, then of
valid.de/en (fairseq's valid split, taken from the training pool, not from the test talks) are grouped
by the same rule, each file on its own. Exact duplicate pairs (the samples overlap a little) and empty
lines are left out first.

A document's source line is its sentences' BPE'd source lines joined by a space, its target line the
matching target sentences joined the same way. Output folder:

    raw/{train,valid,test}.{de,en}   one document a line, BPE'd
    raw/test.ref.detok.en            the test reference for sacreBLEU (BPE removed, Moses-detokenised),
                                     also gzipped to docs/results/refs/ (the runs' records name that copy)
    raw/documents.tsv                per document: split, set, talk, first and last sentence, lengths
    counts.json                      documents, sentences and token lengths per split, the rule
    data-bin/                        fairseq-preprocess --joined-dictionary
    dataset.json                     what run_side_by_side.load_dataset reads (name "iwslt14-docs")

Every step is reused when its output is complete (a second call redoes nothing).
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from fairseq_clusterformer.tools import mt_prep

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "iwslt14"
DEFAULT_OUT = REPO / "work" / "experiments" / "data" / "iwslt14-docs"
NAME = "iwslt14-docs"
# The test reference the study's records name: committed beside the results (docs/results/refs/README.md
# has its source and license), so that docs/results.md's document scores recompute without the source.
COMMITTED_REF = REPO / "docs" / "results" / "refs" / f"{NAME}.test.ref.detok.en.gz"
SRC, TGT = "de", "en"

# The document rule (on the source side, in BPE tokens, sentences joined by a space).
MIN_SENTS, MAX_SENTS = 8, 16
MIN_TOKENS, MAX_TOKENS = 200, 500
# Positions the model needs: fairseq-train drops a training pair longer than the model's
# --max-source/target-positions with only a warning (trainer.get_train_iterator filters with
# ignore_invalid_inputs=True), so prepare refuses a document whose side plus </s> would not fit.
MAX_POSITIONS = 1024
# fairseq-generate's length bound is --max-len-a * source length + --max-len-b (default 0 and 200:
# shorter than most documents). Set from the training documents, not the test references: the longest
# training target is 1.16 times its source; 1.3 leaves room (counts.json reports any valid or test
# reference above the bound: none is) and bounds the time a looping model spends per document.
LEN_A, LEN_B = 1.3, 10
FORMAT = 4  # of raw/ and counts.json: a change rebuilds them

# fairseq's test set is the concatenation of the sets in this order (prepare-iwslt14.sh);
# test.de/test.en are checked against it.
FAIRSEQ_TEST_ORDER = [
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
]
SPLIT_SETS = {
    "valid": ["IWSLT14.TED.dev2010"],
    "test": ["IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012", "IWSLT14.TEDX.dev2012"],
}
TRAIN_STREAMS = ["train-sample/train", "train-sample/sample2.de+en.tsv", "valid"]


def say(msg):
    print(f"[long_documents] {msg}", flush=True)


class SourceError(SystemExit):
    """The IWSLT14 material is missing or inconsistent (exits with the message)."""


# ---------------------------------------------------------------------------------- the rule


def chunk(lengths, min_sents=MIN_SENTS, max_sents=MAX_SENTS, min_tokens=MIN_TOKENS, max_tokens=MAX_TOKENS):
    """Cut a talk of sentences with these token LENGTHS into documents of consecutive sentences.

    Returns (spans, dropped): spans are half-open (start, end) sentence ranges in order, each of
    MIN_SENTS..MAX_SENTS sentences and MIN_TOKENS..MAX_TOKENS tokens; dropped are the indices of the
    sentences in no document. Greedy and deterministic:

    1. A document starts at the first sentence not yet placed and takes as many following sentences
       as fit under both caps (MAX_SENTS sentences, MAX_TOKENS tokens): long documents, since the
       point is long inputs.
    2. If that document is too small (fewer than MIN_SENTS sentences: the caps were reached by long
       sentences; or fewer than MIN_TOKENS tokens: sixteen very short ones), no document can start at
       that sentence (any other is a prefix of this one): the sentence is dropped and step 1 starts
       again one sentence later.
    3. Leftovers at the end of the talk (too few sentences or tokens for a document of their own)
       are merged with the talk's last document when it ends right before them, by cutting the two
       into two documents again at the valid cut nearest the middle (in sentences; the earlier of
       two equally near). Where no cut gives two valid documents, the leftovers are dropped.
    """
    n = len(lengths)

    def valid(start, end):
        return min_sents <= end - start <= max_sents and min_tokens <= sum(lengths[start:end]) <= max_tokens

    spans, dropped, i = [], [], 0
    while i < n:
        j, tokens = i, 0
        while j < n and j - i < max_sents and tokens + lengths[j] <= max_tokens:
            tokens += lengths[j]
            j += 1
        if valid(i, j):
            spans.append((i, j))
            i = j
            continue
        if j < n or i == j:
            # a sentence that starts no document: too long for MAX_TOKENS alone (i == j), or
            # its longest document is too small; the next one may start a good document
            dropped.append(i)
            i += 1
            continue
        # the leftovers i..n-1: re-cut the last document together with them, if adjacent
        if spans and spans[-1][1] == i:
            start = spans[-1][0]
            middle = (start + n) / 2
            cuts = sorted(range(start + 1, n), key=lambda m: (abs(m - middle), m))
            cut = next((m for m in cuts if valid(start, m) and valid(m, n)), None)
            if cut is not None:
                spans[-1] = (start, cut)
                spans.append((cut, n))
                break
        dropped.extend(range(i, n))
        break
    return spans, dropped


# ------------------------------------------------------------------------------ the talks


def talk_segments(xml_lines):
    """[(docid, number of segments)] of an IWSLT dev/test XML file, in file order. A segment is a
    line holding '<seg id', the lines fairseq's prepare-iwslt14.sh (and mt_prep.xml_segs) keeps, so
    the counts add up to the lines of the set's tokenised file."""
    talks = []
    for no, line in enumerate(xml_lines, start=1):
        if "<doc " in line:
            start = line.find('docid="')
            if start < 0:
                raise ValueError(f"line {no}: a <doc> without docid: {line.strip()[:80]}")
            start += len('docid="')
            talks.append([line[start : line.index('"', start)], 0])
        if "<seg id" in line:
            if not talks:
                raise ValueError(f"line {no}: a <seg> before any <doc>")
            talks[-1][1] += 1
    return [(docid, count) for docid, count in talks]


def split_talks(lines, talks, what):
    """LINES cut into one list per talk of TALKS ([(docid, count)]); the counts must add up exactly."""
    total = sum(count for _, count in talks)
    if total != len(lines):
        raise SourceError(f"{what}: the XML has {total} segments in {len(talks)} talks, the file {len(lines)} lines")
    out, at = [], 0
    for _, count in talks:
        out.append(lines[at : at + count])
        at += count
    return out


def read_set(source, name, codes):
    """The talks of one dev/test set: [{"set", "talk", "src": BPE'd lines, "tgt": ...}], and the
    BPE'd lines of the whole set per language (for the check against test.de/en)."""
    per_lang, bpe_all, ids = {}, {}, None
    for lang in (SRC, TGT):
        xml = source / "orig" / f"{name}.de-en.{lang}.xml"
        talks = talk_segments(mt_prep.open_text(xml))
        if ids is None:
            ids = talks
        elif talks != ids:
            raise SourceError(f"{name}: the talks or their segment counts differ between the de and en XML")
        bpe = list(mt_prep.apply_bpe(mt_prep.open_text(source / "tok" / f"{name}.de-en.{lang}"), codes))
        per_lang[lang] = split_talks(bpe, talks, f"{name}.{lang} (orig/ vs tok/)")
        bpe_all[lang] = bpe
    talks = [
        {"set": name, "talk": docid, "src": s, "tgt": t} for (docid, _), s, t in zip(ids, per_lang[SRC], per_lang[TGT])
    ]
    return talks, bpe_all


def check_bpe(source, bpe_by_set):
    """Our BPE of tok/ must equal the reference test.de/test.en (fairseq's prepare-iwslt14.sh), line
    for line, in fairseq's set order."""
    for lang in (SRC, TGT):
        ours = [line for name in FAIRSEQ_TEST_ORDER for line in bpe_by_set[name][lang]]
        ref = mt_prep.read_lines(source / f"test.{lang}")
        bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
        if len(ours) != len(ref) or bad:
            first = f"; first at line {bad[0] + 1}: {ours[bad[0]]!r} vs {ref[bad[0]]!r}" if bad else ""
            raise SourceError(
                f"BPE of tok/ does not reproduce test.{lang}: {len(ours)} vs {len(ref)} lines, {len(bad)} differ{first}"
            )
    return len(ours)


def training_streams(source):
    """{stream name: [(src, tgt)]}: the BPE'd training pairs, per file in file order, without empty
    lines and without pairs already seen in an earlier line or file."""
    seen, out = set(), {}

    def keep(pairs):
        kept = []
        for a, b in pairs:
            a, b = a.strip(), b.strip()
            if a and b and (a, b) not in seen:
                seen.add((a, b))
                kept.append((a, b))
        return kept

    def paired(prefix):
        a, b = mt_prep.read_lines(f"{prefix}.{SRC}"), mt_prep.read_lines(f"{prefix}.{TGT}")
        if len(a) != len(b):
            raise SourceError(f"{prefix}.{SRC} and .{TGT} differ in length ({len(a)} vs {len(b)})")
        return zip(a, b)

    out["train-sample/train"] = keep(paired(source / "train-sample" / "train"))
    tsv = (line.split("\t", 1) for line in mt_prep.open_text(source / "train-sample" / "sample2.de+en.tsv"))
    out["train-sample/sample2.de+en.tsv"] = keep(p for p in tsv if len(p) == 2)
    out["valid"] = keep(paired(source / "valid"))
    return out


def documents(src_lines, tgt_lines):
    """The documents of one talk (or training stream): [(src, tgt, first, last)] and the dropped
    sentence indices."""
    spans, dropped = chunk([len(line.split()) for line in src_lines])
    docs = [(" ".join(src_lines[a:b]), " ".join(tgt_lines[a:b]), a, b - 1) for a, b in spans]
    return docs, dropped


# ---------------------------------------------------------------------------------- checks


REQUIRED = [
    "orig",
    "tok",
    "train-sample",
    "code",
    "test.de",
    "test.en",
    "valid.de",
    "valid.en",
    *[f"orig/{s}.de-en.{lang}.xml" for s in FAIRSEQ_TEST_ORDER for lang in (SRC, TGT)],
    *[f"tok/{s}.de-en.{lang}" for s in FAIRSEQ_TEST_ORDER for lang in (SRC, TGT)],
    "train-sample/train.de",
    "train-sample/train.en",
    "train-sample/sample2.de+en.tsv",
]


def check_source(source):
    """Exit with a message naming what is missing, if SOURCE is not the offline IWSLT14 material."""
    source = Path(source)
    if not source.is_dir():
        raise SourceError(
            f"long_documents: the IWSLT14 source folder {source} does not exist. It is the offline material "
            "described in ../shared/data/README.md (orig/, tok/, code, test.*, valid.*, train-sample/); "
            "give its location with --source DIR."
        )
    missing = [p for p in REQUIRED if not (source / p).exists()]
    if missing:
        raise SourceError(
            f"long_documents: {source} is not the IWSLT14 material: missing {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} (../shared/data/README.md describes the folder)"
        )
    return source


# ------------------------------------------------------------------------------- the steps


def _stats(values):
    return {"min": min(values), "mean": round(statistics.mean(values), 1), "max": max(values)} if values else None


def _fingerprint(source):
    """What the raw files depend on: the rule, and the source files' sizes."""
    rule = [FORMAT, MIN_SENTS, MAX_SENTS, MIN_TOKENS, MAX_TOKENS, LEN_A, LEN_B, SPLIT_SETS, TRAIN_STREAMS]
    sizes = sorted((p, (source / p).stat().st_size) for p in REQUIRED if (source / p).is_file())
    return hashlib.sha256(json.dumps([rule, sizes]).encode()).hexdigest()[:16]


def build_raw(source, out):
    """raw/ (documents, BPE'd), raw/test.ref.detok.en, raw/documents.tsv and counts.json."""
    raw = out / "raw"
    stamp = _fingerprint(source)
    done = raw / ".done"
    if done.exists() and done.read_text().strip() == stamp and (out / "counts.json").exists():
        say(f"documents exist: {raw} (reused)")
        return json.loads((out / "counts.json").read_text())
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    codes = source / "code"

    bpe_by_set, talks_by_set = {}, {}
    for name in FAIRSEQ_TEST_ORDER:
        say(f"{name}: reading the talks (orig/ XML), BPE'ing their sentences (tok/)")
        talks, bpe_by_set[name] = read_set(source, name, codes)
        talks_by_set[name] = talks
    n_checked = check_bpe(source, bpe_by_set)
    say(f"BPE check: our BPE of tok/ equals test.{SRC}/test.{TGT} on all {n_checked} lines")

    counts = {
        "name": NAME,
        "source": str(source),
        "rule": {
            "sentences": [MIN_SENTS, MAX_SENTS],
            "source_tokens": [MIN_TOKENS, MAX_TOKENS],
            "description": "consecutive sentences; greedy longest document under both caps; a sentence that "
            "starts no valid document is dropped; leftovers at a talk's end are re-cut with its last document "
            "into two valid ones where possible, else dropped (long_documents.chunk)",
        },
        "bpe_check_lines": n_checked,
        "splits": {},
    }
    manifest = ["split\tset\ttalk\tfirst_sentence\tlast_sentence\tsentences\tsrc_tokens\ttgt_tokens"]

    def write_split(split, groups):
        """GROUPS: [(set name, talk or stream name, src lines, tgt lines)]."""
        src_docs, tgt_docs, n_sents, n_in, n_dropped, per_set = [], [], [], 0, 0, {}
        for set_name, talk, src, tgt in groups:
            docs, dropped = documents(src, tgt)
            n_in += len(src)
            n_dropped += len(dropped)
            # a group is a talk (valid, test) or a training file (train)
            s = per_set.setdefault(set_name, {"groups": 0, "documents": 0, "sentences": 0, "sentences_in": 0})
            s["groups"] += 1
            s["documents"] += len(docs)
            s["sentences_in"] += len(src)
            for a, b, first, last in docs:
                src_docs.append(a)
                tgt_docs.append(b)
                n_sents.append(last - first + 1)
                s["sentences"] += last - first + 1
                la, lb = len(a.split()), len(b.split())
                manifest.append(f"{split}\t{set_name}\t{talk}\t{first}\t{last}\t{last - first + 1}\t{la}\t{lb}")
        src_len = [len(x.split()) for x in src_docs]
        tgt_len = [len(x.split()) for x in tgt_docs]
        too_long = max(src_len + tgt_len) + 1 > MAX_POSITIONS
        if too_long:
            raise SourceError(f"{split}: a document of {max(src_len + tgt_len)} tokens exceeds {MAX_POSITIONS - 1}")
        mt_prep.write_lines(raw / f"{split}.{SRC}", src_docs)
        mt_prep.write_lines(raw / f"{split}.{TGT}", tgt_docs)
        counts["splits"][split] = {
            "documents": len(src_docs),
            "sentences": sum(n_sents),
            "sentences_available": n_in,
            "sentences_dropped": n_dropped,
            "sentences_per_document": _stats(n_sents),
            "src_tokens": _stats(src_len),
            "tgt_tokens": _stats(tgt_len),
            "tgt_to_src_ratio_max": round(max(b / a for a, b in zip(src_len, tgt_len)), 3),
            "targets_over_generate_bound": sum(b > LEN_A * a + LEN_B for a, b in zip(src_len, tgt_len)),
            "by_set": per_set,
        }
        c = counts["splits"][split]
        say(
            f"{split}: {c['documents']} documents, {c['sentences']} of {n_in} sentences "
            f"({n_dropped} dropped); source tokens {c['src_tokens']}, target tokens {c['tgt_tokens']}"
        )
        return tgt_docs

    streams = training_streams(source)
    say(
        "train: pseudo-documents of consecutive training lines ("
        + ", ".join(f"{k} {len(v)}" for k, v in streams.items())
        + ")"
    )
    write_split(
        "train", [(name, name, [a for a, _ in pairs], [b for _, b in pairs]) for name, pairs in streams.items()]
    )
    for split, sets in SPLIT_SETS.items():
        groups = [(t["set"], t["talk"], t["src"], t["tgt"]) for name in sets for t in talks_by_set[name]]
        tgt_docs = write_split(split, groups)
        if split == "test":
            # sacreBLEU's reference: as prepare_iwslt14's test.ref.detok.en, a whole document a line
            say("test: writing the detokenised reference (BPE removed, Moses detokeniser)")
            mt_prep.write_lines(raw / f"test.ref.detok.{TGT}", mt_prep.detokenize(mt_prep.remove_bpe(tgt_docs), TGT))
    mt_prep.write_lines(raw / "documents.tsv", manifest)
    (out / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    done.write_text(stamp + "\n")
    return counts


def raw_digest(raw):
    """What data-bin/ is made of: a digest of the raw documents (a rebuilt but identical raw/ keeps it)."""
    h = hashlib.sha256()
    for split in ("train", "valid", "test"):
        for lang in (SRC, TGT):
            h.update((raw / f"{split}.{lang}").read_bytes())
    return h.hexdigest()[:16]


def fairseq_preprocess():
    path = Path(sys.executable).with_name("fairseq-preprocess")
    found = str(path) if path.exists() else shutil.which("fairseq-preprocess")
    if not found:
        raise SystemExit(f"long_documents: fairseq-preprocess not found beside {sys.executable} nor on PATH")
    return found


def binarise(out):
    """data-bin/ with a dictionary joined over both languages of train (as prepare_data's iwslt14)."""
    raw, dest = out / "raw", out / "data-bin"
    digest = raw_digest(raw)
    done = dest / ".done"
    if done.exists() and done.read_text().splitlines()[0] == digest:
        say(f"binarised data exists: {dest} (reused)")
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [
        fairseq_preprocess(),
        "--source-lang",
        SRC,
        "--target-lang",
        TGT,
        "--trainpref",
        str(raw / "train"),
        "--validpref",
        str(raw / "valid"),
        "--testpref",
        str(raw / "test"),
        "--destdir",
        str(dest),
        "--joined-dictionary",
        "--workers",
        "1",
    ]
    say("binarising: " + " ".join(cmd))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (out / "preprocess.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"long_documents: fairseq-preprocess failed (see {out / 'preprocess.log'}):\n{proc.stderr[-3000:]}"
        )
    done.write_text(digest + "\n" + " ".join(cmd) + "\n")
    return dest


def generate_args():
    """fairseq-generate's length bound for documents (the runner's --generate-args)."""
    return f"--max-len-a {LEN_A} --max-len-b {LEN_B}"


def commit_reference(raw_ref, committed=COMMITTED_REF):
    """Copy RAW_REF gzipped (reproducibly: no name or time in the header) to COMMITTED, unless its
    lines are there already; a committed reference with other lines is refused, not replaced."""
    lines = mt_prep.read_lines(raw_ref)
    committed = Path(committed)
    if committed.exists():
        if mt_prep.read_lines(committed) != lines:
            sys.exit(
                f"long_documents: {committed} holds another test reference than {raw_ref}: the committed "
                "results were scored against it. Move it away only if you mean to replace the study's reference."
            )
        return committed
    committed.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with open(committed, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(data)
    say(f"test: the reference committed beside the results: {committed}")
    return committed


def write_dataset_json(out, counts, data_bin, committed_ref=COMMITTED_REF):
    c = counts["splits"]
    ref = commit_reference(out / "raw" / f"test.ref.detok.{TGT}", committed_ref)
    meta = {
        "name": NAME,
        "description": "IWSLT14 de-en documents (scripts/experiments/long_documents.py): "
        f"{MIN_SENTS}-{MAX_SENTS} consecutive sentences of {MIN_TOKENS}-{MAX_TOKENS} BPE tokens (source). "
        f"train {c['train']['documents']} pseudo-documents of the offline training sample; valid "
        f"{c['valid']['documents']} documents of dev2010 talks; test {c['test']['documents']} documents "
        "of tst2010-2012 and TEDX.dev2012 talks",
        "src": SRC,
        "tgt": TGT,
        "data_bin": str(data_bin),
        "remove_bpe": "subword_nmt",
        "detok_lang": TGT,
        "tests": [{"subset": "test", "label": "test", "ref": str(ref)}],
        # fairseq-generate stops at --max-len-b 200 tokens by default, shorter than most documents: the
        # runner needs these --generate-args (documents_queue.sh passes them)
        "generate_args": generate_args(),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(f"wrote {out / 'dataset.json'}")
    return meta


def prepare(out=DEFAULT_OUT, source=DEFAULT_SOURCE):
    out = Path(out).resolve()
    source = check_source(Path(source).resolve())
    out.mkdir(parents=True, exist_ok=True)
    counts = build_raw(source, out)
    data_bin = binarise(out)
    return write_dataset_json(out, counts, data_bin)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="build the document-level data set (reuses finished steps)")
    s.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    s.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the IWSLT14 material (default: %(default)s)")
    a = p.parse_args(argv)
    prepare(a.out, a.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
