"""Checkpoints load with torch's safe weights_only loader; anything else is refused clearly."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from fairseq import checkpoint_utils

import fairseq_clusterformer  # noqa: F401  (installs the allow-list and the guard)
from fairseq_clusterformer.checkpoint_safety import CheckpointLoadError
from fairseq_helpers import CLUSTER_CRITERION, TINY, generate, train


class Payload:
    """A foreign object: unpickling it under full pickle would run code of our choosing."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/clusterformer-pwned",))


def test_the_allow_list_is_what_lets_the_safe_loader_read_a_fairseq_checkpoint(smoke_checkpoint_dir, tmp_path):
    """In a fresh process, torch's weights-only loader refuses a fairseq checkpoint (it pickles an
    argparse.Namespace); after the plugin's allow-list it loads, still weights-only."""
    ckpt = str(smoke_checkpoint_dir / "checkpoint_last.pt")
    code = textwrap.dedent(f"""
        import torch
        try:
            torch.load({ckpt!r}, weights_only=True)
            print("LOADED-WITHOUT-ALLOW-LIST")
        except Exception as err:
            print("REFUSED", type(err).__name__, "argparse.Namespace" in str(err))
        from fairseq_clusterformer.checkpoint_safety import allow_fairseq_checkpoint_globals
        allow_fairseq_checkpoint_globals()
        state = torch.load({ckpt!r}, weights_only=True)
        print("LOADED", sorted(state)[:2])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED UnpicklingError True" in proc.stdout
    assert "LOADED ['args', 'cfg']" in proc.stdout


def test_fairseq_checkpoint_loads_with_weights_only(smoke_checkpoint_dir):
    state = torch.load(smoke_checkpoint_dir / "checkpoint_last.pt", weights_only=True)
    assert "model" in state
    state = checkpoint_utils.load_checkpoint_to_cpu(str(smoke_checkpoint_dir / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 20


def test_foreign_pickled_object_is_refused(smoke_checkpoint_dir, tmp_path):
    state = torch.load(smoke_checkpoint_dir / "checkpoint_last.pt", weights_only=True)
    state["extra_state"]["payload"] = Payload()
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    if os.path.exists("/tmp/clusterformer-pwned"):
        os.remove("/tmp/clusterformer-pwned")
    with pytest.raises(
        CheckpointLoadError, match="refusing to load checkpoint.*os.system|refusing to load checkpoint.*posix.system"
    ):
        checkpoint_utils.load_checkpoint_to_cpu(str(evil))
    # The CLI refuses it too, with the same message, and the payload never ran.
    out = generate(_bin_of(smoke_checkpoint_dir), evil, check=False)
    assert out.returncode != 0
    assert "refusing to load checkpoint" in out.stderr
    assert not os.path.exists("/tmp/clusterformer-pwned")


def _bin_of(ckpt_dir):
    state = torch.load(ckpt_dir / "checkpoint_last.pt", weights_only=True)
    return state["cfg"]["task"]["data"]


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_broken_checkpoint_is_refused_clearly(smoke_checkpoint_dir, tmp_path, damage):
    broken = tmp_path / "broken.pt"
    data = (smoke_checkpoint_dir / "checkpoint_last.pt").read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = data[:100] + bytes(b ^ 0x5A for b in data[100:4000]) + data[4000:]
    broken.write_bytes(data)
    with pytest.raises(CheckpointLoadError, match="truncated or corrupted"):
        checkpoint_utils.load_checkpoint_to_cpu(str(broken))


def test_resume_from_checkpoint_last_under_safe_loader(toy_bin, smoke_checkpoint_dir, tmp_path):
    save = tmp_path / "resume"
    shutil.copytree(smoke_checkpoint_dir, save)
    out = train(toy_bin, save, "clusterformer_iwslt", extra=TINY + CLUSTER_CRITERION, max_update=30)
    log = out.stdout + out.stderr
    assert "@ 20 updates" in log  # "loaded checkpoint ... (epoch E @ 20 updates)"
    state = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 30
