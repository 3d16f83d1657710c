"""scripts/experiments/long_documents.py: the document rule (on synthetic talks), the XML talk parser,
the whole raw build on a synthetic IWSLT14-shaped folder, the message for a missing source folder,
the `documents` recipe's positions and batch size, and (when ../shared/data is here) that our BPE of
the tokenised talks reproduces the reference test set."""

import json
import random
from pathlib import Path

import pytest

from fairseq_clusterformer.tools import mt_prep
from scripts.experiments import long_documents as ld

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "iwslt14"


def check_spans(lengths, spans, dropped):
    """Every document obeys the rule, documents are consecutive sentences in order, and every
    sentence is in exactly one document or dropped."""
    placed = []
    for a, b in spans:
        assert ld.MIN_SENTS <= b - a <= ld.MAX_SENTS, (a, b)
        assert ld.MIN_TOKENS <= sum(lengths[a:b]) <= ld.MAX_TOKENS, (a, b, sum(lengths[a:b]))
        placed.extend(range(a, b))
    assert placed == sorted(placed), "documents out of order or overlapping"
    assert sorted(placed + list(dropped)) == list(range(len(lengths))), "a sentence lost or placed twice"


def synthetic_talks():
    rng = random.Random(0)
    talks = []
    for _ in range(300):
        n = rng.randint(0, 120)
        kind = rng.random()
        if kind < 0.5:  # TED-like: mostly 5-60 tokens, sometimes long
            lengths = [max(1, int(rng.lognormvariate(3.0, 0.6))) for _ in range(n)]
        elif kind < 0.7:  # runs of very short lines ("(applause)")
            lengths = [rng.choice([1, 2, 3, 30, 40]) for _ in range(n)]
        elif kind < 0.9:  # long sentences, some beyond the token cap alone
            lengths = [rng.randint(40, 600) for _ in range(n)]
        else:
            lengths = [rng.randint(1, 80) for _ in range(n)]
        talks.append(lengths)
    return talks


def test_chunk_rule_on_synthetic_talks():
    n_docs = n_sents = 0
    for lengths in synthetic_talks():
        spans, dropped = ld.chunk(lengths)
        check_spans(lengths, spans, dropped)
        assert ld.chunk(lengths) == (spans, dropped), "not deterministic"
        n_docs += len(spans)
        n_sents += len(lengths)
    assert n_docs > 300, "the synthetic talks should make plenty of documents"


def test_chunk_rule_cases():
    # greedy: as many sentences as fit the caps (16 here); a leftover of 8 x 25 tokens is a document
    assert ld.chunk([25] * 40) == ([(0, 16), (16, 32), (32, 40)], [])
    # the token cap binds first: 8 x 60 = 480 tokens, a 9th would pass 500
    assert ld.chunk([60] * 17) == ([(0, 8), (8, 16)], [16])
    # a leftover too small for a document (4 x 25) is re-cut with the last document, in the middle
    assert ld.chunk([25] * 20) == ([(0, 10), (10, 20)], [])
    # ... and dropped when no cut makes two valid documents (2 x 25 after a full 500-token document)
    assert ld.chunk([50] * 10 + [25] * 2) == ([(0, 10)], [10, 11])
    # a sentence beyond the token cap starts no document and is dropped; the next one starts one
    assert ld.chunk([600] + [30] * 10) == ([(1, 11)], [0])
    # sixteen very short sentences stay under 200 tokens: dropped one at a time until a document fits
    # (12 x 5 + 4 x 40 = 220 tokens); the 4 x 40 left over cannot be re-cut with it, and are dropped
    assert ld.chunk([5] * 16 + [40] * 8) == ([(4, 20)], [0, 1, 2, 3, 20, 21, 22, 23])
    # too little for any document
    assert ld.chunk([25] * 7) == ([], list(range(7)))
    assert ld.chunk([]) == ([], [])


