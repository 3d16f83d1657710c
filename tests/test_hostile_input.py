"""Hostile input lines (docs/reliability.md): empty and blank lines, a 5,000-word line, control
characters, bytes that are not UTF-8, emoji and right-to-left text, Windows line endings; through
scripts/translate.sh, fairseq-interactive and fairseq-generate on a binarised test set."""

import os
import re
import shutil
import subprocess

import pytest

from fairseq_clusterformer.tools import mt_prep
from fairseq_helpers import REPO, USER_DIR, cli, generate, parse_generate, run

LONG = " ".join(f"s{i % 24}" for i in range(5000))  # 5,000 words, over the model's 1,024 positions

# (name, bytes of the line without its "\n"); the model knows the words s0..s23.
HOSTILE = [
    ("plain", b"s1 s2 s3"),
    ("empty", b""),
    ("blank", b" \t  "),
    ("long", LONG.encode()),
    ("control", b"s1 \x00 s2 \x07 s3 \x1b[31m s4 \x0b s5 \x0c s6 \x1c s7 \x7f s8"),
    ("lone CR", b"s1 s2\rs3 s4"),
    ("separators", "s1 \u0085 s2 \u2028 s3 \u2029 s4".encode()),
    ("not UTF-8", b"s1 \xff\xfe s2 \xc3\x28 s3"),
    ("emoji", "s1 \U0001f600 s2 \U0001f469\u200d\U0001f469\u200d\U0001f467 s3".encode()),
    ("right-to-left", "\u05e9\u05dc\u05d5\u05dd s1 \u0645\u0631\u062d\u0628\u0627 s2 \u200f".encode()),
    ("CRLF", b"s5 s6\r"),
    ("CRLF blank", b"  \r"),
    ("last, no newline", b"s7 s8"),
]
NAMES = [name for name, _ in HOSTILE]


@pytest.fixture(scope="module")
def demo_work(toy_bin, smoke_checkpoint_dir, tmp_path_factory):
    """A demo work folder as scripts/demo.sh leaves it (BPE codes, de/en dictionaries), with the
    session's smoke model; the toy words pass through the tokeniser unchanged."""
    work = tmp_path_factory.mktemp("demo_work")
    seg = work / "bpe"
    (seg / "data-bin").mkdir(parents=True)
    (work / "latest").write_text("bpe\n")
    shutil.copy(toy_bin / "dict.src.txt", seg / "data-bin" / "dict.de.txt")  # a joined dictionary
    shutil.copy(toy_bin / "dict.tgt.txt", seg / "data-bin" / "dict.en.txt")
    mt_prep.learn_bpe([toy_bin.parent / "raw" / "train.src"], seg / "code", 60)
    return work, smoke_checkpoint_dir / "checkpoint_last.pt"


def test_translate_sh_gives_one_line_per_hostile_line(demo_work):
    work, ckpt = demo_work
    data = b"\n".join(line for _, line in HOSTILE)  # no final newline: the last line still counts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DEMO_WORK": str(work),
           "TRANSLATE_CHECKPOINT": str(ckpt), "DEMO_BEAM": "2"}  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/translate.sh"], cwd=REPO, env=env, input=data, capture_output=True, timeout=600
    )
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(HOSTILE), proc.stdout[:2000]  # one line each, no more
    out = dict(zip(NAMES, out))
    for name in NAMES:  # blank input, blank output; every other line is translated
        blank = name in ("empty", "blank", "CRLF blank")
        assert (out[name] == "") == blank, (name, out[name])
    err = proc.stderr
    line = {name: i + 1 for i, name in enumerate(NAMES)}
    for name, message in [
        ("empty", "empty, not translated"),
        ("blank", "empty, not translated"),
        ("CRLF blank", "empty, not translated"),
        ("long", "subword tokens, cut to the first"),
        ("not UTF-8", "not UTF-8 replaced by U+FFFD"),
        ("control", "control characters replaced by spaces"),
        ("lone CR", "control characters replaced by spaces"),
        ("separators", "control characters replaced by spaces"),
    ]:
        assert f"[translate] line {line[name]}: " in err and re.search(
            rf"^\[translate\] line {line[name]}: .*{re.escape(message)}", err, re.M
        ), (name, err[-2000:])
    controls = {int(n) for n in re.findall(r"^\[translate\] line (\d+): control characters", err, re.M)}
    assert controls == {line["control"], line["lone CR"], line["separators"]}  # a tab or "\r\n" is no control
    for name in ("plain", "emoji", "right-to-left", "CRLF", "last, no newline"):  # nothing to report
        assert f"[translate] line {line[name]}: " not in err, name


def test_interactive_with_hostile_lines(toy_bin, smoke_checkpoint_dir):
    """fairseq-interactive by itself (valid UTF-8; it stops on other bytes, see translate.sh): one
    hypothesis per line, blank lines included, except the line longer than the model's positions,
    which --skip-invalid-size-inputs-valid-test skips with a warning naming its id."""
    lines = [line for name, line in HOSTILE if name not in ("not UTF-8", "lone CR")]
    names = [name for name in NAMES if name not in ("not UTF-8", "lone CR")]
    proc = run(
        [
            cli("fairseq-interactive"),
            toy_bin,
            "--user-dir",
            USER_DIR,
            "--path",
            smoke_checkpoint_dir / "checkpoint_last.pt",
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--beam",
            "2",
            "--cpu",
            "--skip-invalid-size-inputs-valid-test",
            "--buffer-size",
            "4",
        ],  # fmt: skip
        input=b"\n".join(lines).decode() + "\n",
    )
    ids = sorted(int(i) for i in re.findall(r"^H-(\d+)\t", proc.stdout, flags=re.M))
    long_id = names.index("long")
    assert ids == [i for i in range(len(lines)) if i != long_id]
    assert re.search(rf"samples have invalid sizes and will be skipped.*ids=\[{long_id}\]", proc.stderr)


def test_generate_on_a_binarised_hostile_test_set(toy_bin, smoke_checkpoint_dir, tmp_path):
    """fairseq-preprocess then fairseq-generate: every sentence gets its hypothesis (the empty and
    blank ones too), except the over-long one, skipped with a warning naming its id."""
    keep = [(n, b) for n, b in HOSTILE if n not in ("not UTF-8", "lone CR")]  # the binariser reads UTF-8 lines
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "test.src").write_bytes(b"\n".join(b for _, b in keep) + b"\n")
    (raw / "test.tgt").write_bytes(b"t1 t2\n" * len(keep))
    data = tmp_path / "bin"
    run([
        cli("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt", "--testpref", raw / "test",
        "--destdir", data, "--srcdict", toy_bin / "dict.src.txt", "--tgtdict", toy_bin / "dict.tgt.txt",
        "--workers", "1",
    ])  # fmt: skip
    proc = generate(data, smoke_checkpoint_dir / "checkpoint_last.pt", extra=["--skip-invalid-size-inputs-valid-test"])
    hyps = parse_generate(proc.stdout)
    long_id = [n for n, _ in keep].index("long")
    assert sorted(hyps) == [i for i in range(len(keep)) if i != long_id]
    for name in ("empty", "blank", "CRLF blank"):  # an empty source is still translated
        assert hyps[[n for n, _ in keep].index(name)]["S"].strip() == ""
    log = proc.stdout + proc.stderr
    assert re.search(rf"samples have invalid sizes and will be skipped.*ids=\[{long_id}\]", log), log[-2000:]
