"""scripts/gpu/check.sh --dry-run: every step of the GPU check, on the CPU at tiny sizes, so the
script cannot rot while no GPU is at hand. Checks what it writes, never timings."""

import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "gpu" / "check.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(CHECK), "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return proc, out


def test_dry_run_writes_the_eight_files_and_passes(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "summary.txt", "check.log", "pytest_cuda.xml", "cli_precision.json", "cli_commands.log",
        "attention.csv", "attention_train_cpu.png", "translation.csv",
    ])  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert summary.splitlines()[0].startswith("GPU CHECK -- DRY RUN on the CPU")
    steps = next(line for line in summary.splitlines() if line.startswith("steps: "))
    for step in ("tests ok", "precision ok", "attention ok", "translation ok", "install skipped (dry run)"):
        assert step in steps, steps
    assert "RESULT: all steps ok" in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed too
    assert len(summary.splitlines()) <= 40  # one screen


def test_dry_run_ran_the_cuda_tests_on_the_cpu(dry_run):
    _, out = dry_run
    suite = ET.parse(out / "pytest_cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, failures, errors, skipped = (int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped"))
    assert failures == errors == 0
    assert n - skipped >= 10  # the reference, half-precision, gradient, decoding and invariance tests ran
    cases = [case for case in suite.iter("testcase") if case.get("classname", "").endswith("test_cuda")]
    names = {case.get("name") for case in cases if case.find("skipped") is None}
    assert any(name.startswith("test_half_precision_within_tolerance") for name in names)
    assert any(name.startswith("test_incremental_decoding") for name in names)
    # the kernel checks need CUDA's sdpa backends, the CUDA-graph cases CUDA, the FlexAttention
    # gradients CUDA (no CPU backward): skipped on the CPU, and only they
    skipped_here = {case.get("name") for case in cases if case.find("skipped") is not None}
    cuda_only = ("fused_kernel", "cuda-graphs", "as_cuda_graphs", "test_flex_")
    assert skipped_here and all(any(part in name for part in cuda_only) for name in skipped_here), skipped_here


def test_dry_run_trained_in_bf16_and_memory_efficient_fp16_and_decoded_exactly(dry_run):
    _, out = dry_run
    results = {r["precision"]: r for r in json.loads((out / "cli_precision.json").read_text())}
    assert sorted(results) == ["bf16", "memory-efficient-fp16"]
    assert results["bf16"]["train"] == "fairseq-hydra-train common.bf16=true"
    assert results["memory-efficient-fp16"]["train"] == "fairseq-train --memory-efficient-fp16"
    for r in results.values():
        assert r["trained"] and r["decode"] == "exact", r
        assert r["sentences"] == 40 and 0 <= r["max_abs_diff"] <= r["tolerance"]
        assert r["overflow_skips"] >= r["overflow_skips_after_warmup"] >= 0
        assert r["last_loss"] < r["first_loss"]
    log = (out / "cli_commands.log").read_text()
    assert "--score-reference" in log and "common.bf16=true" in log


