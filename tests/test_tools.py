"""Smoke tests of the user tools (fairseq_clusterformer/tools/): clusterformer-show-clusters,
clusterformer-choose-k and the runner it trains with (runs.py), on the toy corpus with tiny models
and a few updates."""

import json
import subprocess
import sys

import pytest

from fairseq_clusterformer.tools import choose_k, runs
from fairseq_helpers import REPO, cli, run

PY = sys.executable
TINY_MODEL = (
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
    "--decoder-attention-heads 2 --share-all-embeddings"
)


def test_show_clusters_text_and_png(smoke_checkpoint_dir, toy_bin, tmp_path, capsys):
    from fairseq_clusterformer.tools import show_clusters

    out = tmp_path / "clusters.png"
    assert (
        show_clusters.main(
            [
                "--path",
                str(smoke_checkpoint_dir / "checkpoint_last.pt"),
                "--data",
                str(toy_bin),
                "--sentence",
                "s1 s2 s3 s4 s5 s6 s7",
                "--target",
                "t1 t2 t3 t4 t5 t6 t7",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for side in ("encoder", "decoder"):
        for layer in (1, 2):
            assert f"{side} layer {layer}:" in text

    def listed(block):
        return sorted(
            w
            for line in block.splitlines()
            if line.strip().startswith("cluster")
            for w in line.split(":", 1)[1].split()
        )

    # every token is listed once per layer, under exactly one cluster
    enc1 = text.split("encoder layer 1:")[1].split("encoder layer 2:")[0]
    assert listed(enc1) == sorted("s1 s2 s3 s4 s5 s6 s7 </s>".split())
    dec1 = text.split("decoder layer 1:")[1].split("decoder layer 2:")[0]
    assert listed(dec1) == sorted("</s> t1 t2 t3 t4 t5 t6 t7".split())  # the decoder's input
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size < 200_000


def test_show_clusters_unknown_tokens_stdin_and_stats(smoke_checkpoint_dir, toy_bin, monkeypatch, capsys):
    import io

    from fairseq_clusterformer.tools import show_clusters

    model, task = show_clusters.load(smoke_checkpoint_dir / "checkpoint_last.pt", toy_bin)
    assignments, warnings = show_clusters.cluster_assignments(model, task, "s1 s2 zzz")
    words, layers = assignments["encoder"]
    assert words == ["s1", "s2", "zzz", "</s>"] and len(layers) == 2
    assert all(len(ids) == 4 and all(0 <= c < 3 for c in ids) for ids in layers)
    assert "decoder" not in assignments
    assert any("zzz" in w for w in warnings)  # unknown tokens are reported
    stats = show_clusters.cluster_stats(model, task, ["s1 s2 s3", "s4 s5", ""], ["t1 t2 t3", "t4 t5", ""])
    assert list(stats) == [("encoder", 1), ("encoder", 2), ("decoder", 1), ("decoder", 2)]
    for st in stats.values():
        assert st["n"] == 2 and 1 <= st["clusters_used"] <= 3 and 0 < st["largest_share"] <= 1
    # the sentence (and target, on a second line) from stdin
    monkeypatch.setattr("sys.stdin", io.StringIO("s3 s4\nt3 t4\n"))
    assert (
        show_clusters.main(
            ["--path", str(smoke_checkpoint_dir / "checkpoint_last.pt"), "--data", str(toy_bin), "--out", ""]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "encoder layer 2:" in text and "decoder layer 2:" in text and "t4" in text


def test_choose_k_rule():
    rows = [
        {"k": 1, "valid_nll": 3.00},
        {"k": 2, "valid_nll": 3.02},
        {"k": 4, "valid_nll": 3.04},
        {"k": 8, "valid_nll": 3.30},
    ]
    k, why = choose_k.recommend(rows, tolerance=0.05)
    assert k == 4 and "largest k" in why and "k=1" in why
    k, why = choose_k.recommend(rows, tolerance=0.01)
    assert k == 1 and "best validation nll" in why
    k, _ = choose_k.recommend([{"k": 3, "valid_nll": 2.0}, {"k": 6, "valid_nll": 1.9}], tolerance=0.0)
    assert k == 6


def test_choose_k_seed_spread_and_tolerance_argument():
    runs = [
        {"k": 2, "seed": 1, "valid_nll": 3.0},
        {"k": 2, "seed": 2, "valid_nll": 3.2},  # sample variance 0.02
        {"k": 4, "seed": 1, "valid_nll": 3.1},
        {"k": 4, "seed": 2, "valid_nll": 3.1},  # 0
        {"k": 8, "seed": 1, "valid_nll": 2.0},  # one seed: no variance, left out
    ]
    assert choose_k.seed_spread(runs) == pytest.approx(0.01**0.5)
    assert choose_k.seed_spread(runs[-1:]) is None
    assert choose_k._tolerance("auto") == "auto" and choose_k._tolerance("0.1") == 0.1
    for bad in ("-0.1", "loose"):
        with pytest.raises(Exception, match="bits/token|negative"):
            choose_k._tolerance(bad)


def test_choose_k_auto_tolerance_needs_two_seeds(toy_bin, tmp_path, capsys):
    with pytest.raises(SystemExit):
        choose_k.main(["--data", str(toy_bin), "--max-update", "3", "--tolerance", "auto", "--out", str(tmp_path)])
    assert "give two seeds or more" in capsys.readouterr().err
    assert not (tmp_path / "choose_k.json").exists()  # refused before training anything


def test_annealed_settings_replace_only_the_schedule():
    settings = runs.annealed_settings(800)
    assert settings[settings.index("--lr-scheduler") + 1] == "polynomial_decay"
    assert settings[settings.index("--total-num-update") + 1] == "800"
    assert "--warmup-init-lr" not in settings and "inverse_sqrt" not in settings
    plain = list(runs.TRAIN_SETTINGS)
    for flag in ("--lr", "--warmup-updates", "--dropout", "--max-tokens", "--label-smoothing"):
        assert settings[settings.index(flag) + 1] == plain[plain.index(flag) + 1]


def test_parse_train_log():
    log = "\n".join(
        [
            "2026-01-01 00:00:01 | INFO | train_inner | epoch 001:     10 / 20 loss=5.1, nll_loss=5.0",
            "2026-01-01 00:00:02 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 4.9 | nll_loss 4.5 "
            "| ppl 22.6 | num_updates 20",
            "2026-01-01 00:00:02 | INFO | train | epoch 001 | loss 5.0 | nll_loss 4.8 | wpb 100 | num_updates 20 "
            "| train_wall 4 | wall 5",
            "2026-01-01 00:00:04 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 4.7 | nll_loss 4.6 "
            "| num_updates 30",
            "2026-01-01 00:00:04 | INFO | train | epoch 002 | loss 4.8 | wpb 50 | num_updates 30 | train_wall 6",
            "2026-01-01 00:00:04 | INFO | fairseq_cli.train | done training in 5.0 seconds",
        ]
    )
    parsed = runs.parse_train_log(log)
    assert parsed["done"] and parsed["updates"] == 30
    assert [v["nll_loss"] for v in parsed["valid"]] == [4.5, 4.6]
    assert runs.best_valid(parsed)["num_updates"] == 20
    assert parsed["train_tokens"] == 100 * 20 + 50 * 10 and parsed["tokens_per_s"] == 250.0
    assert parsed["train_wall_s"] == 10  # fairseq's per-epoch train_wall, summed


def test_choose_k_smoke(toy_bin, tmp_path, capsys):
    out = tmp_path / "ck"
    proc = run(
        [
            cli("clusterformer-choose-k"),
            "--data",
            toy_bin,
            "--ks",
            "1,2",
            "--max-update",
            "3",
            "--model-args",
            TINY_MODEL,
            "--out",
            out,
            "--",
            "--max-tokens",
            "500",
            "--causal-window",
            "8",
        ],
        timeout=300,
    )
    assert "Recommended k = " in proc.stdout
    result = json.loads((out / "choose_k.json").read_text())
    assert [r["k"] for r in result["per_k"]] == [1, 2]
    assert result["recommended_k"] in (1, 2)
    assert all(r["valid_nll"] > 0 and r["peak_rss_mb"] > 0 for r in result["per_k"])
    assert (out / "choose_k.csv").read_text().startswith("k,")
    assert (out / "choose_k.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reuses the recorded runs instead of training again
    assert (
        choose_k.main(
            [
                "--data",
                str(toy_bin),
                "--ks",
                "1,2",
                "--max-update",
                "3",
                "--model-args",
                TINY_MODEL,
                "--out",
                str(out),
                "--",
                "--max-tokens",
                "500",
                "--causal-window",
                "8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("already in") == 2
    # the invocation recorded for publishing (scripts/experiments/choose_k_multi30k.sh; the report
    # that renders it is tested in tests/harness/test_experiments.py)
    result = json.loads((out / "choose_k.json").read_text())
    assert (
        result["invocation"].startswith("clusterformer-choose-k --data ")
        and "-- --max-tokens 500" in result["invocation"]
    )


def test_choose_k_annealed_with_auto_tolerance(toy_bin, tmp_path, capsys):
    out = tmp_path / "ck"
    common = ["--data", str(toy_bin), "--ks", "2", "--max-update", "3", "--model-args", TINY_MODEL, "--out", str(out)]
    args = [*common, "--seeds", "1,2", "--tolerance", "auto", "--schedule", "anneal"]
    # the sweeps that only check bookkeeping (which runs are kept, which reused) train one seed
    one_seed = [*common, "--seeds", "1", "--tolerance", "0.05", "--schedule", "anneal"]
    assert choose_k.main([*args, "--", "--max-tokens", "500", "--causal-window", "8"]) == 0
    result = json.loads((out / "choose_k.json").read_text())
    assert result["schedule"] == "anneal" and result["tolerance_rule"] == "auto"
    assert result["tolerance"] == pytest.approx(choose_k.seed_spread(result["runs"]))
    for r in result["runs"]:  # every run decays the learning rate to zero at its own budget
        assert r["schedule"] == "anneal"
        assert "--lr-scheduler polynomial_decay" in r["command"] and "--total-num-update 3 " in r["command"]
    text = "\n".join(choose_k.render_markdown(result))
    assert "at 3 updates with the learning rate decayed to zero" in text and "`--tolerance auto`" in text
    # two seeds of one k: no analysis of variance over k (it needs two k)
    assert result["k_test"] is None and "analysis of variance" not in result["recommendation"]
    # the inverse_sqrt schedule does not reuse the annealed runs: it trains its own
    capsys.readouterr()
    plain = [a if a != "anneal" else "inverse_sqrt" for a in one_seed]
    assert choose_k.main([*plain, "--", "--max-tokens", "500", "--causal-window", "8"]) == 0
    assert "already in" not in capsys.readouterr().out
    result = json.loads((out / "choose_k.json").read_text())
    assert len(result["runs"]) == 1 and {r["schedule"] for r in result["runs"]} == {"inverse_sqrt"}
    assert all("inverse_sqrt" in r["command"] for r in result["runs"])
    assert [r["schedule"] for r in result["other_runs"]] == ["anneal", "anneal"]  # kept, not lost
    # and running the annealed sweep again reuses them
    capsys.readouterr()
    assert choose_k.main([*args, "--", "--max-tokens", "500", "--causal-window", "8"]) == 0
    assert capsys.readouterr().out.count("already in") == 2
    # --anneal-over: the first 3 updates of a 10-update decay, a different sweep from the 3-update decay
    capsys.readouterr()
    assert choose_k.main([*one_seed, "--anneal-over", "10", "--", "--max-tokens", "500", "--causal-window", "8"]) == 0
    assert "already in" not in capsys.readouterr().out
    result = json.loads((out / "choose_k.json").read_text())
    assert result["anneal_over"] == 10 and [r["anneal_over"] for r in result["runs"]] == [10]
    assert all("--total-num-update 10 " in r["command"] and "--max-update 3 " in r["command"] for r in result["runs"])
    assert {r.get("anneal_over") for r in result["other_runs"]} == {3, None}  # both earlier sweeps kept
    assert len(result["other_runs"]) == 3
    assert "at 3 updates of a linear decay over 10 updates" in "\n".join(choose_k.render_markdown(result))


def test_choose_k_anneal_over_is_checked(toy_bin, tmp_path, capsys):
    base = ["--data", str(toy_bin), "--max-update", "30", "--out", str(tmp_path)]
    for extra, message in (
        (["--anneal-over", "60"], "needs --schedule anneal"),
        (["--schedule", "anneal", "--anneal-over", "20"], "must be at least --max-update"),
    ):
        with pytest.raises(SystemExit):
            choose_k.main(base + extra)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "choose_k.json").exists()


def test_choose_k_recommendation_says_whether_the_k_differ():
    def run(k, seed, nll):
        return {"k": k, "seed": seed, "valid_nll": nll, "peak_rss_mb": 100.0}

    runs = [run(k, s, v) for k, s, v in ((2, 1, 3.00), (2, 2, 3.02), (8, 1, 3.50), (8, 2, 3.52))]
    test = choose_k.k_test(runs)
    assert (test["dof1"], test["dof2"]) == (1, 2) and test["p"] < 0.01
    k, why = choose_k.recommend(choose_k.aggregate(runs), 0.05, test)
    assert k == 2 and "At this budget, the k differ by more than the seed noise explains" in why
    runs[2:] = [run(8, 1, 3.00), run(8, 2, 3.03)]
    k, why = choose_k.recommend(choose_k.aggregate(runs), 0.05, choose_k.k_test(runs))
    assert k == 8 and "within what the seed noise explains" in why


def test_commands_not_run_elsewhere_answer_help():
    """The console commands that no other test runs: their entry points resolve and parse.
    (clusterformer-choose-k and -average-checkpoints run in their own tests; tests/test_install.py
    runs clusterformer-choose-k from a non-editable install.)"""
    commands = [
        [cli(name)] for name in ("clusterformer-show-clusters", "clusterformer-mt-prep", "clusterformer-autoload")
    ]
    procs = [subprocess.Popen([*c, "--help"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]  # fmt: skip
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "usage" in out.lower(), (command, err[-2000:])


def test_k1_cluster_attention_is_fairseq_multihead_attention():
    """The k = 1 ablation reads as "full attention": with one cluster (and a window longer than the
    sentence), ClusterAttention computes what fairseq's MultiheadAttention computes with the same
    weights, for the encoder (left padding, as fairseq pads sources) and the causal decoder."""
    import torch
    from fairseq.modules import MultiheadAttention

    from fairseq_clusterformer.modules.cluster_attention import ClusterAttention

    torch.manual_seed(0)
    d, heads, batch, n = 32, 4, 3, 11
    for causal in (False, True):
        mha = MultiheadAttention(d, heads, self_attention=True).eval()
        ca = ClusterAttention(d, heads, 1, causal=causal, window=16).eval()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(ca, name).weight.data.copy_(getattr(mha, name).weight.data)
            getattr(ca, name).bias.data.copy_(getattr(mha, name).bias.data)
        x = torch.randn(batch, n, d)
        pad, mask = torch.zeros(batch, n, dtype=torch.bool), None
        if causal:
            pad, mask = None, torch.triu(torch.full((n, n), float("-inf")), 1)
        else:
            pad[1, :4] = True
        xt = x.transpose(0, 1)
        ref = mha(xt, xt, xt, key_padding_mask=pad, attn_mask=mask, need_weights=False)[0].transpose(0, 1)
        out, _ = ca(x, pad)
        real = ~pad if pad is not None else torch.ones(batch, n, dtype=torch.bool)
        assert torch.allclose(out[real], ref[real], atol=1e-5), (causal, (out - ref)[real].abs().max())


def test_train_command_selects_the_device():
    """A GPU run drops fairseq's --cpu and is otherwise the same command; an unknown device is refused."""
    gpu = runs.train_command("bin", "save", "transformer_iwslt_de_en", 10, 1, device="cuda")
    cpu = runs.train_command("bin", "save", "transformer_iwslt_de_en", 10, 1)
    assert "--cpu" in cpu and [c for c in cpu if c != "--cpu"] == gpu
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        runs.device_args("tpu")


def test_choose_k_dry_run_plans_in_the_current_directory_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """--dry-run prints each fairseq-train command and where the results would go: the default
    output folder is work/choose_k under the current directory, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    args = ["--data", "data-bin", "--ks", "2,4", "--max-update", "10", "--seeds", "1,2", "--dry-run"]
    assert choose_k.main([*args, "--", "--max-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert out.count("would train 10 updates") == 4 and out.count("--num-clusters 4 --max-tokens 500") == 2
    assert "--save-dir work/choose_k/k2.s1/checkpoints" in out
    assert f"would write {tmp_path / 'work' / 'choose_k' / 'choose_k.json'}" in out
    assert list(tmp_path.iterdir()) == []
