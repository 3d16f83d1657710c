"""ClusterFormer through fairseq's command-line tools, end to end on the toy corpus."""

import re

import pytest

from fairseq_helpers import CLUSTER_CRITERION as CRIT
from fairseq_helpers import TINY as SMALL
from fairseq_helpers import assert_incremental_scores_equal_score_reference, generate, parse_generate, train


def scalar(log, name):
    """All values of `name` in fairseq's simple-format train log lines."""
    return [float(v) for v in re.findall(rf"\| {name} ([-\d.]+)", log)]


@pytest.fixture(scope="module")
def trained(toy_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("cf")
    out = train(
        toy_bin,
        save,
        "clusterformer_iwslt",
        extra=SMALL + CRIT + ["--max-epoch", "100", "--no-epoch-checkpoints"],
        max_update=300,
    )
    return save, out.stdout + out.stderr


def test_training_reduces_loss_and_logs_both_cluster_losses(trained):
    save, log = trained
    train_lines = [l for l in log.splitlines() if "| train |" in l]  # one per epoch
    losses = scalar("\n".join(train_lines), "loss")
    assert len(losses) >= 10
    assert losses[-1] < losses[0] - 1.0, losses
    for name in ("clustering_loss", "sorting_loss"):
        values = scalar("\n".join(train_lines), name)
        assert values and all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in values), (name, values)
    valid_lines = [l for l in log.splitlines() if "| valid |" in l]
    assert valid_lines and all("clustering_loss" in l and "sorting_loss" in l for l in valid_lines)


def test_generate_translates_every_sentence(toy_bin, trained):
    save, _ = trained
    hyps = parse_generate(generate(toy_bin, save / "checkpoint_last.pt", extra=["--beam", "4"]).stdout)
    assert sorted(hyps) == list(range(20))
    # The toy language maps word to word in order: position-wise accuracy far above chance (1/24).
    hits = total = 0
    for h in hyps.values():
        hyp, ref = h["H"][1].split(), h["T"].split()
        hits += sum(a == b for a, b in zip(hyp, ref))
        total += len(ref)
    assert hits / total > 0.3, f"position-wise accuracy {hits / total:.2f} after 300 updates"


def test_score_reference_equals_incremental_beam1_scores(toy_bin, trained, tmp_path):
    """Per-token scores of a hypothesis decoded incrementally equal the full-forward scores of the
    same tokens under --score-reference: the decoder's incremental state is exact."""
    assert_incremental_scores_equal_score_reference(toy_bin, trained[0] / "checkpoint_last.pt", tmp_path)


@pytest.fixture(scope="module")
def trained_auto_dot(toy_bin, tmp_path_factory):
    """--num-clusters auto and --cluster-similarity dot, with the clustering loss at weight 1."""
    save = tmp_path_factory.mktemp("cf_auto_dot")
    options = ["--num-clusters", "auto", "--causal-num-clusters", "3", "--cluster-similarity", "dot"]
    out = train(
        toy_bin,
        save,
        "clusterformer_iwslt",
        extra=SMALL
        + CRIT
        + options
        + ["--clustering-loss-weight", "1", "--max-epoch", "100", "--no-epoch-checkpoints"],
        max_update=60,
    )
    return save, out.stdout + out.stderr


def test_auto_and_dot_train_lower_the_clustering_loss_and_decode_exactly(toy_bin, trained_auto_dot, tmp_path):
    save, log = trained_auto_dot
    losses = scalar("\n".join(line for line in log.splitlines() if "| train |" in line), "clustering_loss")
    assert len(losses) >= 10
    assert losses[-1] < losses[0] - 0.3, losses  # the clustering loss is trained down
    from fairseq import checkpoint_utils

    import fairseq_clusterformer  # noqa: F401  (the safe loader's allow-list)

    cfg = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))["cfg"]["model"]
    assert (cfg.num_clusters, cfg.causal_num_clusters, cfg.cluster_similarity) == ("auto", 3, "dot")
    assert_incremental_scores_equal_score_reference(toy_bin, save / "checkpoint_last.pt", tmp_path)
