"""scripts/experiments/cluster_analysis.py: its statistics against closed forms, and a whole run
on a tiny trained checkpoint, rendered by the report."""

import json
import math

import pytest

from scripts.experiments import cluster_analysis as ca
from scripts.experiments import report


def test_nmi_closed_forms():
    a = [0, 0, 1, 1, 2, 2]
    assert ca.nmi(a, ["x", "x", "y", "y", "z", "z"]) == pytest.approx(1.0)  # the same partition, renamed
    assert ca.nmi([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)  # independent
    assert ca.nmi([0, 0, 0], [1, 2, 3]) == 0.0  # a constant side carries no information
    # two clusters against four equally likely labels that split each cluster in two:
    # I = log 2, H(C) = log 2, H(Y) = log 4, NMI = log 2 / sqrt(log 2 log 4) = 1 / sqrt(2)
    assert ca.nmi([0, 0, 1, 1], [0, 1, 2, 3]) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="equally long"):
        ca.nmi([0], [0, 1])


def test_bpe_pieces_become_words_with_the_first_pieces_cluster():
    words, clusters = ca.merge_bpe(["ein", "hun@@", "d", "läuft", "</s>"], [0, 1, 2, 1, 0])
    assert words == ["ein", "hund", "läuft", "</s>"] and clusters == [0, 1, 1, 0]


def test_clusters_that_follow_position_score_one_on_position_only():
    rows = []
    for n in (3, 6, 9):
        words = [f"w{i}" for i in range(n)]
        rows.append(("encoder", 1, words, [i * 3 // n for i in range(n)]))  # the sentence's thirds
        rows.append(("encoder", 2, words, [0] * n))  # one cluster
    layers = ca.analyse(rows)
    assert layers["encoder 1"]["nmi_position"] == pytest.approx(1.0)
    assert layers["encoder 1"]["clusters_used"] == 3 and layers["encoder 1"]["largest_share"] == pytest.approx(1 / 3)
    assert layers["encoder 2"]["nmi_position"] == 0.0 and layers["encoder 2"]["largest_share"] == 1.0
    assert [c["cluster"] for c in layers["encoder 1"]["clusters"]] == [0, 1, 2]


def test_a_trained_toy_model_end_to_end(smoke_checkpoint_dir, toy_bin, tmp_path):
    raw = toy_bin.parent / "raw"
    out = tmp_path / "toy_clusters.json"
    ca.main([
        "--path", str(smoke_checkpoint_dir / "checkpoint_best.pt"), "--data", str(toy_bin),
        "--source", str(raw / "test.src"), "--target", str(raw / "test.tgt"), "--out", str(out),
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["kind"] == "cluster_analysis"
    assert list(result["layers"]) == ["encoder 1", "encoder 2", "decoder 1", "decoder 2"]  # TINY: 2 + 2 layers
    for v in result["layers"].values():
        assert v["sentences"] == 20 and 1 <= v["clusters_used"] <= 3 and 0 <= v["nmi_position"] <= 1
        assert abs(sum(c["share"] for c in v["clusters"]) - 1) < 1e-9
    text = report.render_cluster_analysis(result, out, tmp_path, tmp_path)
    assert "| encoder 1 |" in text and (tmp_path / "toy_clusters.png").is_file()
