"""The translation recipes (examples/translation), exercised offline on the reference data in
../shared/data: the Python steps must reproduce fairseq's Perl/grep/sed preparation of IWSLT14,
and the shell recipes must run end to end on pre-downloaded raw files (ORIG=...)."""

import gzip
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fairseq_clusterformer.tools import mt_prep
from scripts import check_offline

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "examples" / "translation"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


needs_data = pytest.mark.skipif(
    not (DATA / "iwslt14").is_dir(),
    reason=f"reference data folder {DATA} is absent (it holds the IWSLT14/WMT files these tests compare with)",
)

# Measured with python -m scripts.check_offline (see examples/translation/README.md):
# every line matches. The thresholds leave a little room for other sacremoses/subword-nmt versions.
MIN_TOKENIZE_MATCH = 0.995
MIN_BPE_MATCH = 0.999


def run_script(script, *args, env=None, check=True, timeout=300):
    full_env = dict(os.environ, PYTHON=sys.executable, WORKERS="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run(
        ["bash", str(RECIPES / script), *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ------------------------------------------------------------------- unit tests of the steps


def test_xml_segs_like_grep_sed():
    lines = [
        '<doc docid="1">',
        "<title>Not a segment</title>",
        '<seg id="12">  Hello  world’s end  </seg>  ',
        '<seg id="13">Zweite Zeile</seg>',
    ]
    assert list(mt_prep.xml_segs(lines)) == ["Hello  world's end", "Zweite Zeile"]


def test_train_tags_like_grep_sed():
    lines = [
        "<url>http://x</url>",
        "<keywords>a,b</keywords>",
        "<talkid>1</talkid>",
        "<title>My talk</title>",
        "<description>About it</description>",
        "Plain text.",
    ]
    assert list(mt_prep.train_tags(lines)) == ["My talk", "About it", "Plain text."]


def test_clean_pairs_like_clean_corpus_n():
    pairs = [
        ("a b c", "x y z"),  # kept
        ("a  b ", " x   y"),  # kept, whitespace squeezed
        ("", "x"),  # empty side
        ("a b c d", "x y"),  # ratio 2 > 1.5
        ("a " * 176, "x " * 176),  # longer than 175
        ("a|b", "x"),
    ]  # '|' removed -> "ab" vs "x": kept
    assert list(mt_prep.clean_pairs(pairs, ratio=1.5, min_len=1, max_len=175)) == [
        ("a b c", "x y z"),
        ("a b", "x y"),
        ("ab", "x"),
    ]


def test_split_every_like_awk():
    train, valid = mt_prep.split_every([str(i) for i in range(1, 50)], 23)
    assert valid == ["23", "46"]
    assert len(train) == 47 and "23" not in train


def test_final_period_split_like_tokenizer_perl():
    tok = list(mt_prep.tokenize(["We met in the U.S.", "Dr. Smith arrived."], "en"))
    assert tok == ["We met in the U.S .", "Dr. Smith arrived ."]


def test_compound_split_convention():
    assert (
        mt_prep.compound_split("state-of-the-art 3-2 a - b")
        == "state ##AT##-##AT## of ##AT##-##AT## the ##AT##-##AT## art 3 ##AT##-##AT## 2 a - b"
    )
    # like Perl's s///g, matches do not overlap: a one-letter part between two hyphens
    assert mt_prep.compound_split("x-y-z") == "x ##AT##-##AT## y-z"


def test_parse_generate_ignores_noise_and_sorts():
    out = [
        "hydra warning",
        "S-1\tzwei",
        "T-1\ttwo",
        "H-1\t-0.5\ttwo",
        "D-1\t-0.5\ttwo",
        "S-0\teins",
        "T-0\tone",
        "H-0\t-0.1\tone",
        "H-0\t-0.9\tworse",
    ]
    parsed = mt_prep.parse_generate(out)
    assert parsed["H"] == {0: "one", 1: "two"} and parsed["T"][1] == "two"


def test_sentencepiece_roundtrip(tmp_path):
    text = tmp_path / "train.txt"
    words = "der die das ein eine hund katze läuft springt über den zaun im park .".split()
    text.write_text("".join(" ".join(words[i % 7 :] + words[: i % 7]) + "\n" for i in range(200)))
    mt_prep.spm_train([text], tmp_path / "spm", vocab_size=60)
    lines = ["der hund läuft im park .", "eine katze springt über den zaun ."]
    pieces = list(mt_prep.spm_encode(lines, tmp_path / "spm.model"))
    assert pieces != lines and list(mt_prep.spm_decode(pieces)) == lines


# ------------------------------------------------------- fidelity on the reference IWSLT14 data


@pytest.fixture(scope="module")
def tokenized():
    return {lang: check_offline.iwslt_tokenized(DATA, lang) for lang in check_offline.LANGS}


@needs_data
def test_iwslt_xml_segment_counts():
    counts = check_offline.iwslt_xml_counts(DATA)
    assert len(counts) == 10
    for (name, lang), (ours, ref) in counts.items():
        assert ours == ref, f"{name}.{lang}: {ours} segments parsed, reference has {ref} lines"
    assert sum(o for (s, lang), (o, _) in counts.items() if lang == "de") == 6750


@needs_data
def test_iwslt_tokenize_lowercase_matches_reference(tokenized):
    for lang in check_offline.LANGS:
        results = {k: v for k, v in check_offline.iwslt_tok_match(DATA, tokenized).items() if k[1] == lang}
        same = sum(r[0] for r in results.values())
        total = sum(r[1] for r in results.values())
        assert total == 6750
        assert same / total >= MIN_TOKENIZE_MATCH, (
            f"{lang}: {same}/{total} lines match; first differences: {[d for r in results.values() for d in r[2]][:3]}"
        )


@needs_data
def test_iwslt_bpe_with_reference_codes_matches_reference():
    for (split, lang), (same, total, diffs) in check_offline.iwslt_bpe_match(DATA).items():
        assert same / total >= MIN_BPE_MATCH, f"{split}.{lang}: {same}/{total}; {diffs[:3]}"


@needs_data
def test_iwslt_whole_chain_reproduces_reference_test_set(tokenized):
    for lang, (same, total, diffs) in check_offline.iwslt_chain_match(DATA, tokenized).items():
        assert total == 6750
        assert same / total >= MIN_TOKENIZE_MATCH, f"test.{lang}: {same}/{total}; {diffs[:3]}"


# ---------------------------------------------------------- the shell recipes, offline (ORIG=)

N_SEGS = 40  # segments kept per dev/test XML file, to keep the test fast


def _write_small_xml(src, dest, n):
    out, kept = [], 0
    for line in src.read_text(encoding="utf-8").splitlines():
        if "<seg id" in line:
            if kept >= n:
                continue
            kept += 1
        out.append(line)
    dest.write_text("\n".join(out) + "\n", encoding="utf-8")


def _raw_like(path, lang, n):
    """Reference BPE'd training lines turned back into raw-looking text."""
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    lines = mt_prep.read_lines(path)[:n]
    return [detok.detokenize(line.replace("@@ ", "").split(), unescape=True) for line in lines]


@pytest.fixture(scope="module")
def iwslt_orig(tmp_path_factory):
    if not (DATA / "iwslt14").is_dir():
        pytest.skip(f"reference data folder {DATA} is absent")
    orig = tmp_path_factory.mktemp("iwslt_orig")
    raw = orig / "de-en"
    raw.mkdir()
    for xml in (DATA / "iwslt14" / "orig").glob("IWSLT14.*.xml"):
        _write_small_xml(xml, raw / xml.name, N_SEGS)
    meta = {
        "de": [
            "<url>http://www.ted.com/talks/x.html</url>",
            "<keywords>talks</keywords>",
            "<talkid>1</talkid>",
            "<title>Ein Titel</title>",
            "<description>Eine Beschreibung.</description>",
        ],
        "en": [
            "<url>http://www.ted.com/talks/x.html</url>",
            "<keywords>talks</keywords>",
            "<talkid>1</talkid>",
            "<title>A title</title>",
            "<description>A description.</description>",
        ],
    }
    for lang in ("de", "en"):
        body = _raw_like(DATA / "iwslt14" / "train-sample" / f"train.{lang}", lang, 400)
        lines = meta[lang] + body[:200] + meta[lang] + body[200:]
        (raw / f"train.tags.de-en.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return orig


@pytest.fixture(scope="module")
def iwslt_prepared(iwslt_orig, tmp_path_factory):
    prep = tmp_path_factory.mktemp("iwslt_prep") / "iwslt14.tokenized.de-en"
    proc = run_script("prepare-iwslt14.sh", env={"ORIG": str(iwslt_orig), "PREP": str(prep), "BPE_TOKENS": "300"})
    return prep, proc


def test_prepare_iwslt14_offline(iwslt_prepared):
    prep, proc = iwslt_prepared
    tmp = prep / "tmp"
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (prep / f"{split}.{lang}").is_file(), proc.stdout
    assert (prep / "code").read_text().startswith("#version: 0.2")
    # test = the five sets in fairseq's order, identical to the reference tokenisation
    for lang in ("de", "en"):
        expected = [
            line
            for s in check_offline.IWSLT_SETS
            for line in mt_prep.read_lines(DATA / "iwslt14" / "tok" / f"{s}.de-en.{lang}")[:N_SEGS]
        ]
        assert mt_prep.read_lines(tmp / f"test.{lang}") == expected
        assert list(mt_prep.remove_bpe(mt_prep.read_lines(prep / f"test.{lang}"))) == expected
        # valid = every 23rd line of the cleaned, lowercased training text
        full = mt_prep.read_lines(tmp / f"train.tags.de-en.{lang}")
        assert mt_prep.read_lines(tmp / f"valid.{lang}") == full[22::23]
        assert len(mt_prep.read_lines(prep / f"train.{lang}")) == len(full) - len(full[22::23])
        text = "\n".join(full)
        assert "<url>" not in text and "talkid" not in text and text == text.lower()
    de, en = (mt_prep.read_lines(tmp / f"train.tags.de-en.{lang}") for lang in ("de", "en"))
    assert "ein titel" in de and "a title" in en  # <title> untagged, kept as text
    assert 380 < len(de) == len(en) <= 404
    for a, b in zip(de, en):
        na, nb = len(a.split()), len(b.split())
        assert 1 <= na <= 175 and 1 <= nb <= 175 and na / nb <= 1.5 and nb / na <= 1.5


def test_prepare_iwslt14_resumes_then_switches_to_sentencepiece(iwslt_orig, iwslt_prepared):
    prep, _ = iwslt_prepared
    again = run_script("prepare-iwslt14.sh", env={"ORIG": str(iwslt_orig), "PREP": str(prep), "BPE_TOKENS": "300"})
    assert again.stdout.count("already done, skipping") == 7, again.stdout
    spm = run_script(
        "prepare-iwslt14.sh", "--sentencepiece", env={"ORIG": str(iwslt_orig), "PREP": str(prep), "BPE_TOKENS": "300"}
    )
    assert "segmentation changed" in spm.stdout and (prep / "spm.model").is_file()
    for lang in ("de", "en"):
        pieces = mt_prep.read_lines(prep / f"test.{lang}")
        assert "\u2581" in pieces[0]
        assert list(mt_prep.spm_decode(pieces)) == mt_prep.read_lines(prep / "tmp" / f"test.{lang}")


def _fake_tool(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_prepare_iwslt14_failed_download_is_clear(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _fake_tool(fake_bin, "wget", "echo 'wget: unable to resolve host address' >&2; exit 4")
    proc = run_script(
        "prepare-iwslt14.sh",
        check=False,
        env={
            "ORIG": str(tmp_path / "orig"),
            "PREP": str(tmp_path / "prep"),
            "PATH": f"{fake_bin}:{os.environ['PATH']}",
        },
    )
    assert proc.returncode != 0
    assert "download failed: http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz" in proc.stderr
    assert not (tmp_path / "orig" / "de-en.tgz").exists()  # no half-downloaded file left behind


def test_prepare_scripts_missing_python_package_is_clear(tmp_path):
    fake_py = _fake_tool(tmp_path, "python", 'echo "ModuleNotFoundError" >&2; exit 1')
    for script in ("prepare-iwslt14.sh", "prepare-wmt14en2de.sh"):
        proc = run_script(
            script,
            check=False,
            env={"PYTHON": str(fake_py), "ORIG": str(tmp_path / "orig"), "PREP": str(tmp_path / "prep")},
        )
        assert proc.returncode != 0
        assert "missing Python package(s)" in proc.stderr and "pip install sacremoses subword-nmt" in proc.stderr


def test_prepare_scripts_help():
    for script in ("prepare-iwslt14.sh", "prepare-wmt14en2de.sh", "compound_split_bleu.sh"):
        proc = run_script(script, "--help")
        assert "Usage:" in proc.stdout and "set -euo" not in proc.stdout


N_WMT_TEST = 600  # of newstest2014's 3,003 segments, to keep the test fast


@pytest.fixture(scope="module")
def wmt_orig(tmp_path_factory):
    if not (DATA / "wmt").is_dir():
        pytest.skip(f"reference data folder {DATA} is absent")
    orig = tmp_path_factory.mktemp("wmt_orig")
    en = _raw_like(DATA / "opennmt-toy-ende" / "src-train.txt", "en", 300)
    de = _raw_like(DATA / "opennmt-toy-ende" / "tgt-train.txt", "de", 300)
    corpora = ["training/europarl-v7.de-en", "commoncrawl.de-en", "training/news-commentary-v9.de-en"]
    for i, corpus in enumerate(corpora):
        for lang, lines in (("en", en), ("de", de)):
            path = orig / f"{corpus}.{lang}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines[100 * i : 100 * (i + 1)]) + "\n", encoding="utf-8")
    (orig / "test-full").mkdir()
    for name in ("newstest2014-deen-src.en.sgm", "newstest2014-deen-ref.de.sgm"):
        _write_small_xml(DATA / "wmt" / name, orig / "test-full" / name, N_WMT_TEST)
    return orig


def test_prepare_wmt14en2de_offline(wmt_orig, tmp_path):
    prep = tmp_path / "wmt14_en_de"
    proc = run_script(
        "prepare-wmt14en2de.sh", "--icml17", env={"ORIG": str(wmt_orig), "PREP": str(prep), "BPE_TOKENS": "300"}
    )
    assert "nothing to download" in proc.stdout
    tmp = prep / "tmp"
    for lang in ("en", "de"):
        test_tok = mt_prep.read_lines(tmp / f"test.{lang}")
        assert len(test_tok) == N_WMT_TEST and len(mt_prep.read_lines(prep / f"test.{lang}")) == N_WMT_TEST
        assert list(mt_prep.remove_bpe(mt_prep.read_lines(prep / f"test.{lang}"))) == test_tok
        assert any(" @-@ " in line for line in test_tok)  # -a: aggressive hyphen splitting
        full = mt_prep.read_lines(tmp / f"train.tags.en-de.tok.{lang}")
        assert len(full) == 300 and mt_prep.read_lines(tmp / f"valid.{lang}") == full[99::100]
    en, de = (mt_prep.read_lines(prep / f"train.{lang}") for lang in ("en", "de"))
    assert 200 < len(en) == len(de) <= 297
    for a, b in zip(en, de):
        na, nb = len(a.split()), len(b.split())
        assert 1 <= na <= 250 and 1 <= nb <= 250 and na / nb <= 1.5 and nb / na <= 1.5


def test_compound_split_bleu_script(tmp_path):
    gen = tmp_path / "gen.out"
    gen.write_text(
        "some hydra warning\n"
        "S-1\tsrc\nT-1\tdas ist ein state-of-the-art Modell .\nH-1\t-0.2\tdas ist ein state-of-the-art Modell .\n"
        "S-0\tsrc\nT-0\tdie Katze sitzt .\nH-0\t-0.3\tdie Katze sitzt .\n"
        "Generate test with beam=5: BLEU4 = 100.00\n"
    )
    proc = run_script("compound_split_bleu.sh", str(gen), "2")
    assert re.search(r"^BLEU4 = 100\.00", proc.stdout, re.M), proc.stdout
    assert "state ##AT##-##AT## of ##AT##-##AT## the ##AT##-##AT## art" in (tmp_path / "gen.out.sys").read_text()
    missing = run_script("compound_split_bleu.sh", str(gen), "3", check=False)
    assert missing.returncode != 0 and "expected hypotheses" in missing.stderr


def test_shipped_multi30k_is_intact():
    folder = REPO / "data" / "multi30k"
    expected = {"train": 29000, "val": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000}
    for split, n in expected.items():
        for lang in ("de", "en"):
            with gzip.open(folder / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                assert sum(1 for _ in f) == n, f"{split}.{lang}"
    assert "non-commercial research and/or educational purposes" in (folder / "README.md").read_text()
    assert (folder / "UPSTREAM_README.md").is_file()
