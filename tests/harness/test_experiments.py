"""Smoke tests of the experiment harness: python -m scripts.experiments.run_side_by_side (prepare, run,
refresh) and scripts.experiments.report, on the toy corpus with tiny models and a few updates, and
the report against the committed raw results. The real runs (minutes to hours) and their results
are in docs/results.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch

from fairseq_helpers import REPO, run
from scripts.experiments import expkit, report, run_side_by_side

PY = sys.executable
TINY_MODEL = (
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
    "--decoder-attention-heads 2 --share-all-embeddings"
)


def test_repetition_rate():
    hyps = ["a b c a b c a b c", "a group of a group of a group of men", "a dog runs .", ""]
    assert expkit.repetition_rate(hyps) == 50.0


def test_side_by_side_plan_ablations():
    plan = run_side_by_side.plan_runs(["clusterformer", "transformer"], ["base", "no-sorting-loss"], [1, 4], [1, 2])
    names = [(m, v, s) for m, v, _, _, s in plan]
    assert names[:5] == [
        ("clusterformer", "base", 1),
        ("clusterformer", "no-sorting-loss", 1),
        ("clusterformer", "k=1", 1),
        ("clusterformer", "k=4", 1),
        ("transformer", "base", 1),
    ]
    assert len(plan) == 10  # the ablations run for clusterformer only
    args = {v: a for _, v, a, _, _ in plan}
    assert args["no-sorting-loss"] == ["--sorting-loss-weight", "0"] and args["k=4"] == ["--num-clusters", "4"]
    labelled = run_side_by_side.plan_runs(
        ["clusterformer"], ["base", "no-clustering-loss"], [2], [1], label="w8", extra=["--causal-window", "8"]
    )
    assert [(v, a) for _, v, a, _, _ in labelled] == [
        ("w8", ["--causal-window", "8"]),
        ("no-clustering-loss+w8", ["--clustering-loss-weight", "0", "--causal-window", "8"]),
        ("k=2+w8", ["--num-clusters", "2", "--causal-window", "8"]),
    ]


def test_side_by_side_smoke_and_report(toy_bin, tmp_path, capsys):
    ds = tmp_path / "toyds"
    ds.mkdir()
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "name": "toy",
                "src": "src",
                "tgt": "tgt",
                "data_bin": str(toy_bin),
                "remove_bpe": "subword_nmt",
                "detok_lang": "en",
                "tests": [{"subset": "test", "label": "test", "ref": str(toy_bin.parent / "raw" / "test.tgt")}],
            }
        )
    )
    work = tmp_path / "work"
    proc = run(
        [
            PY,
            "-m",
            "scripts.experiments.run_side_by_side",
            "run",
            "--dataset",
            ds,
            "--work",
            work,
            "--code",
            "worktree",
            "--max-update",
            "3",
            "--max-tokens",
            "500",
            "--beam",
            "1",
            "--generate-args",
            "--max-len-b 40",
            "--model-args",
            TINY_MODEL,
        ],
        timeout=300,
    )
    assert proc.stdout.count("sacrebleu") >= 2
    records = expkit.read_jsonl(work / "results.jsonl")
    assert [(r["model"], r["variant"]) for r in records] == [("clusterformer", "base"), ("transformer", "base")]
    for r in records:
        assert r["updates"] == 3 and r["peak_rss_mb"] > 0 and r["train_wall_clock_s"] > 0
        assert r["curve"] and r["best_valid_nll"] is not None
        (t,) = r["tests"]
        assert t["n"] == 20 and t["bleu_tok"] is not None
        # The recorded scores are those of the kept translations: recomputed here from the files.
        hyps = (Path(r["run_dir"]) / "output" / f"hyp.{t['label']}.detok").read_text().splitlines()
        tok = (Path(r["run_dir"]) / "output" / f"hyp.{t['label']}.tok").read_text().splitlines()
        refs = (toy_bin.parent / "raw" / "test.tgt").read_text().splitlines()
        assert len(hyps) == len(refs) == 20
        assert t["sacrebleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
        assert t["repeat_pct"] == expkit.repetition_rate(tok)
        assert "fairseq-generate" in t["command"] and "--required-batch-size-multiple 1" in t["command"]
        assert "--max-len-b 40" in t["command"] and " --cpu " in t["command"]
        assert r["device"] == "cpu" and " --cpu " in r["train_command"] and "gpu" not in r["machine"]
    assert (work / "results.csv").read_text().startswith("run_id,")
    # recorded runs are skipped
    run_side_by_side.main(
        [
            "run",
            "--dataset",
            str(ds),
            "--work",
            str(work),
            "--code",
            "worktree",
            "--max-update",
            "3",
            "--models",
            "transformer",
            "--max-tokens",
            "500",
            "--beam",
            "1",
            "--model-args",
            TINY_MODEL,
        ]
    )
    assert "already in" in capsys.readouterr().out and len(expkit.read_jsonl(work / "results.jsonl")) == 2
    md = tmp_path / "results.md"
    md.write_text("# hand-written intro\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\nhand-written conclusion\n")
    run_side_by_side.main(
        ["report", "--results", str(work / "results.jsonl"), "--md", str(md), "--img-dir", str(tmp_path / "img")]
    )
    text = md.read_text()
    assert text.startswith("# hand-written intro") and text.rstrip().endswith("hand-written conclusion")
    assert "old" not in text.split(report.BEGIN)[1].split(report.END)[0].split()
    assert "| clusterformer | base | 3 | 1 |" in text and "| transformer | base | 3 | 1 |" in text
    assert "ClusterFormer minus Transformer (3 updates, seeds 1" in text
    assert "fairseq-train" in text and (tmp_path / "img" / "curves_toy.png").exists()


def test_prepare_data_needs_an_explicit_iwslt14_source(tmp_path):
    prepare = [PY, "-m", "scripts.experiments.prepare_data"]
    proc = subprocess.run([*prepare, "iwslt14", "--work", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "iwslt14 needs --source DIR" in proc.stderr
    proc = subprocess.run(
        [*prepare, "iwslt14", "--work", str(tmp_path), "--source", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "does not hold the IWSLT14 material" in proc.stderr


def test_check_offline_answers_help():
    proc = subprocess.run([PY, "-m", "scripts.check_offline", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]


# ------------------------------------------------------------------ report from committed results


def _generated_blocks(text):
    return [text[block.start : block.stop] for block, _, _ in report.report_blocks(text)]


@pytest.mark.parametrize("doc", ["docs/results.md", "docs/results/appendix.md"])
def test_report_rebuilds_docs_results_from_the_committed_raw_results(tmp_path, doc):
    """docs/results.md's and its appendix's generated blocks are what `report` makes of the
    committed raw results they name (docs/results/*): rebuilding a copy changes nothing."""
    import shutil

    text = (REPO / doc).read_text()
    blocks = _generated_blocks(text)
    sources = [src for _, _, src in report.report_blocks(text)]
    assert blocks and all(src and src.startswith("docs/results/") for src in sources)
    img = tmp_path / "docs" / "img"  # the same place relative to the document as in the repository
    img.mkdir(parents=True)
    for png in (REPO / "docs" / "img").glob("curves_*.png"):
        shutil.copy(png, img / png.name)  # plots the records cannot redraw stay as they are
    md = tmp_path / doc
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text.replace(blocks[0], blocks[0].replace("| transformer |", "| stale |")))
    run_side_by_side.main(["report", "--md", str(md), "--img-dir", str(img)])
    assert _generated_blocks(md.read_text()) == blocks
    if doc.endswith("appendix.md"):
        # the transcribed quick-setting records give the published per-seed values and means
        quick = expkit.read_jsonl(REPO / "docs" / "results" / "multi30k_quick.jsonl")
        tf = [r for r in quick if r["model"] == "transformer" and r["variant"] == "base"]
        assert [r["best_valid_nll"] for r in tf] == [4.685, 4.607]
        assert "| transformer | base | 400 | 1,2 | 4.646 [4.685, 4.607] | 19.56 [18.41, 20.71] |" in text
        # a study recipe run at two budgets (the demo's setting) names the budget in each row
        assert "| clusterformer | base (800 updates) | 4.0 ± 0.0 [4.0, 4.0] | 1,2 |" in text
        # commands name the commit they ran at, not the code snapshot under work/
        assert "At commit `9d0e43a3ba5e`" in text and "work/experiments/code" not in text
    else:
        assert "| ClusterFormer is better than the Transformer |" in text


def test_report_refuses_to_replace_a_table_with_nothing(tmp_path):
    md = tmp_path / "results.md"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    begin = report.BEGIN[: -len(" -->")]
    original = f"# intro\n\n{begin} from {empty} -->\n| kept | table |\n{report.END}\n"
    md.write_text(original)
    proc = subprocess.run(
        [PY, "-m", "scripts.experiments.run_side_by_side", "report", "--md", str(md), "--img-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "no run records in" in proc.stderr and "left unchanged" in proc.stderr
    assert md.read_text() == original
    # a missing file, and a block without a source given a missing --results, are refused alike
    md.write_text(original.replace(str(empty), str(tmp_path / "missing.jsonl")))
    with pytest.raises(SystemExit):
        report.report([tmp_path / "nothing.jsonl"], md, tmp_path)
    md.write_text(f"{report.BEGIN}\n| kept |\n{report.END}\n")
    with pytest.raises(SystemExit):
        report.report([tmp_path / "nothing.jsonl"], md, tmp_path)
    assert md.read_text() == f"{report.BEGIN}\n| kept |\n{report.END}\n"


def test_report_renders_a_published_choose_k_result(tmp_path):
    """A block naming a clusterformer-choose-k result (as scripts/experiments/choose_k_multi30k.sh
    publishes it) gets its table, recommendation, plot and command; a missing result is an error
    and leaves the document as it was."""
    result = json.loads((REPO / "docs" / "results" / "choose_k_multi30k.json").read_text())
    published = tmp_path / "docs" / "results" / "choose_k_toy.json"
    published.parent.mkdir(parents=True)
    published.write_text(json.dumps(result))
    md = tmp_path / "docs" / "results.md"
    begin = report.BEGIN[: -len(" -->")] + f" from {published} -->"
    md.write_text(f"# r\n\n{begin}\nold\n{report.END}\n\nhand-written\n")
    report.report([], md, tmp_path / "docs" / "img")
    text = md.read_text()
    assert "old" not in text and text.endswith("hand-written\n")
    assert f"Recommended k = {result['recommended_k']}" in text
    nll_row = next(line for line in text.splitlines() if line.startswith("| valid nll at "))
    assert nll_row.count("|") == len(result["per_k"]) + 2 and f"{result['per_k'][0]['valid_nll']:.3f}" in nll_row
    assert result["invocation"] in text
    assert (tmp_path / "docs" / "img" / "choose_k_toy.png").read_bytes()[:4] == b"\x89PNG"
    published.unlink()  # a missing result: an error, and the document is left as it was
    with pytest.raises(SystemExit, match="choose_k_toy.json"):
        report.report([], md, tmp_path / "docs" / "img")
    assert md.read_text() == text


def _files(folder, skip=()):
    return {
        p: p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not any(p == s or s in p.parents for s in skip)
    }


def test_report_only_reads_the_raw_results_and_refresh_updates_them(tmp_path):
    """report writes the document and its plots, nothing else, even where a run's training log on
    this machine would change a record; `run_side_by_side refresh` is what updates the record."""
    run_dir = tmp_path / "runs" / "toy.transformer.base.s1.3"
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "train.log").write_text(
        "# command: fairseq-train a\n"
        "| INFO | valid | epoch 001 | valid on 'valid' subset | loss 4 | nll_loss 2.5 | num_updates 3\n"
        "| INFO | train | epoch 001 | loss 5 | wpb 100 | num_updates 3 | train_wall 2\n"
        "| INFO | fairseq_cli.train | done training in 3.0 seconds\n"
    )
    (run_dir / "output" / "hyp.test.tok").write_text("a b c a b c a b c\nt1 t2\n")
    record = {
        "run_id": "toy.transformer.base.s1.3", "dataset": "toy", "model": "transformer", "variant": "base",
        "seed": 1, "max_update": 3, "updates": 3, "epochs": 1, "params": 10, "best_valid_nll": 2.5,
        "best_valid_updates": 3, "train_wall_clock_s": 60.0, "train_wall_s": 50.0, "tokens_per_s": 1000.0,
        "train_tokens": 5, "peak_rss_mb": 800.0, "train_command": "fairseq-train", "run_dir": str(run_dir),
        "tests": [{"label": "test", "sacrebleu": 1.0, "bleu_tok": 1.0, "command": "fairseq-generate"}],
    }  # fmt: skip
    results = tmp_path / "raw" / "toy.jsonl"
    results.parent.mkdir()
    results.write_text(json.dumps(record, sort_keys=True) + "\n")
    md, img = tmp_path / "doc" / "results.md", tmp_path / "doc" / "img"
    before = _files(tmp_path)
    assert report.main(["--results", str(results), "--md", str(md), "--img-dir", str(img)]) == 0
    assert "| transformer | base | 3 | 1 | 2.500 |" in md.read_text()
    assert _files(tmp_path, skip=(md, img)) == before  # the records, logs and translations as they were
    run_side_by_side.main(["refresh", "--results", str(results)])
    (refreshed,) = expkit.read_jsonl(results)
    assert refreshed["train_wall_s"] == 2 and refreshed["tokens_per_s"] == 150.0
    assert refreshed["tests"][0]["repeat_pct"] == 50.0


def test_mean_cell_with_std():
    assert report._mean_cell([30.0, 32.0, 34.0], std=True) == "32.00 ± 2.00 [30.00, 32.00, 34.00]"
    assert report._mean_cell([1.0, 2.0]) == "1.50 [1.00, 2.00]"
    assert report._mean_cell([1.0, 2.0], mean=1.6) == "1.60 [1.00, 2.00]"
    assert report._mean_cell([None, 3.0], std=True) == "3.00"


# ---------------------------------------------------------------------------- converged recipe


def test_parse_segments_of_a_resumed_log():
    def epoch(e, updates, wall, wpb=100):
        return (
            f"2026-01-01 00:00:0{e} | INFO | valid | epoch {e:03d} | valid on 'valid' subset | loss 4 "
            f"| nll_loss {5 - e / 10} | num_updates {updates}\n"
            f"2026-01-01 00:00:0{e} | INFO | train | epoch {e:03d} | loss 5 | wpb {wpb} "
            f"| num_updates {updates} | train_wall {wall}\n"
        )

    # the first process finished epochs 1 and 2 and was killed after logging epoch 3 but before
    # its checkpoint; the second redid epoch 3, did 4 and stopped early
    log = (
        "# command: fairseq-train a\n"
        + epoch(1, 10, 5)
        + epoch(2, 20, 5)
        + epoch(3, 30, 9, wpb=999)
        + "# command: fairseq-train a\n"
        + epoch(3, 30, 5)
        + epoch(4, 40, 5)
        + "| INFO | fairseq_cli.train | early stop since valid performance hasn't improved for last 3 runs\n"
        + "| INFO | fairseq_cli.train | done training in 9.0 seconds\n"
    )
    parsed = run_side_by_side.parse_segments(log)
    assert parsed["segments"] == 2 and parsed["done"] and parsed["early_stop"]
    assert [r["epoch"] for r in parsed["train"]] == [1, 2, 3, 4]
    assert [v["num_updates"] for v in parsed["valid"]] == [10, 20, 30, 40]
    assert parsed["updates"] == 40 and parsed["train_tokens"] == 4000 and parsed["train_wall_s"] == 20
    assert parsed["tokens_per_s"] == 200.0
    # killed before it finished: not done
    assert not run_side_by_side.parse_segments(log.split("# command: fairseq-train a\n" + epoch(3, 30, 5))[0])["done"]


def test_killed_process_walls_count_the_time_of_unrecorded_processes():
    """A resumed run's wall clock adds, for each process killed before the runner recorded it,
    fairseq's wall clock at that process's last epoch summary (not its per-interval wall=)."""

    def part(walls, done=False):
        lines = ["# command: fairseq-train a"]
        for e, w in enumerate(walls, 1):
            lines.append(f"| INFO | train_inner | epoch {e:03d}:  50 / 245 loss=5, train_wall=1, wall={w - 1}")
            lines.append(f"| INFO | train | epoch {e:03d} | loss 5 | num_updates {e} | train_wall 3 | wall {w}")
        lines.append(f"| INFO | train_inner | epoch {len(walls) + 1:03d}:  50 / 245 loss=5, wall=999")
        return "\n".join(lines + (["| INFO | fairseq_cli.train | done training in 9.0 seconds"] if done else [])) + "\n"

    killed_twice = part([100, 200]) + part([50]) + part([70, 140], done=True)
    assert run_side_by_side.killed_process_walls(killed_twice, 1) == [200.0, 50.0]
    # a process that failed was recorded (segments.jsonl), so only the earliest one counts here
    assert run_side_by_side.killed_process_walls(killed_twice, 2) == [200.0]
    assert run_side_by_side.killed_process_walls(part([10], done=True), 1) == []
    assert run_side_by_side.killed_process_walls(part([]) + part([5], done=True), 1) == [0.0]


def test_converged_recipe_resumes_after_a_kill(toy_bin, tmp_path):
    """A converged-recipe run killed after its first checkpoint goes on from checkpoint_last.pt
    when the same command is given again, and records both processes in one result."""
    import gzip
    import signal
    import time

    ds = tmp_path / "toyds"
    ds.mkdir()
    ref = toy_bin.parent / "raw" / "test.tgt"
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "name": "toy",
                "data_bin": str(toy_bin),
                "detok_lang": "en",
                "tests": [{"subset": "test", "label": "test", "ref": str(ref)}],
            }
        )
    )
    work, results, hyps = tmp_path / "work", tmp_path / "conv.jsonl", tmp_path / "hyps"
    cmd = [
        PY, "-m", "scripts.experiments.run_side_by_side", "run", "--recipe", "converged", "--dataset", str(ds),
        "--work", str(work), "--results", str(results), "--hyp-dir", str(hyps), "--code", "worktree",
        "--models", "transformer", "--max-tokens", "500", "--beam", "1", "--model-args", TINY_MODEL,
        "--label", "e4", "--", "--max-epoch", "4", "--patience", "100",
    ]  # fmt: skip
    run_dir = work / "runs" / "toy.transformer.e4.s1.conv"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not (run_dir / "checkpoints" / "checkpoint_last.pt").exists() and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not results.exists()  # nothing recorded for the killed run
    first = (run_dir / "train.log").read_text()
    assert "done training" not in first
    out = run(cmd, timeout=300).stdout
    assert "resuming from" in out
    (r,) = expkit.read_jsonl(results)
    assert r["run_id"] == "toy.transformer.e4.s1.conv" and r["recipe"] == "converged"
    assert r["train_processes"] == 2 and r["epochs"] == 4 and not r["stopped_by_patience"]
    (killed,) = r["killed_processes_wall_s"]  # the killed process's time is counted, up to its checkpoint
    (measured,) = expkit.read_jsonl(run_dir / "segments.jsonl")  # the second process's
    assert killed >= 0 and r["train_wall_clock_s"] == round(measured["wall_s"] + killed, 1)
    assert [c["epoch"] for c in r["curve"]] == [1, 2, 3, 4]
    assert (run_dir / "train.log").read_text().count("# command: ") == 2
    assert "Loaded checkpoint" in (run_dir / "train.log").read_text().split(first)[1]
    (t,) = r["tests"]
    with gzip.open(REPO / t["hyp_file"] if not t["hyp_file"].startswith("/") else t["hyp_file"], "rt") as f:
        assert len(f.read().splitlines()) == 20
    refs = expkit.mt_prep.read_lines(ref)
    hyp_lines = expkit.mt_prep.read_lines(run_dir / "output" / "hyp.test.detok")
    assert t["chrf"] == round(run_side_by_side.sacrebleu_chrf(hyp_lines, refs), 2)
    assert "--patience 100" in r["train_command"] and "--max-update 0" in r["train_command"]


def _committed_translations_and_a_worse_copy(tmp_path):
    """The committed Transformer translations of test_2016, and a copy of them in TMP_PATH with
    every other sentence cut to its first three words (a system both tests call worse)."""
    import gzip

    hyp = REPO / "docs" / "results" / "hyps" / "multi30k.transformer.base.s1.conv.test_2016.detok.gz"
    with gzip.open(hyp, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    worse = tmp_path / "worse.gz"
    with gzip.open(worse, "wt", encoding="utf-8") as f:
        f.write("".join((h if i % 2 else " ".join(h.split()[:3])) + "\n" for i, h in enumerate(lines)))
    return hyp, worse


def test_render_converged_block_and_its_answer_tables(tmp_path):
    """The converged block: mean ± std over seeds, chrF; and the answer tables of the same records
    (here the committed Transformer translations against a copy with every other sentence cut to
    its first three words): both tests reject, so the verdict names the worse system."""
    hyp, worse = _committed_translations_and_a_worse_copy(tmp_path)

    def record(model, seed, hyp_file, bleu):
        test = {"label": "test_2016", "sacrebleu": bleu, "bleu_tok": bleu, "chrf": 50.0, "hyp_file": str(hyp_file)}
        test["command"] = "fairseq-generate"
        test["ref"] = "data/multi30k/test_2016_flickr.en.gz"
        return {
            "run_id": f"m.{model}.base.s{seed}.conv", "dataset": "m", "model": model, "variant": "base",
            "seed": seed, "recipe": "converged", "max_update": "conv", "epochs": 10 + seed,
            "best_valid_nll": 2.5, "best_valid_updates": 100, "train_wall_clock_s": 60.0, "train_wall_s": 50.0,
            "tokens_per_s": 1000.0, "peak_rss_mb": 800.0, "tests": [test], "train_command": "fairseq-train",
            "defaults": model == "clusterformer",
        }  # fmt: skip

    recs = [
        record("transformer", 1, hyp, 39.0),
        record("transformer", 2, hyp, 41.0),
        record("clusterformer", 1, worse, 30.0),
        record("clusterformer", 2, worse, 34.0),
    ]
    text = report.render(recs, tmp_path, tmp_path)
    assert "### m, converged recipe\n" in text
    on_gpu = [{**r, "device": "cuda", "machine": {"gpu": "NVIDIA H200"}} for r in recs]
    assert "### m, converged recipe (on NVIDIA H200)\n" in report.render(on_gpu, tmp_path, tmp_path)
    assert "| transformer | base | 11.5 ± 0.7 [11.0, 12.0] | 1,2 |" in text
    assert "| 40.00 ± 1.41 [39.00, 41.00] | 50.00 ± 0.00 [50.00, 50.00] |" in text
    assert "ClusterFormer minus Transformer (converged recipe, seeds 1,2; BLEU points, nll bits): " in text
    assert "test_2016 sacre -8.00 [-9.00, -7.00]" in text
    from scripts.experiments import significance

    answer = significance.answer_markdown(recs, test_sets=("test_2016",), n_resamples=200, repo=REPO)
    (baseline,) = [line for line in answer if line.startswith("| transformer |")]
    assert baseline.split(" | ")[3] == "39.03 ± 0.00"  # the real corpus score of the kept translations
    (worse_row,) = [line for line in answer if line.startswith("| clusterformer |")]
    cells = worse_row.split(" | ")
    assert float(cells[4].split()[0]) < -3 and cells[7].rstrip(" |") == "clusterformer worse"
    assert (tmp_path / "curves_m_converged.png").exists() is False  # no curves in these records


def test_render_documents_block_tests_each_claim_and_states_the_costs(tmp_path):
    """The document study's block: the systems and claims tables over the test documents (here the
    committed Transformer translations of test_2016 as the 'documents', against a copy with every
    other line cut to three words: both tests reject), a claim without runs says so, and the cost
    table gives each system's means with its ratio to the Transformer's."""
    from scripts.experiments import report

    hyp, worse = _committed_translations_and_a_worse_copy(tmp_path)

    def record(model, variant, seed, hyp_file, train_s, rss):
        test = {"label": "test", "chrf": 50.0 + seed, "hyp_file": str(hyp_file), "generate_wall_s": 100.0}
        test["ref"] = "data/multi30k/test_2016_flickr.en.gz"
        return {
            "run_id": f"d.{model}.{variant}.s{seed}.doc2060", "dataset": "d", "model": model, "variant": variant,
            "seed": seed, "recipe": "documents", "train_wall_s": train_s, "tokens_per_s": 1000.0,
            "peak_rss_mb": rss, "tests": [test], "machine": {"loadavg_start": 2.0},
        }  # fmt: skip

    recs = [
        record("transformer", "base", 1, hyp, 7200.0, 1000.0),
        record("transformer", "base", 2, hyp, 7200.0, 1000.0),
        record("clusterformer", "base", 1, worse, 3600.0, 500.0),
        record("clusterformer", "base", 2, worse, 3600.0, 700.0),
    ]
    text = report.render_documents(recs, n_resamples=200)
    rows = {}  # each row's first occurrence: the systems and claims tables come before the costs
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line.split(" | "))
    assert rows["transformer"][1] == "fairseq's Transformer, full attention" and rows["transformer"][2] == "1,2"
    assert rows["clusterformer"][7].rstrip(" |") == "clusterformer worse"
    assert rows["ClusterFormer is better than the Transformer"][5].rstrip(" |") == "clusterformer worse"
    assert "not run yet (k=auto)" in rows["ClusterFormer with k = ⌈√L⌉ is better than the Transformer"][2]
    assert "paired resamples of the test documents" in text
    cost = [line for line in text.splitlines() if line.startswith("| clusterformer | 1,2 |")]
    assert cost == ["| clusterformer | 1,2 | 51.50 | 1.00 (0.50 ×) | 1000 (1.00 ×) | 600 (0.60 ×) | 100 (1.00 ×) |"]
    assert "(load average at the start 2.0-2.0)" in text
    # the appendix's per-run block tells how to build the documents its commands read
    assert report._prepare_command("iwslt14-docs") == "python -m scripts.experiments.long_documents prepare"
    assert report._prepare_command("multi30k-docs-mr").endswith("multi30k_documents prepare --multi-resolution")
    assert report._prepare_command("multi30k") == "python -m scripts.experiments.run_side_by_side prepare multi30k"


def test_annealed_recipe_decays_the_learning_rate_to_zero_over_its_budget():
    """The annealed recipe's settings, as fairseq parses them: the shared peak lr and warm-up,
    then a linear decay that reaches 0 exactly at the recipe's last update."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    from scripts.experiments import recipes

    total = recipes.ANNEAL_UPDATES
    assert recipes.max_update("annealed", 500) == total and recipes.budget_tag("annealed", 500) == f"ann{total}"
    assert recipes.max_update("quick", 500) == 500 and recipes.max_update("converged", 500) == 0
    assert (
        run_side_by_side.run_id("m", "transformer", "base", 1, 500, "annealed") == f"m.transformer.base.s1.ann{total}"
    )
    settings = recipes.RECIPES["annealed"]["train_settings"]
    quick = recipes.RECIPES["quick"]["train_settings"]
    # everything but the schedule is the quick recipe's
    for flag in ("--lr", "--warmup-updates", "--max-tokens", "--dropout", "--label-smoothing", "--adam-betas"):
        assert settings[settings.index(flag) + 1] == quick[quick.index(flag) + 1]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        ["data-bin", "--arch", "transformer_iwslt_de_en", "--criterion", "label_smoothed_cross_entropy", *settings]
        + ["--max-update", str(total)],
    )
    cfg = convert_namespace_to_omegaconf(args)

    from fairseq.optim import FairseqOptimizer

    class Optimizer(FairseqOptimizer):  # only the lr, which the schedule sets
        def __init__(self):
            self.lr = None

        def set_lr(self, lr):
            self.lr = lr

        def get_lr(self):
            return self.lr

    optimizer = Optimizer()
    schedule = build_lr_scheduler(cfg.lr_scheduler, optimizer)
    peak, warmup = float(quick[quick.index("--lr") + 1]), int(quick[quick.index("--warmup-updates") + 1])
    assert schedule.step_update(warmup // 2) == pytest.approx(peak / 2)
    assert schedule.step_update(warmup) == pytest.approx(peak)
    assert schedule.step_update((warmup + total) // 2) == pytest.approx(peak / 2, rel=1e-3)
    assert schedule.step_update(total) == 0.0


def test_demo_annealed_recipe_decays_over_the_runs_own_budget():
    """demo-annealed: the annealed schedule stretched to the run's --max-update (the demo's budget),
    everything else the quick recipe's; its run ids name the budget."""
    from scripts.experiments import recipes

    assert recipes.max_update("demo-annealed", 800) == 800
    assert (
        run_side_by_side.run_id("m", "clusterformer", "base", 2, 800, "demo-annealed")
        == "m.clusterformer.base.s2.dann800"
    )
    for budget in (400, 800):
        settings = recipes.train_settings("demo-annealed", budget)
        assert settings[settings.index("--total-num-update") + 1] == str(budget)
        assert settings[settings.index("--lr-scheduler") + 1] == "polynomial_decay"
    # the study recipe keeps its own fixed budget whatever the runner's --max-update says
    annealed = recipes.train_settings("annealed", recipes.max_update("annealed", 500))
    assert annealed[annealed.index("--total-num-update") + 1] == str(recipes.ANNEAL_UPDATES)
    quick = recipes.train_settings("quick", 500)
    settings = recipes.train_settings("demo-annealed", 800)
    for flag in ("--lr", "--warmup-updates", "--max-tokens", "--dropout", "--label-smoothing"):
        assert settings[settings.index(flag) + 1] == quick[quick.index(flag) + 1]


def test_annealed_d256_recipe_and_gpu_runs():
    """annealed-d256: the annealed recipe's training settings with every width doubled; a run on
    the GPU gets its own run id; --device cuda without a GPU stops before anything runs, with the
    reason. (That a GPU run drops fairseq's --cpu: tests/test_tools.py.)"""
    from scripts.experiments import recipes

    d128, d256 = recipes.RECIPES["annealed"], recipes.RECIPES["annealed-d256"]
    assert recipes.train_settings("annealed-d256", 3920) == recipes.train_settings("annealed", 3920)
    assert recipes.max_update("annealed-d256", 500) == recipes.ANNEAL_UPDATES
    small, wide = d128["model_args"], d256["model_args"]
    assert len(small) == len(wide)
    differ = {small[i - 1]: (small[i], wide[i]) for i in range(1, len(small)) if small[i] != wide[i]}
    assert differ == {
        "--encoder-embed-dim": ("128", "256"),
        "--decoder-embed-dim": ("128", "256"),
        "--encoder-ffn-embed-dim": ("512", "1024"),
        "--decoder-ffn-embed-dim": ("512", "1024"),
    }
    assert run_side_by_side.run_id("m", "clusterformer", "base", 1, 0, "annealed-d256", "cuda") == (
        f"m.clusterformer.base.s1.ann{recipes.ANNEAL_UPDATES}d256.cuda"
    )
    assert run_side_by_side.run_id("m", "clusterformer", "base", 1, 0, "annealed", "cpu").endswith(".ann3920")
    if not torch.cuda.is_available():
        proc = subprocess.run(
            [PY, "-m", "scripts.experiments.run_side_by_side", "run", "--dataset", "multi30k", "--device", "cuda"],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 2 and "--device cuda: torch sees no GPU here" in proc.stderr


def test_git_commit_in_a_copy_without_git(tmp_path, monkeypatch):
    """A GPU machine's copy of the checkout has no .git: the records name the commit given in
    CLUSTERFORMER_GIT_COMMIT (and none when nothing names it)."""
    monkeypatch.setenv("CLUSTERFORMER_GIT_COMMIT", "abc1234")
    assert expkit.git_commit() not in (None, "abc1234")  # this checkout's own commit wins
    monkeypatch.setattr(expkit, "REPO", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert expkit.git_commit() == "abc1234"
    monkeypatch.delenv("CLUSTERFORMER_GIT_COMMIT")
    assert expkit.git_commit() is None


def test_a_run_in_progress_in_another_process_is_skipped(tmp_path, capsys):
    """Two queues that reach the same run: the second finds its lock held and skips it (resuming
    it beside the first would train both from one checkpoint and interleave their logs); once
    the lock is free, the run goes on (here into its results check, which finds it done)."""
    import fcntl
    from types import SimpleNamespace

    a = SimpleNamespace(work=str(tmp_path), max_update=None, recipe="documents", device="cpu")
    a.results, a.force = str(tmp_path / "results.jsonl"), False
    meta = {"name": "toy"}
    rid = run_side_by_side.run_id("toy", "clusterformer", "base", 1, None, "documents")
    (tmp_path / "runs").mkdir()
    expkit.append_jsonl(tmp_path / "results.jsonl", {"run_id": rid})
    with open(tmp_path / "runs" / f"{rid}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_side_by_side.one_run(a, meta, "clusterformer", "base", [], 3, 1) is None
        assert "another process is running it" in capsys.readouterr().out
    assert run_side_by_side.one_run(a, meta, "clusterformer", "base", [], 3, 1) is None
    assert "already in" in capsys.readouterr().out
