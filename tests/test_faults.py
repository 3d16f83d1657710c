"""Faults (docs/reliability.md): a kill during a checkpoint save, a DDP rank that dies, a loss
that becomes NaN. Every run goes through fairseq's real command-line tools."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fairseq_clusterformer  # noqa: F401  (safe loading and atomic saves)
from fairseq_helpers import CLUSTER_CRITERION, REPO, TINY, USER_DIR, cli, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def load_whole(path):
    """torch.load the checkpoint (safe loader) and check it is a complete fairseq checkpoint."""
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer_history", "extra_state", "last_optimizer_state"} <= set(state), sorted(state)
    assert state["model"] and all(torch.is_tensor(v) for v in state["model"].values())
    return state


def updates_of(state):
    return state["optimizer_history"][-1]["num_updates"]


def read_tail(path, n=4000):
    return path.read_text(errors="replace")[-n:]


# --- atomic checkpoint saves, directly --------------------------------------------------------------
def test_checkpoint_writes_are_fsynced_then_renamed(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    target, best = tmp_path / "checkpoint_last.pt", tmp_path / "checkpoint_best.pt"
    checkpoint_utils.torch_persistent_save({"w": torch.zeros(4)}, str(target))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint_utils.torch_persistent_save({"w": torch.ones(4)}, str(target))  # how trainer saves
    assert events[:2] == ["fsync", ("rename", "checkpoint_last.pt.tmp", "checkpoint_last.pt")]
    events.clear()
    assert checkpoint_utils.PathManager.copy(str(target), str(best), overwrite=True)  # how fairseq copies
    assert events[:2] == ["fsync", ("rename", "checkpoint_best.pt.tmp", "checkpoint_best.pt")]
    for path in (target, best):
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pt", "checkpoint_last.pt"]


def test_a_failed_save_or_copy_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    import shutil

    from fairseq import checkpoint_utils

    target, other = tmp_path / "checkpoint_last.pt", tmp_path / "checkpoint_9_90.pt"
    checkpoint_utils.torch_persistent_save({"w": torch.zeros(4)}, str(target))
    checkpoint_utils.torch_persistent_save({"w": torch.ones(4)}, str(other))

    def half_written(*args, **kwargs):
        f = args[1]
        f.write(b"PK\x03\x04 the first half of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_utils.torch_persistent_save({"w": torch.ones(4)}, str(target))
    monkeypatch.setattr(shutil, "copyfileobj", half_written)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_utils.PathManager.copy(str(other), str(target), overwrite=True)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(4))  # old, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_9_90.pt", "checkpoint_last.pt"]  # no .tmp


COPY_FOREVER = textwrap.dedent("""
    import sys
    import fairseq_clusterformer
    from fairseq import checkpoint_utils
    a, b, dst = sys.argv[1:]
    n = 0
    while True:  # copy the two checkpoints onto dst in turn, as fairseq copies to checkpoint_last.pt
        checkpoint_utils.PathManager.copy(a if n % 2 else b, dst, overwrite=True)
        n += 1
        print(n, flush=True)