def test_documents_keep_source_and_target_aligned():
    rng = random.Random(1)
    lengths = [rng.randint(5, 50) for _ in range(200)]
    src = [" ".join(f"s{i}w{j}" for j in range(n)) for i, n in enumerate(lengths)]
    tgt = [" ".join(f"t{i}w{j}" for j in range(rng.randint(3, 60))) for i in range(len(src))]
    docs, dropped = ld.documents(src, tgt)
    assert docs and len(docs) == len(ld.chunk(lengths)[0])
    previous = -1
    for s, t, first, last in docs:
        assert first > previous
        previous = last
        assert s == " ".join(src[first : last + 1])
        assert t == " ".join(tgt[first : last + 1])
        # the sentence ids read in order on both sides: nothing reordered or mixed
        for side, prefix in ((s, "s"), (t, "t")):
            ids = [int(w[1:].split("w")[0]) for w in side.split()]
            assert ids == sorted(ids) and set(ids) == set(range(first, last + 1)), prefix


XML = """<?xml version="1.0" encoding="UTF-8"?>
<mteval>
<srcset setid="iwslt2014-dev2010" srclang="german">
<doc docid="69" genre="lectures">
<url>http://www.ted.com/talks/x.html</url>
<description>Beschreibung mit <seg-artigem Text.</description>
<talkid>69</talkid>
<title>Titel</title>
<seg id="1"> Erster Satz. </seg>
<seg id="2"> Zweiter Satz. </seg>
<seg id="3"> Dritter. </seg>
</doc>
<doc docid="535" genre="lectures">
<seg id="1"> Nur einer. </seg>
</doc>
<doc docid="7" genre="lectures">
</doc>
</srcset>
</mteval>
"""


def test_talk_segments_on_tiny_xml():
    lines = XML.splitlines()
    assert ld.talk_segments(lines) == [("69", 3), ("535", 1), ("7", 0)]
    # the same segments as fairseq's grep/sed extraction keeps, so the counts add up to its lines
    assert sum(n for _, n in ld.talk_segments(lines)) == len(list(mt_prep.xml_segs(lines)))
    with pytest.raises(ValueError, match="before any <doc>"):
        ld.talk_segments(['<seg id="1"> x </seg>'])


def test_split_talks_needs_exact_counts():
    assert ld.split_talks(list("abcd"), [("1", 3), ("2", 1)], "x") == [list("abc"), ["d"]]
    with pytest.raises(SystemExit, match="4 segments in 2 talks, the file 5 lines"):
        ld.split_talks(list("abcde"), [("1", 3), ("2", 1)], "x")


# ------------------------------------------------------------------- a synthetic source folder


def fake_source(root, sentences_per_talk=(30, 17), train_lines=60):
    """An IWSLT14-shaped folder: one-character words, so that BPE with no merges leaves them as
    they are and a sentence of n words is n tokens."""
    rng = random.Random(2)
    root.mkdir(parents=True)
    for d in ("orig", "tok", "train-sample"):
        (root / d).mkdir()
    (root / "code").write_text("#version: 0.2\nq z\n")  # one merge, of letters never used

    def sentence(tag):
        return " ".join(rng.choice("abcdefghij") for _ in range(rng.randint(18, 40))) + f" {tag}"

    test = {ld.SRC: [], ld.TGT: []}
    for s_no, name in enumerate(ld.FAIRSEQ_TEST_ORDER):
        per_lang = {}
        for lang in (ld.SRC, ld.TGT):
            xml = ["<mteval>"]
            lines = []
            for t_no, n in enumerate(sentences_per_talk):
                xml.append(f'<doc docid="{s_no}{t_no}" genre="lectures">')
                for i in range(n):
                    xml.append(f'<seg id="{i + 1}"> x </seg>')
                    lines.append(sentence(f"{s_no}"))
                xml.append("</doc>")
            xml.append("</mteval>")
            (root / "orig" / f"{name}.de-en.{lang}.xml").write_text("\n".join(xml) + "\n")
            mt_prep.write_lines(root / "tok" / f"{name}.de-en.{lang}", lines)
            per_lang[lang] = lines
        for lang in (ld.SRC, ld.TGT):
            test[lang] += per_lang[lang]
    for lang in (ld.SRC, ld.TGT):
        mt_prep.write_lines(root / f"test.{lang}", test[lang])
        mt_prep.write_lines(root / f"valid.{lang}", [sentence("v") for _ in range(train_lines)])
        mt_prep.write_lines(root / "train-sample" / f"train.{lang}", [sentence("t") for _ in range(train_lines)])
    mt_prep.write_lines(
        root / "train-sample" / "sample2.de+en.tsv", [f"{sentence('u')}\t{sentence('u')}" for _ in range(train_lines)]
    )
    return root


