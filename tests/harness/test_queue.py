"""The converged study's queue (scripts/experiments/converged_queue.sh) and its GPU counterpart
(scripts/gpu/converged.sh), run for real with a stand-in for the Python interpreter that records
each runner call instead of training: every call the queue makes is one the runner plans (its
--dry-run), each queue entry gives one run of its own, and the GPU script gives each system the
runner arguments the queue gives it."""

import json
import os
import re
import shutil
import subprocess
import sys

from fairseq_helpers import REPO
from scripts.experiments import run_side_by_side
from scripts.experiments.significance import DOCUMENT_NOTES, system_name

RUNNER = ["-m", "scripts.experiments.run_side_by_side"]


def _stub_python(folder, record):
    """An executable that records its arguments (one JSON list per line) and exits 0; a script on
    stdin ("-", as the GPU script's heredocs run) goes to the real interpreter."""
    stub = folder / "python-stub"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"if sys.argv[1:2] == ['-']:\n    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
        f"with open({str(record)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    stub.chmod(0o755)
    return stub


def _copy_scripts(tmp_path):
    """A scratch checkout holding the scripts (the queue works in work/ beside them, never here)."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _calls(record):
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _queue_calls(tmp_path, seeds="1 2 3"):
    root = _copy_scripts(tmp_path)
    record = tmp_path / "calls.jsonl"
    env = {**os.environ, "PY": str(_stub_python(tmp_path, record)), "LANES": "1", "SEEDS": seeds}
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "experiments" / "converged_queue.sh")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout
    labels = re.findall(r"lane 1: (.+) \(\d+ of \d+\)$", proc.stdout, flags=re.M)
    calls = _calls(record)
    assert calls[0] == [*RUNNER, "prepare", "multi30k"]  # no prepared data in the scratch checkout
    runs = [c[len(RUNNER) + 1 :] for c in calls[1:]]
    assert all(c[: len(RUNNER) + 1] == [*RUNNER, "run"] for c in calls[1:])
    assert len(runs) == len(labels)
    return labels, runs


def test_every_queue_entry_is_one_distinct_run_of_the_runner(tmp_path, capsys):
    labels, runs = _queue_calls(tmp_path)
    assert len(set(labels)) == len(labels)
    ids = []
    for args in runs:
        capsys.readouterr()
        ours = ["--work", str(tmp_path / "work"), "--dry-run"]  # before a "--" (fairseq's arguments follow it)
        at = args.index("--") if "--" in args else len(args)
        assert run_side_by_side.main(["run", *args[:at], *ours, *args[at:]]) == 0
        (planned,) = re.findall(r"(\d+) run\(s\) planned on multi30k: (.*)$", capsys.readouterr().out, flags=re.M)
        assert planned[0] == "1", (args, planned)  # one entry, one run
        ids.append(planned[1])
        assert "--recipe" in args and args[args.index("--recipe") + 1] == "annealed"
    assert len(set(ids)) == len(ids), "two queue entries plan the same run"
    assert not (tmp_path / "work").exists()  # a dry run exports no code and writes nothing


def test_gpu_script_gives_each_system_the_queues_arguments(tmp_path):
    """scripts/gpu/converged.sh --dry-run with every system: each runner call carries the system
    arguments the CPU queue gives that system at seed 1; an unknown system is refused first."""
    _, queue_runs = _queue_calls(tmp_path / "queue", seeds="1")

    def system_args(args):  # without the queue's own arguments (recipe, data, code) and the seed
        args = list(args)
        for flag in ("--recipe", "--dataset", "--code", "--seeds"):
            at = args.index(flag)
            del args[at : at + 2]
        return tuple(args)

    queue = {system_args(args) for args in queue_runs if args[args.index("--seeds") + 1] == "1"}
    root = _copy_scripts(tmp_path)
    (root / "data").symlink_to(REPO / "data")  # the references the GPU script points the data set at
    data = tmp_path / "prepared"
    (data / "data-bin").mkdir(parents=True)
    tests = [{"subset": "test", "label": "test_2016", "ref": "elsewhere/test_2016_flickr.en.gz"}]
    (data / "dataset.json").write_text(json.dumps({"name": "multi30k", "data_bin": "x", "tests": tests}))
    record = tmp_path / "gpu_calls.jsonl"
    systems = ["transformer", "clusterformer", "routing", "lsh", "decoder-full"]
    env = {**os.environ, "PYTHON": str(_stub_python(tmp_path, record)), "DRY_DATA": str(data)}
    script = root / "scripts" / "gpu" / "converged.sh"
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", "--out", str(tmp_path / "out")],
        env={**env, "SYSTEMS": " ".join(systems)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scratch = re.search(r"DRY RUN on the CPU with \S+ in (/tmp/clusterformer-gpu-converged-dry\.\w+)", proc.stdout)
    shutil.rmtree(scratch.group(1))  # the script's copy of the data, which it leaves for inspection
    calls = _calls(record)
    assert len(calls) == len(systems)
    for call in calls:
        assert call[: len(RUNNER) + 1] == [*RUNNER, "run"]
        args = call[len(RUNNER) + 1 :]
        # the GPU script's own arguments: the data, the work folder, the seed, the code, its recipe
        for flag in ("--dataset", "--work", "--seeds", "--code", "--device", "--recipe", "--max-update", "--beam"):
            at = args.index(flag)
            del args[at : at + 2]
        for flag in ("--generate-args", "--results", "--hyp-dir", "--model-args"):
            at = args.index(flag)
            del args[at : at + 2]
        assert tuple(args) in queue, (args, sorted(queue))
    proc = subprocess.run(
        ["bash", str(script), "--dry-run"], env={**env, "SYSTEMS": "transformer reformer", "OUT": ""},
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown system in SYSTEMS: reformer" in proc.stderr


def test_documents_queue_builds_the_chosen_documents_and_runs_each_system_once(tmp_path):
    """documents_queue.sh: DATASET picks the builder of the documents (called when the data set is
    missing) and every entry is one run of the runner on that data set, with the documents recipe;
    an unknown DATASET is refused by name."""
    root = _copy_scripts(tmp_path)
    for dataset, builder in (
        ("iwslt14-docs", "scripts.experiments.long_documents"),
        ("multi30k-docs", "scripts.experiments.multi30k_documents"),
        ("multi30k-docs-mr", "scripts.experiments.multi30k_documents"),
    ):
        record = tmp_path / f"{dataset}.jsonl"
        env = {**os.environ, "PY": str(_stub_python(tmp_path, record)), "LANES": "1", "SEEDS": "1"}
        env.update(DATASET=dataset, CODE="abc1234")
        proc = subprocess.run(
            ["bash", str(root / "scripts" / "experiments" / "documents_queue.sh")],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        calls = _calls(record)
        assert calls[0][:3] == ["-m", builder, "prepare"] and calls[0][-2:] == [
            "--out",
            f"work/experiments/data/{dataset}",
        ]
        assert ("--multi-resolution" in calls[0]) == dataset.endswith("-mr")
        runs = calls[1:]
        assert len(runs) == len(DOCUMENT_NOTES) and all(c[: len(RUNNER) + 1] == [*RUNNER, "run"] for c in runs)
        for c in runs:
            assert c[c.index("--dataset") + 1] == f"work/experiments/data/{dataset}"
            assert c[c.index("--recipe") + 1] == "documents" and c[c.index("--code") + 1] == "abc1234"
        labels = [c[c.index("--label") + 1] if "--label" in c else c[c.index("--models") + 1] for c in runs]
        # one run of each system that the report's documents block describes
        assert sorted(labels) == sorted(system_name(s) for s in DOCUMENT_NOTES)
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "experiments" / "documents_queue.sh")],
        env={**os.environ, "DATASET": "wmt-docs"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "not 'wmt-docs'" in proc.stderr
