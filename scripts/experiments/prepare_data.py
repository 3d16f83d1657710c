#!/usr/bin/env python3
"""Prepare the two data sets of the side-by-side experiments (offline, CPU, a few minutes).

    python -m scripts.experiments.prepare_data multi30k   # -> work/experiments/data/multi30k
    python -m scripts.experiments.prepare_data iwslt14 --source ../shared/data/iwslt14
                                                          # -> work/experiments/data/iwslt14

(``python -m scripts.experiments.run_side_by_side prepare DATASET`` runs the same.) Run from the
checkout: it reads the shipped corpus in data/multi30k and writes under work/experiments/data.

multi30k: the shipped Multi30k de-en (data/multi30k: train 29,000, val 1,014, test_2016_flickr
1,000, test_2017_flickr 1,000 pairs), Moses-tokenised (sacremoses, case kept), a joint subword-nmt
BPE (8,000 merges) learnt on train, binarised with fairseq-preprocess --joined-dictionary: valid =
val, test = test_2016_flickr, test1 = test_2017_flickr. This is scripts/demo.sh's preparation; when
the demo has already tokenised and segmented the corpus (work/demo/tok, work/demo/bpe), its files
and BPE codes are reused, and only test_2017 is tokenised and segmented here.

iwslt14: the offline IWSLT14 de-en material such as ../shared/data/iwslt14 (already lowercased,
tokenised and BPE'd with fairseq's prepare-iwslt14.sh code): train = train-sample/train (4,600) +
train-sample/sample2 (4,200) + the lines of valid.* not held out; valid = every 7th line of valid.*
(1,041 held out); test = the official test set (test.*, 6,750). Binarised with --joined-dictionary.

Each data set folder gets a dataset.json that scripts/experiments/run_side_by_side.py reads: the
binarised data, and per test subset the untokenised reference that sacrebleu scores against.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from fairseq_clusterformer.tools import mt_prep

from . import expkit
from .expkit import REPO, say, tool

WORK = REPO / "work" / "experiments" / "data"
MULTI30K = REPO / "data" / "multi30k"
DEMO = REPO / "work" / "demo"


def binarise(prefix_dir, dest, src, tgt, train="train", valid="valid", tests=("test",), workers=1):
    dest = Path(dest)
    if (dest / ".done").exists():
        say(f"binarised data exists: {dest}")
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [
        tool("fairseq-preprocess"),
        "--source-lang",
        src,
        "--target-lang",
        tgt,
        "--trainpref",
        f"{prefix_dir}/{train}",
        "--validpref",
        f"{prefix_dir}/{valid}",
        "--testpref",
        ",".join(f"{prefix_dir}/{t}" for t in tests),
        "--destdir",
        dest,
        "--joined-dictionary",
        "--workers",
        str(workers),
    ]
    say("binarising: " + expkit.shell_join(cmd))
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=expkit.child_env(), capture_output=True, text=True)
    (dest.parent / "preprocess.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"fairseq-preprocess failed:\n{proc.stderr[-3000:]}")
    (dest / ".done").write_text(expkit.shell_join(cmd) + "\n")
    return dest


def write_dataset_json(root, meta):
    (Path(root) / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(f"wrote {Path(root) / 'dataset.json'}")


def prepare_multi30k(root, bpe_ops=8000, workers=1, raw=MULTI30K):
    root = Path(root)
    tok, seg = root / "tok", root / "bpe"
    tok.mkdir(parents=True, exist_ok=True)
    seg.mkdir(parents=True, exist_ok=True)
    splits = ["train", "val", "test_2016_flickr", "test_2017_flickr"]
    demo_seg = DEMO / "bpe"
    reuse = (DEMO / "tok" / ".done").exists() and (demo_seg / ".seg.done").exists() and (demo_seg / "code").exists()
    if reuse:
        say(f"reusing the demo's tokenised and BPE'd Multi30k ({DEMO}/tok, {demo_seg})")
    for split in splits:
        for lang in ("de", "en"):
            out_tok, demo_tok = tok / f"{split}.{lang}", DEMO / "tok" / f"{split}.{lang}"
            if out_tok.exists():
                continue
            if reuse and demo_tok.exists():
                shutil.copy(demo_tok, out_tok)
            else:
                say(f"tokenising {split}.{lang}")
                mt_prep.write_lines(
                    out_tok, mt_prep.tokenize(mt_prep.open_text(raw / f"{split}.{lang}.gz"), lang, workers=workers)
                )
    code = seg / "code"
    if not code.exists():
        if reuse:
            shutil.copy(demo_seg / "code", code)
        else:
            say(f"learning a joint BPE ({bpe_ops} merges) on train.de + train.en")
            mt_prep.learn_bpe([tok / "train.de", tok / "train.en"], code, bpe_ops)
    for split in splits:
        for lang in ("de", "en"):
            out = seg / f"{split}.{lang}"
            if out.exists():
                continue
            if reuse and (demo_seg / f"{split}.{lang}").exists():
                shutil.copy(demo_seg / f"{split}.{lang}", out)
            else:
                mt_prep.write_lines(
                    out, mt_prep.apply_bpe(mt_prep.open_text(tok / f"{split}.{lang}"), code, workers=workers)
                )
    bin_dir = binarise(
        seg, root / "data-bin", "de", "en", valid="val", tests=("test_2016_flickr", "test_2017_flickr"), workers=workers
    )
    write_dataset_json(
        root,
        {
            "name": "multi30k",
            "description": "Multi30k de-en (data/multi30k): Moses tokeniser (sacremoses), joint subword-nmt "
            f"BPE ({'the demo codes' if reuse else f'{bpe_ops} merges'}) learnt on train; "
            "train 29,000 / val 1,014 pairs",
            "src": "de",
            "tgt": "en",
            "data_bin": str(bin_dir),
            "remove_bpe": "subword_nmt",
            "detok_lang": "en",
            "tests": [
                {"subset": "test", "label": "test_2016", "ref": str(raw / "test_2016_flickr.en.gz")},
                {"subset": "test1", "label": "test_2017", "ref": str(raw / "test_2017_flickr.en.gz")},
            ],
        },
    )
    return root


def prepare_iwslt14(root, source, every=7, workers=1):
    root = Path(root)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    if not (raw / ".done").exists():
        de = mt_prep.read_lines(source / "train-sample" / "train.de")
        en = mt_prep.read_lines(source / "train-sample" / "train.en")
        assert len(de) == len(en), "train-sample/train.de and .en differ in length"
        n_sample = len(de)
        n_tsv = 0
        for line in mt_prep.open_text(source / "train-sample" / "sample2.de+en.tsv"):
            if "\t" not in line:
                continue
            a, b = line.split("\t", 1)
            de.append(a.strip())
            en.append(b.strip())
            n_tsv += 1
        vde = mt_prep.read_lines(source / "valid.de")
        ven = mt_prep.read_lines(source / "valid.en")
        held_de, held_en = [], []
        for i, (a, b) in enumerate(zip(vde, ven), start=1):
            if i % every == 0:
                held_de.append(a)
                held_en.append(b)
            else:
                de.append(a)
                en.append(b)
        held = set(zip(held_de, held_en))
        keep = [(a, b) for a, b in zip(de, en) if a.strip() and b.strip() and (a, b) not in held]
        mt_prep.write_lines(raw / "train.de", (a for a, _ in keep))
        mt_prep.write_lines(raw / "train.en", (b for _, b in keep))
        mt_prep.write_lines(raw / "valid.de", held_de)
        mt_prep.write_lines(raw / "valid.en", held_en)
        for lang in ("de", "en"):
            shutil.copy(source / f"test.{lang}", raw / f"test.{lang}")
        # The reference for sacrebleu: the (lowercased, tokenised) test.en with BPE removed, then
        # Moses-detokenised; the hypotheses are detokenised the same way.
        mt_prep.write_lines(
            raw / "test.ref.detok.en",
            mt_prep.detokenize(mt_prep.remove_bpe(mt_prep.open_text(source / "test.en")), "en"),
        )
        counts = {
            "train-sample/train": n_sample,
            "train-sample/sample2": n_tsv,
            "valid lines used for training": len(vde) - len(held_de),
            "held-out valid": len(held_de),
            "train pairs kept": len(keep),
            "test": len(mt_prep.read_lines(source / "test.en")),
        }
        (raw / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
        (raw / ".done").write_text("ok\n")
        say(f"IWSLT14 raw BPE'd files: {counts}")
    bin_dir = binarise(raw, root / "data-bin", "de", "en", workers=workers)
    counts = json.loads((raw / "counts.json").read_text())
    write_dataset_json(
        root,
        {
            "name": "iwslt14",
            "description": "IWSLT14 de-en offline sample (lowercased, tokenised, BPE'd by prepare-iwslt14.sh): "
            f"train {counts['train pairs kept']} pairs (train-sample + sample2 + valid minus "
            f"every {every}th line), valid {counts['held-out valid']} held-out lines, "
            f"test {counts['test']} (official)",
            "src": "de",
            "tgt": "en",
            "data_bin": str(bin_dir),
            "remove_bpe": "subword_nmt",
            "detok_lang": "en",
            "tests": [{"subset": "test", "label": "test", "ref": str(raw / "test.ref.detok.en")}],
        },
    )
    return root


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("dataset", choices=("multi30k", "iwslt14"))
    p.add_argument("--work", type=Path, default=WORK, help="parent folder (default: %(default)s)")
    p.add_argument("--bpe-ops", type=int, default=8000, help="multi30k: BPE merges (default 8000, as the demo)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help="iwslt14: the folder of the offline IWSLT14 material (test.de, valid.de, "
        "train-sample/, ...), e.g. ../shared/data/iwslt14; multi30k: the folder of the "
        "gzipped corpus (default: data/multi30k of this checkout)",
    )
    a = p.parse_args(argv)
    if a.dataset == "multi30k":
        prepare_multi30k(a.work / "multi30k", a.bpe_ops, a.workers, **({"raw": a.source} if a.source else {}))
    else:
        if a.source is None:
            p.error("iwslt14 needs --source DIR: the offline IWSLT14 material (e.g. ../shared/data/iwslt14)")
        if not (a.source / "test.de").exists():
            p.error(f"--source {a.source} does not hold the IWSLT14 material (no test.de there)")
        prepare_iwslt14(a.work / "iwslt14", a.source, workers=a.workers)


if __name__ == "__main__":
    main()
