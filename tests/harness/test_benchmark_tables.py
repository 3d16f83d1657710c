"""docs/benchmarks.md's tables are rebuilt from the raw CSVs committed beside it."""

import shutil
import subprocess
import sys

import pytest

from fairseq_helpers import REPO


def _tables(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_tables", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def test_the_page_matches_its_csvs():
    proc = _tables("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_changed_csv_changes_the_page_and_a_missing_one_is_refused(tmp_path):
    data = tmp_path / "cpu"
    shutil.copytree(REPO / "docs" / "data" / "cpu", data)
    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs" / "benchmarks.md", doc)
    # Double the sdpa time of the check: the page's ratio must follow.
    lines = (data / "check2048.csv").read_text().splitlines()
    times = {line.split(",")[0]: float(line.split(",")[6]) for line in lines[1:]}
    halved = times["cluster"] / (2 * times["sdpa"])
    lines = [
        ",".join(
            f"{float(c) * 2:.3f}" if i == 6 and line.startswith("sdpa,") else c for i, c in enumerate(line.split(","))
        )
        for line in lines
    ]
    (data / "check2048.csv").write_text("\n".join(lines) + "\n")
    assert _tables("--check", "--doc", doc, "--data", data).returncode == 1
    assert _tables("--doc", doc, "--data", data).returncode == 0
    assert f"| N = 2048 training step, 1 thread, cluster / sdpa | **{halved:.2f}** |" in doc.read_text()
    # An empty or missing CSV: refused, and the page is left as it was.
    before = doc.read_text()
    (data / "attn_train.csv").write_text("impl,n,k,batch,mode,device,time_ms,peak_mb\n")
    proc = _tables("--doc", doc, "--data", data)
    assert proc.returncode == 2 and "refusing to replace a table with nothing" in proc.stderr
    shutil.copy(REPO / "docs" / "data" / "cpu" / "attn_train.csv", data)
    (data / "translation.csv").unlink()
    proc = _tables("--doc", doc, "--data", data)
    assert proc.returncode == 2 and "is missing" in proc.stderr
    assert doc.read_text() == before


def test_the_gpu_section_follows_its_raw_files(tmp_path):
    gpu = tmp_path / "gpu"
    shutil.copytree(REPO / "docs" / "data" / "gpu", gpu)
    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs" / "benchmarks.md", doc)
    # The softmax table is parsed from the profiler's text: a changed step time changes the speed-up.
    text = (gpu / "profile_softmax.txt").read_text()
    assert "step 5.43 ms" in text  # the transposed step at N = 32768
    (gpu / "profile_softmax.txt").write_text(text.replace("step 5.43 ms", "step 2.00 ms"))
    args = ("--doc", doc, "--data-gpu", gpu)
    assert _tables("--check", *args).returncode == 1
    assert _tables(*args).returncode == 0
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| 32768 | 1 | 182 |"))
    assert row.endswith(f"| 2.00 | **{26.39 / 2.00:.2f}×** |"), row
    # A missing raw file is refused.
    (gpu / "cli_precision.json").unlink()
    proc = _tables(*args)
    assert proc.returncode == 2 and "cli_precision.json is missing" in proc.stderr


def test_profile_tables_keep_each_table_under_its_header():
    from scripts.benchmark_tables import TableError, profile_tables

    text = "\n".join(
        [
            "USDT noise",
            "# N 2048, batch 20, d 512, heads 8, k 46, threads 2, device cpu",
            "| part of the step | self CPU (ms) | share |",
            "|---|---|---|",
            "| projection GEMMs | 10 | 50 % |",
            "# torch 2.13",
            "# profile: mt, one training step (3165 target tokens)",
            "| operator | a | b | difference ms |",
            "mt     train    clusterformer_iwslt   230.1 target tokens/s  ratio 0.943",
        ]
    )
    out = profile_tables(text).splitlines()
    assert out[0] == "*N 2048, batch 20, d 512, heads 8, k 46, threads 2, device cpu*"
    assert "| projection GEMMs | 10 | 50 % |" in out and "*profile: mt, one training step (3165 target tokens)*" in out
    assert "`mt     train    clusterformer_iwslt   230.1 target tokens/s  ratio 0.943`" in out
    assert not any("USDT" in line or "torch 2.13" in line for line in out)
    with pytest.raises(TableError):
        profile_tables("# N 1\nno table here\n")


def test_the_generation_table_states_each_model_against_the_transformer(tmp_path):
    from scripts.benchmark_tables import _rows, generation_launches_table

    path = tmp_path / "launches_generate.csv"
    path.write_text(
        "model,n,steps,launches,host_syncs,launches_per_step,host_syncs_per_step\n"
        "clusterformer_iwslt,64,65,19500,350,300.0,5.38\n"
        "transformer_iwslt_de_en,64,65,16250,350,250.0,5.38\n"
        "clusterformer_iwslt,512,513,205200,2600,400.0,5.07\n"
    )
    table = generation_launches_table(_rows(path.name, tmp_path))
    assert "| clusterformer_iwslt | 64 | 300.0 | 1.20 | 5.38 |" in table
    assert "| transformer_iwslt_de_en | 64 | 250.0 | 1.00 | 5.38 |" in table
    assert "| clusterformer_iwslt | 512 | 400.0 | — | 5.07 |" in table  # no Transformer row at 512