def test_dry_run_benchmarks_wrote_every_row(dry_run):
    _, out = dry_run
    with open(out / "attention.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["impl"], int(r["n"])) for r in rows}
    impls = ("cluster", "cluster-causal", "full", "naive", "sdpa", "flash", "lsh-8", "sparse", "sparse-causal")
    impls += ("linformer-256",)
    assert {(impl, n) for impl in impls for n in (64, 128)} <= got
    assert {impl for impl, _ in got} <= {*impls, "routing"}  # routing: reported, whether it runs or stops
    assert all(float(r["time_ms"]) > 0 and r["device"] == "cpu" for r in rows)
    with open(out / "translation.csv") as f:
        rows = list(csv.DictReader(f))
    # the eager run, then the --cluster-compile run's rows (its Transformer measured again beside it)
    archs = ("clusterformer_iwslt", "transformer_iwslt_de_en", "clusterformer_iwslt+compile", "transformer_iwslt_de_en")
    assert sorted((r["phase"], r["arch"]) for r in rows) == sorted(
        (phase, arch) for phase in ("train", "generate") for arch in archs
    )
    assert all(float(r["rate"]) > 0 for r in rows)
    summary = (out / "summary.txt").read_text()
    table = [line.split() for line in summary.splitlines() if line.startswith("  ")]
    assert [row[:2] for row in table if row[0] in ("64", "128")] == [["64", "2"], ["128", "2"]]
    assert "time exponents:" in summary
    # every clustering variant against flash, per N (here the encoder and the causal layer)
    variants = [line for line in summary.splitlines() if line.strip().startswith(("N=64 vs flash", "N=128 vs flash"))]
    assert len(variants) == 2 and all("cluster " in line and "causal " in line for line in variants), variants


def test_steps_implementations_and_limits_can_be_chosen(tmp_path):
    """CHECK_STEPS runs only the steps named; CHECK_IMPLS and CHECK_LENGTHS choose the attention
    rows; CHECK_ATTENTION_S is the attention step's limit (a step over it is recorded as a timeout)."""
    env = {**os.environ, "PYTHON": sys.executable, "CHECK_STEPS": "attention", "CHECK_IMPLS": "cluster,sdpa"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(CHECK), "--dry-run", "--out", str(tmp_path / "a")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    with open(tmp_path / "a" / "attention.csv") as f:
        assert {(r["impl"], r["n"]) for r in csv.DictReader(f)} == {
            (impl, n) for impl in ("cluster", "sdpa") for n in ("64", "128")
        }
    assert not (tmp_path / "a" / "translation.csv").exists() and not (tmp_path / "a" / "pytest_cuda.xml").exists()
    assert "== attention (limit 240 s)" in (tmp_path / "a" / "check.log").read_text()
    proc = subprocess.run(
        ["bash", str(CHECK), "--dry-run", "--out", str(tmp_path / "b")],
        cwd=REPO, env={**env, "CHECK_ATTENTION_S": "1"}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "attention timeout" in (tmp_path / "b" / "summary.txt").read_text()


def test_summary_reports_a_failed_step(tmp_path):
    """A step that failed or ran out of time is named, and the result says so."""
    status = tmp_path / "status.tsv"
    status.write_text("install\tok\t3\ntests\tfailed (exit 1)\t40\nattention\ttimeout\t140\n")
    (tmp_path / "check.log").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.gpu.summary", "--status", str(status), "--out", str(tmp_path),
         "--log", str(tmp_path / "check.log"), "--seconds", "183"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tests failed (exit 1) (40 s)" in proc.stdout and "attention timeout (140 s)" in proc.stdout
    assert "SOME STEPS FAILED" in proc.stdout and "all steps ok" not in proc.stdout
    assert "tests: no junit file" in proc.stdout and "attention: no CSV" in proc.stdout

    # A benchmark configuration that stopped is named under the attention table.
    (tmp_path / "attention.csv").write_text(
        "impl,n,k,batch,mode,device,time_ms,peak_mb\ncluster,64,8,2,train,cuda,1.5,3.0\nsdpa,64,,2,train,cuda,1.0,2.0\n"
    )
    (tmp_path / "check.log").write_text(
        "ERROR train   N=    64 routing k=8            batch 2: expected m1 and m2 to have the same dtype "
        "(not run at larger N)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.gpu.summary", "--status", str(status), "--out", str(tmp_path),
         "--log", str(tmp_path / "check.log")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "stopped: routing k=8 at N=64, batch 2 (ERROR: expected m1 and m2" in proc.stdout, proc.stdout
    row = next(line.split() for line in proc.stdout.splitlines() if line.strip().startswith("64 "))
    assert row[:4] == ["64", "2", "1.5", "1"] and row[-4:] == ["1.50", "1.50", "/", "-"], row  # time, mem ratios


def test_overflow_skips_are_counted_after_the_warmup():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        from scripts.gpu.cli_precision import overflow_skips

    log = "\n".join([
        "epoch 001:   1 / 9 loss=9.1, num_updates=1",
        "NOTE: gradient overflow detected, ignoring gradient, setting loss scale to: 64.0",
        "epoch 001:   2 / 9 loss=8.1, num_updates=2",
        "epoch 001:   9 / 9 loss=5.0, num_updates=25",
        "NOTE: gradient overflow detected, ignoring gradient, setting loss scale to: 32.0",
    ])  # fmt: skip
    assert overflow_skips(log, warmup=20) == (2, 1)
    assert overflow_skips(log, warmup=30) == (2, 0)


def test_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(CHECK), "--gpu"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "unknown argument: --gpu" in proc.stderr
