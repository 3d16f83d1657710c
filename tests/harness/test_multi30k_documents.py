"""scripts/experiments/multi30k_documents.py on a synthetic Multi30k: documents are consecutive
captions within the bounds, aligned across the languages and with their raw references, and the
data set names the committed references of both test sets."""

import gzip
from pathlib import Path

import pytest

from fairseq_clusterformer.tools import mt_prep
from scripts.experiments import multi30k_documents as md


def fake_multi30k(tmp_path, n=(120, 30, 40, 35)):
    """A prepared sentence-level Multi30k (bpe/) and its raw corpus: caption i of a split has
    12 + i % 7 BPE tokens that name the split, the caption and the language."""
    sentences, corpus = tmp_path / "multi30k", tmp_path / "corpus"
    (sentences / "bpe").mkdir(parents=True)
    corpus.mkdir()
    for (stem, _), count in zip(md.SPLITS.values(), n):
        for lang in ("de", "en"):
            lines = [" ".join(f"{stem}.{i}.{lang}.{t}" for t in range(12 + i % 7)) for i in range(count)]
            mt_prep.write_lines(sentences / "bpe" / f"{stem}.{lang}", lines)
            with gzip.open(corpus / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(f"Raw {stem} caption {i}.\n" for i in range(count)))
    return sentences, corpus


def test_documents_are_consecutive_captions_with_their_references(tmp_path):
    sentences, corpus = fake_multi30k(tmp_path)
    out = tmp_path / "out"
    counts = md.build_raw(sentences, out, raw_corpus=corpus)
    for split, (stem, label) in md.SPLITS.items():
        src, tgt = (mt_prep.read_lines(out / "raw" / f"{split}.{lang}") for lang in ("de", "en"))
        assert len(src) == len(tgt) == counts["splits"][split]["documents"] > 0
        expected_next = 0
        for s, t in zip(src, tgt):
            ids = sorted({int(w.split(".")[1]) for w in s.split()})
            assert ids == list(range(ids[0], ids[-1] + 1)), "a document skips a caption"
            assert ids[0] >= expected_next  # in corpus order, no caption twice
            expected_next = ids[-1] + 1
            assert md.MIN_SENTS <= len(ids) <= md.MAX_SENTS and md.MIN_TOKENS <= len(s.split()) <= md.MAX_TOKENS
            assert t.replace(".en.", ".de.") == s  # the target side holds the same captions
            assert all(w.startswith(f"{stem}.") for w in s.split())
        if label:
            refs = mt_prep.read_lines(out / "raw" / f"{label}.ref.en")
            assert len(refs) == len(src)
            first = sorted({int(w.split(".")[1]) for w in src[0].split()})
            assert refs[0] == " ".join(f"Raw {stem} caption {i}." for i in first)
    c = counts["splits"]["train"]
    assert c["sentences"] + c["sentences_dropped"] == c["sentences_available"] == 120


def test_dataset_names_both_test_sets_and_their_committed_references(tmp_path):
    sentences, corpus = fake_multi30k(tmp_path)
    out = tmp_path / "out"
    counts = md.build_raw(sentences, out, raw_corpus=corpus)
    meta = md.write_dataset_json(out, counts, out / "data-bin", refs_dir=tmp_path / "refs")
    assert [(t["subset"], t["label"]) for t in meta["tests"]] == [("test", "test_2016"), ("test1", "test_2017")]
    for t in meta["tests"]:
        assert mt_prep.read_lines(t["ref"]) == mt_prep.read_lines(out / "raw" / f"{t['label']}.ref.en")
    assert meta["name"] == "multi30k-docs" and "--max-len-a" in meta["generate_args"]


def test_a_caption_count_mismatch_is_refused(tmp_path):
    sentences, corpus = fake_multi30k(tmp_path)
    mt_prep.write_lines(sentences / "bpe" / "val.en", ["x y z"] * 3)
    with pytest.raises(SystemExit, match="val: 30 source and 3 target captions"):
        md.build_raw(sentences, tmp_path / "out", raw_corpus=corpus)


def test_multi_resolution_adds_the_training_captions_in_shorter_groups_only(tmp_path):
    """--multi-resolution: train holds every caption once per resolution (alone, in twos, fours and
    eights, in corpus order) and then the documents; valid and test are the documents unchanged,
    and the data set keeps the plain study's committed references."""
    sentences, corpus = fake_multi30k(tmp_path)
    plain = md.build_raw(sentences, tmp_path / "plain", raw_corpus=corpus)
    mr = md.build_raw(sentences, tmp_path / "mr", raw_corpus=corpus, resolutions=md.RESOLUTIONS)
    assert mr["name"] == "multi30k-docs-mr" and mr["rule"]["train_resolutions"] == [1, 2, 4, 8]
    for split in ("valid", "test", "test1"):
        for lang in ("de", "en"):
            assert (tmp_path / "mr" / "raw" / f"{split}.{lang}").read_text() == (
                tmp_path / "plain" / "raw" / f"{split}.{lang}"
            ).read_text()
    captions = mt_prep.read_lines(sentences / "bpe" / "train.de")  # 120
    train = mt_prep.read_lines(tmp_path / "mr" / "raw" / "train.de")
    expected = [" ".join(captions[i : i + r]) for r in (1, 2, 4, 8) for i in range(0, 120, r)]
    assert train[: len(expected)] == expected
    assert train[len(expected) :] == mt_prep.read_lines(tmp_path / "plain" / "raw" / "train.de")
    n_docs = plain["splits"]["train"]["documents"]
    assert mr["splits"]["train"]["training_pairs"] == len(train) == 120 + 60 + 30 + 15 + n_docs
    meta = md.write_dataset_json(tmp_path / "mr", mr, tmp_path / "bin", refs_dir=tmp_path / "refs")
    assert meta["name"] == "multi30k-docs-mr" and "groups of 1, 2, 4, 8" in meta["description"]
    assert {Path(t["ref"]).name for t in meta["tests"]} == {
        "multi30k-docs.test_2016.ref.en.gz",
        "multi30k-docs.test_2017.ref.en.gz",
    }