def test_build_raw_on_a_synthetic_source(tmp_path):
    source = ld.check_source(fake_source(tmp_path / "src"))
    out = tmp_path / "out"
    counts = ld.build_raw(source, out)
    raw = out / "raw"
    for split in ("train", "valid", "test"):
        src, tgt = mt_prep.read_lines(raw / f"{split}.de"), mt_prep.read_lines(raw / f"{split}.en")
        c = counts["splits"][split]
        assert len(src) == len(tgt) == c["documents"] > 0
        for line in src:
            assert ld.MIN_TOKENS <= len(line.split()) <= ld.MAX_TOKENS
        assert c["sentences"] + c["sentences_dropped"] == c["sentences_available"]
    # valid: dev2010's two talks only; test: the other four sets, and its detokenised reference
    assert list(counts["splits"]["valid"]["by_set"]) == ld.SPLIT_SETS["valid"]
    assert list(counts["splits"]["test"]["by_set"]) == ld.SPLIT_SETS["test"]
    assert counts["splits"]["valid"]["by_set"]["IWSLT14.TED.dev2010"]["groups"] == 2
    ref = mt_prep.read_lines(raw / "test.ref.detok.en")
    assert len(ref) == counts["splits"]["test"]["documents"]
    # a document never spans two talks: its sentences carry their set's tag and come from one talk
    manifest = [line.split("\t") for line in mt_prep.read_lines(raw / "documents.tsv")[1:]]
    assert len(manifest) == sum(c["documents"] for c in counts["splits"].values())
    lines = {split: iter(mt_prep.read_lines(raw / f"{split}.de")) for split in ("valid", "test")}
    for split, set_name, talk, first, last, n, *_ in manifest:
        if split == "train":
            continue
        assert int(last) - int(first) + 1 == int(n) and int(last) < (30 if talk.endswith("0") else 17)
        tags = {w for w in next(lines[split]).split() if w.isdigit()}
        assert tags == {str(ld.FAIRSEQ_TEST_ORDER.index(set_name))}, "a document mixes sets, or is misplaced"
    assert json.loads((out / "counts.json").read_text()) == counts
    # a second call reuses the documents
    stamp = (raw / ".done").stat().st_mtime_ns
    assert ld.build_raw(source, out) == counts and (raw / ".done").stat().st_mtime_ns == stamp


def test_the_reference_is_committed_reproducibly_and_never_silently_replaced(tmp_path):
    """dataset.json names a gzipped copy of the reference (the records keep that path), whose bytes
    do not depend on when it was written; a different reference already there is refused."""
    source = ld.check_source(fake_source(tmp_path / "src"))
    out = tmp_path / "out"
    counts = ld.build_raw(source, out)
    committed = tmp_path / "refs" / "docs.test.ref.detok.en.gz"
    meta = ld.write_dataset_json(out, counts, out / "data-bin", committed_ref=committed)
    assert meta["tests"][0]["ref"] == str(committed)
    assert mt_prep.read_lines(committed) == mt_prep.read_lines(out / "raw" / "test.ref.detok.en")
    first = committed.read_bytes()
    committed.unlink()
    ld.commit_reference(out / "raw" / "test.ref.detok.en", committed)
    assert committed.read_bytes() == first  # no time or name in the gzip header
    ld.commit_reference(out / "raw" / "test.ref.detok.en", committed)  # the same lines: kept as they are
    other = tmp_path / "other.en"
    other.write_text("another reference\n")
    with pytest.raises(SystemExit, match="holds another test reference"):
        ld.commit_reference(other, committed)
    assert committed.read_bytes() == first


