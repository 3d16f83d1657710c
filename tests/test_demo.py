"""Cheap checks of the demo (scripts/demo.sh) and scripts/translate.sh. The real 15-minute demo run
is not part of the test suite; here the same script runs on a 300-sentence slice of the shipped
corpus with a tiny model and a handful of updates."""

import gzip
import os
import re
import subprocess
from pathlib import Path

import pytest

from fairseq_clusterformer.tools import mt_prep

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "examples" / "translation"
MULTI30K = REPO / "data" / "multi30k"


TINY_MODEL = (
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 "
    "--encoder-attention-heads 2 --decoder-attention-heads 2"
)


def run(cmd, env=None, input=None, timeout=600):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=REPO, env=full_env, input=input, capture_output=True, text=True, timeout=timeout)


def test_demo_help():
    proc = run(["bash", "scripts/demo.sh", "--help"])
    assert proc.returncode == 0, proc.stderr
    for word in ("Usage:", "--retrain", "--sentencepiece", "test_2016_flickr", "DEMO_ARCH"):
        assert word in proc.stdout
    bad = run(["bash", "scripts/demo.sh", "--no-such-option"])
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    bad = run(["bash", "scripts/demo.sh"], env={"DEMO_SCHEDULE": "cosine", "DEMO_WORK": "/nonexistent/demo"})
    assert bad.returncode == 1 and "DEMO_SCHEDULE must be linear or inverse_sqrt, not 'cosine'" in bad.stderr
    assert "setup" not in bad.stdout  # refused before anything is set up or written


def test_translate_without_model_says_run_demo_first(tmp_path):
    proc = run(
        ["bash", "scripts/translate.sh"], env={"DEMO_WORK": str(tmp_path / "nothing")}, input="Ein Hund läuft.\n"
    )
    assert proc.returncode != 0
    assert "run bash scripts/demo.sh first" in proc.stderr
    assert run(["bash", "scripts/translate.sh", "--help"]).stdout.startswith("Translate German")


def test_tokenise_and_bpe_on_a_few_multi30k_lines(tmp_path):
    with gzip.open(MULTI30K / "train.de.gz", "rt", encoding="utf-8") as f:
        de = [next(f).rstrip("\n") for _ in range(200)]
    tok = list(mt_prep.tokenize(de, "de"))
    assert tok[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche ."
    assert all(t == " ".join(t.split()) for t in tok)
    (tmp_path / "train.de").write_text("\n".join(tok) + "\n", encoding="utf-8")
    mt_prep.learn_bpe([tmp_path / "train.de"], tmp_path / "code", 100)
    bpe = list(mt_prep.apply_bpe(tok, tmp_path / "code"))
    assert any("@@ " in line for line in bpe)
    assert list(mt_prep.remove_bpe(bpe)) == tok
    detok = list(mt_prep.detokenize(tok[:5], "de"))
    assert detok[0] == de[0]


def _slice_corpus(dest, n_train=300, n_small=20):
    dest.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_small), ("test_2016_flickr", n_small)):
        for lang in ("de", "en"):
            with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            with gzip.open(dest / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(lines)
    return dest


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = {
        "DEMO_DATA": str(_slice_corpus(root / "data")),
        "DEMO_WORK": str(root / "work"),
        "DEMO_SKIP_SETUP": "1",
        "DEMO_MODEL_ARGS": TINY_MODEL,
        "DEMO_MAX_UPDATE": "4",
        "DEMO_BPE_OPS": "200",
        "DEMO_BEAM": "2",
        "DEMO_MAX_TOKENS": "1000",
    }
    first = run(["bash", "scripts/demo.sh"], env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return env, root / "work", first


def test_tiny_demo_runs_end_to_end(tiny_demo):
    env, work, first = tiny_demo
    out = first.stdout
    assert "1/5 tokenising" in out and "4/5 training" in out and "5/5 translating all 20 sentences" in out
    assert re.search(
        r"^demo BLEU \(sacrebleu, Multi30k test_2016, de-en\): \d+\.\d\d$", out.rstrip("\n").splitlines()[-1]
    ), out[-500:]
    assert (work / "bpe" / "checkpoints" / "checkpoint_last.pt").is_file()
    trained_with = (work / "bpe" / "checkpoints" / ".done").read_text()  # the default schedule
    assert "--lr-scheduler inverse_sqrt --warmup-init-lr 1e-07" in trained_with
    assert len(mt_prep.read_lines(work / "bpe" / "output" / "hyp.detok.en")) == 20


def test_tiny_demo_second_run_reuses_everything(tiny_demo):
    env, work, _ = tiny_demo
    again = run(["bash", "scripts/demo.sh"], env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    for step in (
        "1/5 tokenised data exists, skipping",
        "2/5 bpe segmentation exists, skipping",
        "3/5 binarised data exists, skipping",
        "4/5 trained model exists, skipping",
        "5/5 translations exist, skipping",
    ):
        assert step in again.stdout
    assert again.stdout.rstrip().splitlines()[-1].startswith("demo BLEU")


def test_translate_with_the_tiny_demo_model(tiny_demo):
    env, _, _ = tiny_demo
    proc = run(
        ["bash", "scripts/translate.sh"],
        env={"DEMO_WORK": env["DEMO_WORK"]},
        input="Ein Hund läuft im Park.\nZwei Männer spielen Fußball.\n",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2  # one English line per German line (any quality)


def test_tiny_demo_retrains_with_the_linear_schedule(tiny_demo):
    """DEMO_SCHEDULE=linear: a decay that reaches 0 at the run's last update (DEMO_MAX_UPDATE=4);
    --retrain keeps the prepared data. (Last in this file: it replaces the tiny demo's model.)"""
    env, work, _ = tiny_demo
    again = run(["bash", "scripts/demo.sh", "--retrain"], env={**env, "DEMO_SCHEDULE": "linear"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3/5 binarised data exists, skipping" in again.stdout and "4/5 training" in again.stdout
    trained_with = (work / "bpe" / "checkpoints" / ".done").read_text()
    assert "--lr-scheduler polynomial_decay --total-num-update 4 --end-learning-rate 0 --power 1" in trained_with
    assert again.stdout.rstrip().splitlines()[-1].startswith("demo BLEU")
