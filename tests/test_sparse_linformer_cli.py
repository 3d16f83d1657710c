"""The sparse and linformer baselines through fairseq's command-line tools on the toy corpus:
fairseq-train (settings recorded in the checkpoint), fairseq-generate (exact incremental
decoding: its beam-1 token scores equal --score-reference's teacher-forced ones),
fairseq-interactive, the refused causal Linformer, and 2-process DDP."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from fairseq_helpers import (
    CLUSTER_CRITERION,
    REPO,
    TINY,
    USER_DIR,
    assert_incremental_scores_equal_score_reference,
    cli,
    run,
    train,
)

# Both encoders with the sparse decoder. --causal-window 3: decoder blocks of 3 words, so a toy
# hypothesis spans several blocks and their summaries; --linformer-k 4 compresses every toy
# sentence longer than 4 words.
PAIRS = [("sparse", "sparse"), ("linformer", "sparse")]
OPTIONS = ["--causal-window", "3", "--linformer-k", "4", "--max-source-positions", "64"]


def options(enc, dec):
    return ["--self-attention-encoder", enc, "--self-attention-decoder", dec, *OPTIONS]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-enc-{p[1]}-dec")
def trained(request, toy_bin, tmp_path_factory):
    enc, dec = request.param
    save = tmp_path_factory.mktemp(f"{enc}_{dec}")
    out = train(
        toy_bin,
        save,
        "clusterformer_iwslt",
        extra=TINY + CLUSTER_CRITERION + options(enc, dec) + ["--max-epoch", "100", "--no-epoch-checkpoints"],
        max_update=40,
    )
    return enc, dec, save / "checkpoint_last.pt", out.stdout + out.stderr, tmp_path_factory.mktemp("work")


def test_train_learns_and_records_the_settings(trained):
    enc, dec, checkpoint, log, _ = trained
    assert "done training" in log
    train_lines = [line for line in log.splitlines() if "| train |" in line]
    assert train_lines
    assert not any("clustering_loss" in line or "commitment_loss" in line for line in train_lines)
    losses = [float(v) for v in re.findall(r"\| loss ([-\d.]+)", "\n".join(train_lines))]
    assert losses[-1] < losses[0]
    from fairseq import checkpoint_utils

    import fairseq_clusterformer  # noqa: F401

    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    cfg = state["cfg"]["model"]
    assert (cfg.self_attention_encoder, cfg.self_attention_decoder) == (enc, dec)
    assert (cfg.causal_window, cfg.linformer_k, cfg.max_source_positions) == (3, 4, 64)
    projections = [k for k in state["model"] if k.endswith("seq_proj_key")]
    assert len(projections) == (2 if enc == "linformer" else 0)
    assert all(state["model"][k].shape == (64, 4) for k in projections)


def test_generate_decodes_exactly_as_score_reference_scores(toy_bin, trained):
    """Per-token scores of beam-1 incremental decoding equal --score-reference's full-forward
    scores of the same tokens: the sparse decoder's cache is exact."""
    _, _, checkpoint, _, tmp = trained
    gen = assert_incremental_scores_equal_score_reference(toy_bin, checkpoint, tmp)
    # some hypotheses span three decoder blocks of 3 (two summaries reached)
    assert max(len(gen[i]["H"][1].split()) for i in gen) >= 7


def test_interactive_translates_with_beam_search(toy_bin, trained):
    _, _, checkpoint, _, _ = trained
    lines = ["s1 s2 s3", "s5", "s7 s7 s8 s9 s10 s11 s12 s13 s14"]
    out = run(
        [
            cli("fairseq-interactive"),
            toy_bin,
            "--user-dir",
            USER_DIR,
            "--path",
            checkpoint,
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--beam",
            "3",
            "--cpu",
        ],
        input="\n".join(lines) + "\n",
    )
    hyps = re.findall(r"^H-(\d+)\t", out.stdout, flags=re.M)
    assert sorted(map(int, hyps)) == [0, 1, 2]


def test_train_refuses_a_linformer_decoder_saying_why(toy_bin, tmp_path):
    out = train(
        toy_bin,
        tmp_path / "refused",
        "clusterformer_iwslt",
        extra=TINY + CLUSTER_CRITERION + ["--self-attention-decoder", "linformer"],
        max_update=1,
        check=False,
    )
    assert out.returncode != 0
    assert "a causal Linformer does not exist" in out.stdout + out.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_keeps_the_ranks_identical(toy_bin, tmp_path):
    """Linformer encoder and sparse decoder, 2 CPU processes over gloo: every parameter (the
    Linformer's E and F included) is identical on both ranks after training."""
    save = tmp_path / "ddp"
    common = [
        str(toy_bin),
        "--user-dir",
        USER_DIR,
        "--arch",
        "clusterformer_iwslt",
        *TINY,
        *CLUSTER_CRITERION,
        *options("linformer", "sparse"),
        "--optimizer",
        "adam",
        "--lr",
        "0.005",
        "--max-tokens",
        "300",
        "--max-update",
        "6",
        "--cpu",
        "--seed",
        "3",
        "--num-workers",
        "0",
        "--log-format",
        "simple",
        "--no-progress-bar",
        "--save-dir",
        str(save),
        "--required-batch-size-multiple",
        "1",
        "--distributed-world-size",
        "2",
        "--distributed-init-method",
        f"tcp://127.0.0.1:{_free_port()}",
        "--distributed-no-spawn",
        "--distributed-backend",
        "gloo",
        "--ddp-backend",
        "legacy_ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests"), "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "ddp_driver.py"), *common, "--distributed-rank", str(r)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "training on 2 devices" in logs[0]
    r0, r1 = (torch.load(save / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["num_updates"] == r1["num_updates"] == 6
    assert [n for n in r0["model"] if n.endswith("seq_proj_key")]
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
