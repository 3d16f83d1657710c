"""scripts/experiments/attention_coverage.py measures which words each word's self-attention
reaches from gradients. These tests check that measure against what the attention is built to
see: ClusterFormer's block visibility (encoder) and causal group visibility (decoder), computed
by the package's own reference functions from the layer's cluster assignments, and fairseq's
full and causal attention."""

import json

import pytest
import torch
from fairseq.modules import MultiheadAttention

from fairseq_clusterformer.modules import ClusterAttention
from fairseq_clusterformer.modules.clustering import block_visibility, causal_visibility, sort_by_cluster
from fairseq_clusterformer.modules.fairseq_cluster_attention import FairseqClusterAttention
from scripts.experiments import attention_coverage as cov
from scripts.experiments import report

N, D, H = 11, 16, 2


def _forward_call(x, attn_mask=None):
    return {"query": x, "key": x, "value": x, "key_padding_mask": None, "need_weights": False, "attn_mask": attn_mask}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_encoder_reach_is_the_block_visibility(k):
    torch.manual_seed(k)
    attn = FairseqClusterAttention(ClusterAttention(D, H, k)).eval()
    x = torch.randn(N, 1, D)
    _, info = attn.attend(x, None)
    _, undo_sort = sort_by_cluster(info.assignments, k)
    w = torch.tensor([-(-N // k)])
    expected = block_visibility(undo_sort, w, previous_block=True)[0]
    heads = cov.replay(attn, "attend", {"x": x, "mask": None, "centroids": None})
    assert len(heads) == H
    for reach in heads:  # every encoder head shares the clustering
        assert torch.equal(reach, expected)
    assert not expected.all()  # the check is not vacuous: some words are out of reach


def test_encoder_reach_with_carried_centroids():
    torch.manual_seed(0)
    first = FairseqClusterAttention(ClusterAttention(D, H, 3)).eval()
    second = FairseqClusterAttention(ClusterAttention(D, H, 3, learned_centroids=False)).eval()
    x = torch.randn(N, 1, D)
    _, info = first.attend(x, None)
    _, info2 = second.attend(x, None, info.centroids)
    _, undo_sort = sort_by_cluster(info2.assignments, 3)
    expected = block_visibility(undo_sort, torch.tensor([-(-N // 3)]), previous_block=True)[0]
    heads = cov.replay(second, "attend", {"x": x, "mask": None, "centroids": info.centroids})
    assert all(torch.equal(reach, expected) for reach in heads)


def test_decoder_reach_per_head_is_the_causal_visibility():
    torch.manual_seed(1)
    attn = FairseqClusterAttention(ClusterAttention(D, H, 3, causal=True, window=3, local_heads=1)).eval()
    x = torch.randn(N, 1, D)
    attn(**_forward_call(x))
    assign = attn.take_info().assignments
    a = attn.attention
    expected = causal_visibility(assign, a.window, a.num_heads, a.local_heads)[0]  # H x N x N
    heads = cov.replay(attn, "forward", _forward_call(x))
    for h in range(H):
        assert torch.equal(heads[h], expected[h]), f"head {h}"
    assert not torch.equal(heads[0], heads[1])  # the local and the clustered head differ


def test_full_attention_reaches_everything_and_causal_only_the_past():
    torch.manual_seed(2)
    mha = MultiheadAttention(D, H, self_attention=True).eval()
    x = torch.randn(N, 1, D)
    assert all(r.all() for r in cov.replay(mha, "forward", _forward_call(x)))
    future = torch.triu(torch.full((N, N), float("-inf")), 1)
    for reach in cov.replay(mha, "forward", _forward_call(x, attn_mask=future)):
        assert torch.equal(reach, torch.ones(N, N, dtype=torch.bool).tril())


def test_replay_restores_the_output_projection():
    attn = FairseqClusterAttention(ClusterAttention(D, H, 3)).eval()
    before = attn.attention.out_proj.weight.detach().clone()
    cov.replay(attn, "attend", {"x": torch.randn(N, 1, D), "mask": None, "centroids": None})
    assert torch.equal(attn.attention.out_proj.weight, before)


def test_measure_on_a_trained_toy_model_and_render(smoke_checkpoint_dir, toy_bin, tmp_path):
    from fairseq_clusterformer.tools.show_clusters import load

    model, task = load(smoke_checkpoint_dir / "checkpoint_last.pt", toy_bin)
    out = cov.measure(model, cov.test_samples(task, "valid", 5))
    assert out["sentences"] == 5 and len(out["encoder"]) == len(model.encoder.layers)
    for side in ("encoder", "decoder"):
        for layer in out[side]:
            assert 0 < min(layer["per_head_fraction"]) <= layer["any_head_fraction"] <= 1
            assert layer["future_reaching_words"] == 0
    result = {
        "sentences": 5,
        "subset_label": "valid",
        "mean_source_words": 7.0,
        "mean_target_words": 7.0,
        "seed": 1,
        "systems": [{"label": "toy", **out}],
        "command": "python -m scripts.experiments.attention_coverage",
    }
    text = "\n".join(cov.render_markdown(result))
    assert "| toy |" in text and "causality violation): 0." in text
    assert "of 5 valid sentences (mean length 7.0" in text
    assert "of 5 valid documents (" in "\n".join(cov.render_markdown({**result, "unit": "documents"}))
    # the committed form: report renders the block that names the result file
    published = tmp_path / "docs" / "results" / "coverage_toy.json"
    published.parent.mkdir(parents=True)
    published.write_text(json.dumps({**result, "kind": cov.KIND}))
    md = tmp_path / "docs" / "results.md"
    begin = report.BEGIN[: -len(" -->")] + f" from {published} -->"
    md.write_text(f"# r\n\n{begin}\nold\n{report.END}\n\nhand-written\n")
    report.report([], md, tmp_path / "docs" / "img")
    text = md.read_text()
    assert "old" not in text and "| toy |" in text and text.endswith("hand-written\n")


def test_sparse_reach_is_the_fixed_pattern_and_linformer_reaches_everything():
    from fairseq_clusterformer.baselines.linformer import LinformerAttention
    from fairseq_clusterformer.baselines.sparse import FairseqSelfAttention, SparseAttention

    torch.manual_seed(3)
    x = torch.randn(N, 1, D)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    for causal, attention, block in (
        (False, SparseAttention(D, H, num_blocks=3), -(-N // 3)),
        (True, SparseAttention(D, H, causal=True, block_len=4), 4),
    ):
        # the fixed pattern: the own block, and the last word of every block (up to i when causal)
        expected = (i // block == j // block) | (j % block == block - 1)
        if causal:
            expected &= j <= i
        future = torch.triu(torch.full((N, N), float("-inf")), 1) if causal else None
        for reach in cov.replay(FairseqSelfAttention(attention).eval(), "forward", _forward_call(x, future)):
            assert torch.equal(reach, expected), f"causal={causal}"
        assert not expected.all()
    linformer = FairseqSelfAttention(LinformerAttention(D, H, proj_len=4, max_positions=32)).eval()
    assert all(r.all() for r in cov.replay(linformer, "forward", _forward_call(x)))


def test_main_measures_each_recorded_system_and_jobs_do_not_change_the_result(
    smoke_checkpoint_dir, toy_bin, tmp_path, capsys
):
    """The command line: one row per system with a record of the seed (in the tables' order,
    whatever the records' order), the same result in one process as in two."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint_best.pt").symlink_to(smoke_checkpoint_dir / "checkpoint_last.pt")
    records = tmp_path / "runs.jsonl"
    base = {"model": "clusterformer", "seed": 1, "run_dir": str(run_dir), "dataset": "toy", "tests": []}
    rows = [{**base, "variant": v, "run_id": f"toy.{v}"} for v in ("k=auto", "base", "no-such-system")]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for jobs in (1, 2):
        out = tmp_path / f"coverage{jobs}.json"
        argv = ["--results", str(records), "--subset", "valid", "--sentences", "3", "--data", str(toy_bin)]
        assert cov.main([*argv, "--out", str(out), "--jobs", str(jobs)]) == 0
        results.append(json.loads(out.read_text()))
    one, two = results
    assert [s["run_id"] for s in one["systems"]] == ["toy.base", "toy.k=auto"]
    assert one["systems"] == two["systems"] and one["sentences"] == 3 and one["unit"] == "sentences"
    with pytest.raises(SystemExit):
        cov.main(["--results", str(records), "--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_update_replaces_the_named_systems_rows_and_keeps_the_others(smoke_checkpoint_dir, toy_bin, tmp_path, capsys):
    """--systems measures only the named systems; --update puts their rows (from another seed's
    checkpoint, say) into the existing result in place of the same systems' rows, keeps the rest,
    names each row's seed where it is not the result's, and refuses a result of other words."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint_best.pt").symlink_to(smoke_checkpoint_dir / "checkpoint_last.pt")
    records = tmp_path / "runs.jsonl"
    base = {"model": "clusterformer", "run_dir": str(run_dir), "dataset": "toy", "tests": []}
    rows = [
        {**base, "variant": v, "seed": seed, "run_id": f"toy.{v}.s{seed}"}
        for v, seed in (("base", 1), ("k=auto", 1), ("base", 2))
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "coverage.json"
    argv = [
        "--results",
        str(records),
        "--subset",
        "valid",
        "--sentences",
        "3",
        "--data",
        str(toy_bin),
        "--out",
        str(out),
    ]
    assert cov.main(argv) == 0
    first = json.loads(out.read_text())
    assert [(s["run_id"], s["seed"]) for s in first["systems"]] == [("toy.base.s1", 1), ("toy.k=auto.s1", 1)]
    assert "or the seed a row names" not in "\n".join(cov.render_markdown(first))

    assert cov.main([*argv, "--seed", "2", "--systems", "clusterformer", "--update"]) == 0
    merged = json.loads(out.read_text())
    assert [(s["run_id"], s["seed"]) for s in merged["systems"]] == [("toy.base.s2", 2), ("toy.k=auto.s1", 1)]
    assert merged["systems"][1] == first["systems"][1] and merged["seed"] == 1
    assert len(merged["commands"]) == 2 and "--update" in merged["commands"][1]
    text = "\n".join(cov.render_markdown(merged))
    assert "| ClusterFormer (seed 2) |" in text and "| ClusterFormer, k = ⌈√L⌉" in text
    assert "or the seed a row names" in text and merged["commands"][1] in text
    assert "Machine: " in report.render_coverage(merged)  # one machine measured both: named once

    # a result of other words is refused, and left as it was
    with pytest.raises(SystemExit, match="measured other words: sentences 3 there, 2 here"):
        cov.main([*argv, "--sentences", "2", "--systems", "clusterformer", "--update"])
    assert json.loads(out.read_text()) == merged
    for bad, message in (
        (["--systems", "clusterformer,no-such"], "unknown system(s) ['no-such']"),
        (["--update", "--out", str(tmp_path / "none.json")], "no result at"),
    ):
        with pytest.raises(SystemExit):
            cov.main([*argv, *bad])
        assert message in capsys.readouterr().err
