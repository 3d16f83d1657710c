"""The sparse and linformer baselines through fairseq's command-line tools on the toy corpus:
fairseq-train (settings recorded in the checkpoint), fairseq-generate (exact incremental
decoding: its beam-1 token scores equal --score-reference's teacher-forced ones),
fairseq-interactive, the refused causal Linformer, and 2-process DDP."""

import re

import pytest

from fairseq_helpers import (
    CLUSTER_CRITERION,
    TINY,
    assert_incremental_scores_equal_score_reference,
    assert_interactive_translates_every_line,
    train,
    train_two_process_ddp,
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
    assert_interactive_translates_every_line(toy_bin, checkpoint)


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


def test_two_process_ddp_keeps_the_ranks_identical(toy_bin, tmp_path):
    """Linformer encoder and sparse decoder, 2 CPU processes over gloo: every parameter (the
    Linformer's E and F included) is identical on both ranks after training."""
    _, r0, _ = train_two_process_ddp(toy_bin, tmp_path / "ddp", options("linformer", "sparse"), max_update=6)
    assert [n for n in r0["model"] if n.endswith("seq_proj_key")]
