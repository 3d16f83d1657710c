"""The LSH and routing baselines through fairseq's command-line tools on the toy corpus:
fairseq-train, fairseq-generate (exact incremental decoding: its beam-1 token scores equal
--score-reference's teacher-forced ones), fairseq-interactive, and 2-process DDP."""

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

pytest.importorskip("reformer_pytorch", reason="needs the baselines extra")
pytest.importorskip("routing_transformer", reason="needs the baselines extra")

# Every choice on each side: lsh encoder with the routing decoder, and the other way round.
# --causal-window 2 makes the decoding cache switch to its ring buffers within a toy sentence.
PAIRS = [("lsh", "routing"), ("routing", "lsh")]


def options(enc, dec):
    return [
        "--self-attention-encoder",
        enc,
        "--self-attention-decoder",
        dec,
        "--causal-window",
        "2",
        "--lsh-n-hashes",
        "2",
    ]


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


def test_train_logs_the_commitment_loss_and_records_the_settings(trained):
    enc, dec, checkpoint, log, _ = trained
    assert "done training" in log
    train_lines = [line for line in log.splitlines() if "| train |" in line]
    valid_lines = [line for line in log.splitlines() if "| valid |" in line]
    assert train_lines and valid_lines
    for line in train_lines + valid_lines:  # routing on one side: its commitment loss is logged
        value = float(re.search(r"\| commitment_loss ([-\d.]+)", line).group(1))
        assert 0 <= value <= 4
        assert "clustering_loss" not in line  # no clustering layer in these models
    losses = [float(v) for v in re.findall(r"\| loss ([-\d.]+)", "\n".join(train_lines))]
    assert losses[-1] < losses[0]
    from fairseq import checkpoint_utils

    import fairseq_clusterformer  # noqa: F401

    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    cfg = state["cfg"]["model"]
    assert (cfg.self_attention_encoder, cfg.self_attention_decoder, cfg.lsh_n_hashes) == (enc, dec, 2)
    assert cfg.routing_local_heads == "half"
    means = [k for k in state["model"] if k.endswith(".means")]
    assert means and all(bool(state["model"][k[: -len("means")] + "initted"]) for k in means)


def test_generate_decodes_exactly_as_score_reference_scores(toy_bin, trained):
    """Per-token scores of beam-1 incremental decoding equal --score-reference's full-forward
    scores of the same tokens: the decoder's incremental state is exact."""
    _, _, checkpoint, _, tmp = trained
    gen = assert_incremental_scores_equal_score_reference(toy_bin, checkpoint, tmp)
    # past K x window positions: the ring cache is used
    assert max(len(gen[i]["H"][1].split()) for i in gen) >= 9


def test_interactive_translates_with_beam_search(toy_bin, trained):
    _, _, checkpoint, _, _ = trained
    assert_interactive_translates_every_line(toy_bin, checkpoint)


def test_two_process_ddp_keeps_the_kmeans_means_identical(toy_bin, tmp_path):
    """Routing on both sides, 2 CPU processes over gloo: every parameter and every k-means
    means buffer (updated once per step from each process's own batches, all-reduced) is
    identical on both ranks after training."""
    _, r0, _ = train_two_process_ddp(toy_bin, tmp_path / "ddp", options("routing", "routing"), max_update=8)
    means = [n for n in r0["model"] if n.endswith(".means")]
    # 2 encoder layers (per-head means of the package's Kmeans) + 2 decoder routers
    assert len(means) == 4, means
    for name in means:
        assert bool(r0["model"][name[: -len("means")] + "initted"])  # updated from data, not the random init
        norms = r0["model"][name].norm(dim=-1)  # an EMA of unit vectors: just inside the unit sphere
        assert bool(((norms > 0.9) & (norms <= 1 + 1e-5)).all()), norms