def test_build_raw_refuses_inconsistent_sources(tmp_path):
    source = fake_source(tmp_path / "src")
    # the reference test set differs from our BPE of tok/
    lines = mt_prep.read_lines(source / "test.en")
    mt_prep.write_lines(source / "test.en", lines[:5] + ["changed"] + lines[6:])
    with pytest.raises(SystemExit, match="does not reproduce test.en"):
        ld.build_raw(source, tmp_path / "out1")
    # a talk's segments in the XML do not match the tokenised file's lines
    name = ld.FAIRSEQ_TEST_ORDER[1]
    tok = source / "tok" / f"{name}.de-en.de"
    mt_prep.write_lines(tok, mt_prep.read_lines(tok)[:-1])
    with pytest.raises(SystemExit, match=f"{name}.de .*47 segments in 2 talks, the file 46 lines"):
        ld.build_raw(source, tmp_path / "out2")


def test_missing_source_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit) as e:
        ld.main(["prepare", "--out", str(tmp_path / "out"), "--source", str(missing)])
    assert str(missing) in str(e.value) and "does not exist" in str(e.value) and "--source" in str(e.value)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / "partial"
    (partial / "tok").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        ld.main(["prepare", "--out", str(tmp_path / "out"), "--source", str(partial)])
    assert "missing orig" in str(e.value) and "train-sample" in str(e.value)


def test_documents_recipe_fits_every_document():
    from scripts.experiments import recipes

    r = recipes.RECIPES["documents"]
    args, settings = r["model_args"], r["train_settings"]
    for flag in ("--max-source-positions", "--max-target-positions"):
        assert int(args[args.index(flag) + 1]) >= ld.MAX_POSITIONS
    # fairseq counts a pair as its longer side; the longest possible pair must fit a batch
    assert int(settings[settings.index("--max-tokens") + 1]) >= ld.MAX_POSITIONS
    assert r["max_update"] == int(settings[settings.index("--total-num-update") + 1])
    # the generation bound stays within the positions for the longest source
    assert ld.LEN_A * ld.MAX_TOKENS + ld.LEN_B < ld.MAX_POSITIONS


@pytest.mark.skipif(not (SHARED / "tok").is_dir(), reason=f"reference data {SHARED} absent (../shared/data)")
def test_bpe_reproduces_reference_test_lines():
    """Our BPE (mt_prep.apply_bpe with the reference codes) of 20 tokenised tst2010 lines equals the
    reference test.de/test.en lines (fairseq's prepare-iwslt14.sh)."""
    name = "IWSLT14.TED.tst2010"
    offset = 0
    for s in ld.FAIRSEQ_TEST_ORDER[: ld.FAIRSEQ_TEST_ORDER.index(name)]:
        offset += len(mt_prep.read_lines(SHARED / "tok" / f"{s}.de-en.de"))
    for lang in ("de", "en"):
        tok = mt_prep.read_lines(SHARED / "tok" / f"{name}.de-en.{lang}")[100:120]
        ref = mt_prep.read_lines(SHARED / f"test.{lang}")[offset + 100 : offset + 120]
        ours = list(mt_prep.apply_bpe(tok, SHARED / "code"))
        assert any("@@" in line for line in ours), "BPE should split some words"
        assert ours == ref


def test_documents_runs_are_named_after_the_recipes_budget():
    from scripts.experiments import recipes

    assert recipes.budget_tag("documents", 500) == f"doc{recipes.DOC_UPDATES}"
    assert recipes.max_update("documents", 500) == recipes.DOC_UPDATES