""")


def test_sigkill_during_a_checkpoint_copy_leaves_a_whole_file(tmp_path):
    """A process copying checkpoints onto checkpoint_last.pt is killed at random moments: the file
    is always one of the two checkpoints, whole."""
    a, b, dst = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "checkpoint_last.pt"
    big = {"w": torch.zeros(8 << 20)}  # 32 MiB, so that a kill often lands mid-copy
    torch.save(big, a)
    big["w"] += 1
    torch.save(big, b)
    torch.save(big, dst)
    rng = random.Random(15)
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", COPY_FOREVER, a, b, dst], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "1", "the copying process did not start"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        w = torch.load(dst, weights_only=True)["w"]
        assert w.numel() == 8 << 20 and (torch.equal(w, torch.zeros_like(w)) or torch.equal(w, torch.ones_like(w)))


# --- a kill during fairseq-train's checkpoint saves --------------------------------------------------
# d 256: a checkpoint (model and Adam state) of about 20 MB, written, fsynced and copied at every
# update, so that a save takes long enough to be caught in the act.
WIDE = [
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
    "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4", "--causal-window", "8",
]  # fmt: skip


def _save_in_progress(save, moment):
    """fairseq saves in two steps: it writes checkpoint_E_U.pt (through a .tmp file), then copies
    it onto checkpoint_last.pt. True while the given step is under way."""
    names = {p.name: p for p in save.iterdir()}
    if moment == "writing":
        return any(n.startswith("checkpoint_") and n.endswith(".pt.tmp") and n[11].isdigit() for n in names)
    # copying: the plugin's temporary copy, or (in place) a checkpoint_last.pt shorter than its source
    if "checkpoint_last.pt.tmp" in names:
        return True
    written = [p for n, p in names.items() if n.startswith("checkpoint_") and n.endswith(".pt") and n[11].isdigit()]
    try:
        return bool(written) and names["checkpoint_last.pt"].stat().st_size < max(p.stat().st_size for p in written)
    except (KeyError, FileNotFoundError):
        return False


def test_sigkill_during_checkpoint_saves_never_truncates_checkpoint_last(toy_bin, tmp_path):
    """Killed at a random moment, while writing a checkpoint, while copying it onto
    checkpoint_last.pt; rerun after each kill (it resumes)."""
    save = tmp_path / "ck"
    cmd = [
        cli("fairseq-train"), "--user-dir", USER_DIR, toy_bin, "--arch", "clusterformer_iwslt", *WIDE,
        *CLUSTER_CRITERION, "--save-dir", save, "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "200",
        "--max-update", "1000", "--save-interval-updates", "1", "--keep-interval-updates", "1",
        "--no-epoch-checkpoints", "--cpu", "--seed", "1", "--num-workers", "0", "--log-format", "simple",
        "--no-progress-bar", "--required-batch-size-multiple", "1", "--disable-validation",
    ]  # fmt: skip
    cmd = [str(c) for c in cmd]
    last = save / "checkpoint_last.pt"
    rng = random.Random(4)
    seen, caught = [], []
    for moment in ("random", "writing", "copying"):
        before = last.stat().st_mtime_ns if last.exists() else None
        with open(tmp_path / "train.log", "w") as log:  # a file, not a pipe that could fill and block the run
            proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        # Wait until this run has saved once (so it resumed and trains), then pick the moment.
        while proc.poll() is None and time.time() < deadline:
            if last.exists() and last.stat().st_mtime_ns != before:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"fairseq-train ended before it was killed:\n{read_tail(tmp_path / 'train.log')}"
        time.sleep(rng.uniform(0.0, 0.5))
        if moment != "random":  # poll until that step of a save is under way (at most 10 s)
            until = time.time() + 10
            while not _save_in_progress(save, moment) and time.time() < until:
                time.sleep(0.0005)
        caught.append(_save_in_progress(save, "writing") or _save_in_progress(save, "copying"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_whole(last)  # never truncated: the old checkpoint or the new one, whole
        seen.append(updates_of(state))
    print(f"updates at the kills: {seen}; kills during a save: {caught}")
    assert seen == sorted(seen) and seen[-1] > seen[0]  # each rerun resumed from checkpoint_last.pt


# --- a DDP rank that dies -----------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_ddp_rank_stops_the_other_then_the_rerun_resumes(toy_bin, tmp_path):
    save = tmp_path / "ddp"
    port = _free_port()
    common = [
        str(toy_bin), "--user-dir", USER_DIR, "--arch", "clusterformer_iwslt", *TINY, *CLUSTER_CRITERION,
        "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--max-tokens", "300", "--max-update", "30", "--save-interval-updates", "5", "--cpu", "--seed", "3",
        "--num-workers", "0", "--log-format", "simple", "--log-interval", "1", "--no-progress-bar",
        "--save-dir", str(save), "--required-batch-size-multiple", "1", "--distributed-world-size", "2",
        "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
        "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--dropout", "0.1",
    ]  # fmt: skip
    env = {**ENV, "PYTHONPATH": str(REPO / "tests")}

    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]

    def start():  # logs go to files: a pipe nobody reads could fill up and block a rank
        procs = []
        for r in (0, 1):
            with open(logs[r], "w") as out:
                cmd = [sys.executable, str(REPO / "tests" / "ddp_driver.py"), *common, "--distributed-rank", str(r)]
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        return procs

    procs = start()
    deadline = time.time() + 300
    marker = save / "params_rank1.pt"  # rank 1 has reached a checkpoint save: training is under way
    while not marker.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a rank ended before the kill:\n" + read_tail(logs[0])
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:  # no hang: the survivor notices the lost peer at its next collective
        procs[0].wait(timeout=180)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 still running 180 s after rank 1 was killed (hang)")
    log = read_tail(logs[0], 20000)
    assert procs[0].returncode != 0
    # gloo names the lost peer: "Connection closed by peer" or "Read error ...: Connection reset by
    # peer", then "Check the logs of the remote worker".
    assert re.search(r"RuntimeError: \[[^\]]*gloo[^\]]*\].*(closed|reset) by peer.*remote worker", log), log[-3000:]
    killed_at = updates_of(load_whole(save / "checkpoint_last.pt"))
    assert 0 < killed_at < 30

    procs = start()  # the same command again
    for p, path in zip(procs, logs):
        assert p.wait(timeout=600) == 0, read_tail(path)
    assert f"@ {killed_at} updates" in logs[0].read_text()  # resumed from checkpoint_last.pt
    r0, r1 = (torch.load(save / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["num_updates"] == r1["num_updates"] == 30
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    assert updates_of(load_whole(save / "checkpoint_last.pt")) == 30


# --- a loss that becomes NaN ----------------------------------------------------------------------------
def test_a_nan_loss_stops_training_and_saves_no_nan_checkpoint(toy_bin, smoke_checkpoint_dir, tmp_path):
    """checkpoint_last.pt has a poisoned embedding row (inf), so the loss is NaN from the first
    update of the rerun: fairseq stops with FloatingPointError ("gradients are Nan/Inf"), its NaN
    detector names the first module with a non-finite output, and it dumps the model to crash.pt
    for debugging; checkpoint_best.pt and checkpoint_last.pt are left as they were."""
    import shutil

    save = tmp_path / "ck"
    save.mkdir()
    shutil.copy(smoke_checkpoint_dir / "checkpoint_last.pt", save / "checkpoint_best.pt")
    state = torch.load(smoke_checkpoint_dir / "checkpoint_last.pt", weights_only=True)
    start = updates_of(state)
    state["model"]["encoder.embed_tokens.weight"][4] = float("inf")  # the most frequent word
    torch.save(state, save / "checkpoint_last.pt")
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    out = train(
        toy_bin, save, "clusterformer_iwslt", max_update=start + 10, check=False,
        extra=TINY + CLUSTER_CRITERION + ["--save-interval-updates", "1", "--validate-interval-updates", "1"],
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"@ {start} updates" in log  # it resumed from the poisoned checkpoint_last.pt
    assert "FloatingPointError: gradients are Nan/Inf" in log, log[-3000:]
    assert "NaN detected in output of" in log or "Inf detected in output of" in log
    after = {p.name: p for p in save.iterdir()}
    assert set(after) == set(before) | {"crash.pt"}  # no new checkpoint_N_M.pt, checkpoint_best.pt...
    for name, data in before.items():
        assert after[name].read_bytes() == data, f"{name} was overwritten"
    best = torch.load(save / "checkpoint_best.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
