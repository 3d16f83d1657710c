"""Smoke tests of the benchmark scripts at tiny sizes: structure and sanity, never timing ratios.

The scripts run as users run them, from the repository root: ``python -m scripts.benchmark_attention``.
"""

import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ATTENTION = ("-m", "scripts.benchmark_attention")
TRANSLATION = ("-m", "scripts.benchmark_translation")
PROFILE = ("-m", "scripts.profile_attention")


def _run(args, timeout):
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **__import__("os").environ,
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
        },
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _rows(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_attention_benchmark_smoke(tmp_path):
    out_csv = tmp_path / "attn.csv"
    stdout = _run(
        [
            *ATTENTION,
            "--lengths",
            "64,128",
            "--impl",
            "cluster,full",  # (one process per configuration: the other methods run in-process below)
            "--k",
            "sqrt",  # (an integer k: the in-process test)
            "--mode",
            "train",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--d",
            "32",
            "--heads",
            "4",
            "--batch",
            "2",
            "--threads",
            "1",
            "--fit",
            "64,128",
            "--csv",
            out_csv,
            "--plot",
            tmp_path / "img",
        ],
        timeout=240,
    )
    columns, rows = _rows(out_csv)
    assert columns == [
        "impl",
        "n",
        "k",
        "batch",
        "mode",
        "device",
        "time_ms",
        "peak_mb",
    ]
    seen = {(r["impl"], r["n"], r["k"], r["mode"]) for r in rows}
    for n in ("64", "128"):
        assert ("cluster", n, str(math.ceil(math.sqrt(int(n)))), "train") in seen
        assert ("full", n, "", "train") in seen
    assert len(rows) == 2 * 2
    for r in rows:
        assert r["device"] == "cpu" and r["batch"] == "2"
        assert float(r["time_ms"]) > 0 and math.isfinite(float(r["time_ms"]))
        assert math.isfinite(float(r["peak_mb"]))  # a number; the meter itself is tested below
    # `full` really is fairseq's MultiheadAttention on torch's scaled_dot_product_attention.
    assert "# full (train) runs:" in stdout and "scaled_dot_product" in stdout
    # one fitted exponent per series
    exps = [line for line in stdout.splitlines() if line.startswith("# time exponent")]
    assert len(exps) == 2, exps
    assert all(math.isfinite(float(line.split("(N")[0].split()[-1])) for line in exps), exps
    assert sorted(p.name for p in (tmp_path / "img").glob("*.png")) == ["attn_train_cpu.png"]


def test_attention_benchmark_forward_mode_stops_a_method_that_runs_out_of_memory(
    tmp_path,
):
    """naive at N=2048 needs more than a 0.1 GiB cap: reported as OOM, skipped above; the
    others go on."""
    out_csv = tmp_path / "oom.csv"
    stdout = _run(
        [
            *ATTENTION,
            "--lengths",
            "2048,4096",
            "--impl",
            "sdpa,naive",
            "--mode",
            "forward",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--d",
            "32",
            "--heads",
            "4",
            "--batch",
            "4",
            "--threads",
            "1",
            "--mem-cap-gb",
            "0.1",
            "--csv",
            out_csv,
        ],
        timeout=120,
    )
    _, rows = _rows(out_csv)
    assert {r["mode"] for r in rows} == {"forward"}
    assert [r for r in rows if r["impl"] == "naive"] == []
    assert sorted(int(r["n"]) for r in rows if r["impl"] == "sdpa") == [2048, 4096]
    assert "OOM" in stdout and "N=  2048 naive" in stdout
    assert "skip  forward N=  4096 naive" in stdout


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "iwslt14" / "test.de").exists(),
    reason="no IWSLT14 data",
)
def test_translation_benchmark_smoke(tmp_path):
    """Both settings kinds at tiny sizes: real IWSLT14 data (binarised by the script) and
    synthetic pairs of a fixed length."""
    out_csv = tmp_path / "mt.csv"
    stdout = _run(
        [
            *TRANSLATION,
            "--settings",
            "mt,48",
            "--train-lines",
            "60",
            "--gen-sentences",
            "6",
            "--layers",
            "1",
            "--embed-dim",
            "32",
            "--ffn-dim",
            "64",
            "--heads",
            "4",
            "--train-steps",
            "2",
            "--warmup",
            "1",
            "--gen-batches",
            "1",
            "--gen-warmup",
            "1",
            "--gen-batch-size",
            "3",
            "--gen-len",
            "5",
            "--max-tokens",
            "400",
            "--threads",
            "1",
            "--cluster-args",
            "--causal-window 8",
            "--data-dir",
            REPO.parent / "shared" / "data" / "iwslt14",
            "--work-dir",
            tmp_path / "work",
            "--csv",
            out_csv,
        ],
        timeout=240,
    )
    columns, rows = _rows(out_csv)
    assert columns == [
        "setting",
        "phase",
        "arch",
        "steps",
        "sentences",
        "tokens",
        "time_s",
        "rate",
        "unit",
        "ratio",
    ]
    archs = ("clusterformer_iwslt", "transformer_iwslt_de_en")
    for setting in ("mt", "48"):
        got = {(r["phase"], r["arch"]) for r in rows if r["setting"] == setting}
        assert got == {(phase, arch) for phase in ("train", "generate") for arch in archs}
    for r in rows:
        assert float(r["rate"]) > 0 and float(r["time_s"]) > 0 and float(r["ratio"]) > 0
    for setting, out_len in (("mt", 5), ("48", 48)):
        train = [r for r in rows if r["setting"] == setting and r["phase"] == "train"]
        assert len({r["tokens"] for r in train}) == 1  # the same batches for both models
        gen = [r for r in rows if r["setting"] == setting and r["phase"] == "generate"]
        assert {r["tokens"] for r in gen} == {str(3 * (out_len + 1))}  # forced length, + eos, for both
    assert (tmp_path / "work" / "mt-bin-60-6" / "dict.de.txt").exists()
    assert "load average" in stdout


def test_attention_benchmark_proj_floor_is_opt_in(tmp_path):
    """`proj` (the four projections without attention: the floor every impl pays) runs when asked
    for, and is not part of the default --impl list."""
    out_csv = tmp_path / "proj.csv"
    _run(
        [
            *ATTENTION,
            "--lengths",
            "64",
            "--impl",
            "proj,sdpa",
            "--mode",
            "train,forward",
            "--in-process",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--d",
            "32",
            "--heads",
            "4",
            "--batch",
            "2",
            "--threads",
            "1",
            "--csv",
            out_csv,
        ],
        timeout=120,
    )
    _, rows = _rows(out_csv)
    assert sorted((r["impl"], r["mode"]) for r in rows) == [
        ("proj", "forward"),
        ("proj", "train"),
        ("sdpa", "forward"),
        ("sdpa", "train"),
    ]
    assert all(float(r["time_ms"]) > 0 for r in rows)
    module = _benchmark_attention_module()
    assert "proj" in module.IMPLS and "proj" not in module.DEFAULT_IMPLS
    assert "flash" in module.IMPLS and "flash" not in module.DEFAULT_IMPLS


def test_translation_benchmark_rejects_unknown_phase():
    proc = subprocess.run(
        [sys.executable, *TRANSLATION, "--phases", "train,score", "--csv", "/dev/null"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--phases" in proc.stderr


def _benchmark_attention_module():
    """scripts.benchmark_attention, imported as `python -m` finds it: from the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        return importlib.import_module("scripts.benchmark_attention")


def test_attention_benchmark_cluster_causal_local_heads():
    """cluster-causal gets the fairseq decoder's default (half the heads local) unless told."""
    module = _benchmark_attention_module()
    _, _, m = module.build("cluster-causal", 32, 4, 4, 64, 0, "cpu")
    assert m.causal and m.local_heads == 2 and m.window == 16
    _, _, m = module.build("cluster-causal", 32, 4, 4, 64, 0, "cpu", local_heads="0")
    assert m.local_heads == 0
    for bad in ("5", "-1", "some"):
        proc = subprocess.run(
            [
                sys.executable,
                *ATTENTION,
                "--heads",
                "4",
                "--local-heads",
                bad,
                "--csv",
                "/dev/null",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2 and "--local-heads must be 'half' or an integer in [0, 4]" in proc.stderr


def test_profile_attention_smoke():
    """The profile table's groups and the --memory mode, at a tiny size."""
    common = [
        *PROFILE,
        "--n",
        "64",
        "--batch",
        "2",
        "--d",
        "32",
        "--heads",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    table = _run(common, timeout=120)
    for group in (
        "projection GEMMs",
        "flash kernel",
        "row gathers",
        "everything else",
        "total",
    ):
        assert f"| {group} |" in table
    memory = _run(common + ["--memory", "--backward-chunk-mib", "0.01"], timeout=120)
    assert "backward chunks of 0.01 MiB" in memory
    assert math.isfinite(float(memory.split("peak memory of one step: ")[1].split()[0]))


def test_attention_benchmark_in_process_mode(tmp_path):
    """--in-process (the default on CUDA): every configuration of a mode in one worker, timed side
    by side per N, a row per configuration and N, `flash` among them; a configuration over the
    time cap is measured once and not run at larger N."""
    common = [*ATTENTION, "--lengths", "64,128", "--impl", "cluster,full,sdpa,flash", "--k", "sqrt,3",
              "--mode", "train", "--d", "32", "--heads", "4", "--batch", "2", "--threads", "1", "--in-process",
              "--fit", "64,128"]  # fmt: skip
    out_csv = tmp_path / "inproc.csv"
    stdout = _run([*common, "--repeats", "2", "--warmup", "1", "--csv", out_csv], timeout=120)
    _, rows = _rows(out_csv)
    assert sorted((r["impl"], int(r["n"]), r["k"]) for r in rows) == [
        ("cluster", 64, "3"), ("cluster", 64, "8"), ("cluster", 128, "12"), ("cluster", 128, "3"), ("flash", 64, ""),
        ("flash", 128, ""), ("full", 64, ""), ("full", 128, ""), ("sdpa", 64, ""), ("sdpa", 128, "")]  # fmt: skip
    assert all(float(r["time_ms"]) > 0 and r["device"] == "cpu" for r in rows)
    assert "in-process" in stdout and "(median of 2:" in stdout
    assert "# full (train) runs:" in stdout and "scaled_dot_product" in stdout

    capped = tmp_path / "capped.csv"
    stdout = _run([*common, "--repeats", "1", "--warmup", "0", "--time-cap", "1e-9", "--csv", capped], timeout=120)
    _, rows = _rows(capped)
    assert sorted((r["impl"], int(r["n"])) for r in rows) == [
        ("cluster", 64),
        ("cluster", 64),
        ("flash", 64),
        ("full", 64),
        ("sdpa", 64),
    ]
    assert stdout.count("ONE cold step") == 5


def test_attention_benchmark_cuda_batches_and_dtype():
    """On CUDA the batch stays 20 up to N = 8192 (naive's scores as at 8192 x 20 above); --dtype
    casts the layer and its input."""
    module = _benchmark_attention_module()
    args = type("Args", (), {"batch": 0, "device": "cuda"})()
    assert [module.auto_batch(n, args) for n in (512, 8192, 16384, 32768, 65536)] == [
        20,
        20,
        5,
        1,
        1,
    ]
    args.device = "cpu"
    assert [module.auto_batch(n, args) for n in (2048, 4096, 8192)] == [20, 5, 1]
    import torch

    cfg = {
        "device": "cpu",
        "mode": "train",
        "n": 16,
        "batch": 2,
        "d": 32,
        "heads": 4,
        "window": 0,
        "dtype": "bfloat16",
    }
    run = module.Runner(cfg, "cluster", 4)
    assert run.x.dtype == torch.bfloat16 and run.module.q_proj.weight.dtype == torch.bfloat16
    assert run.step() > 0 and run.module.q_proj.weight.grad is None  # gradients cleared after the step


def test_the_memory_meter_measures_what_a_block_allocates():
    """The peak-memory column: 64 MiB touched inside the measured block reads as about 64 MiB,
    and memory freed before the block does not count."""
    import torch

    from scripts.harness_common import CpuPeak

    before = torch.ones(32 * 2**20 // 4)  # 32 MiB, allocated and freed before the block
    del before
    meter = CpuPeak()
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, every page written
    peak_mib = meter.stop() / 2**20
    del block
    assert 56 <= peak_mib <= 100, peak_mib


def test_translation_benchmark_needs_an_explicit_data_dir_for_mt():
    proc = subprocess.run(
        [sys.executable, *TRANSLATION, "--settings", "mt"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "the 'mt' setting needs --data-dir DIR" in proc.stderr


def test_count_launches_counts_what_it_claims(monkeypatch):
    """The launch counter counts every launching operation once and none of the views, and finds a
    host sync where there is one (an .item() planted into the step)."""
    import torch

    from scripts.count_launches import HOST_SYNCS, NO_LAUNCH, count_step

    full = count_step("full", 128, padded=False)
    assert full["host_syncs"] == 0 and full["launches"] == full["forward_launches"] + full["backward_launches"]
    assert not set(full["ops"]) & NO_LAUNCH and full["ops"]["mm"] + full["ops"]["addmm"] >= 4  # four projections
    assert "_local_scalar_dense" in HOST_SYNCS

    real_sum = torch.Tensor.sum

    def sum_and_read(self, *args, **kwargs):
        out = real_sum(self, *args, **kwargs)
        out.detach().item()  # a host sync inside the step
        return out

    monkeypatch.setattr(torch.Tensor, "sum", sum_and_read)
    assert count_step("full", 128, padded=False)["host_syncs"] >= 1


@pytest.mark.parametrize("padded", [False, True])
def test_cluster_layers_synchronise_only_where_they_must(padded):
    """As the fairseq model calls it, the encoder layer's training step has no host sync at all (a
    precondition for CUDA graphs, and on a GPU the CPU never waits); the causal layer has at most
    one, its exact assignment's near-tie screen."""
    from scripts.count_launches import count_step

    assert count_step("cluster", 128, padded)["host_syncs"] == 0
    causal = count_step("cluster-causal", 128, padded)
    assert causal["host_syncs"] <= 1 and causal["ops"]["nonzero"] == causal["host_syncs"]


@pytest.mark.parametrize("padded", [False, True])
def test_flex_layers_are_counted_with_one_attention_kernel_per_pass(padded):
    """impl="flex" counted as on CUDA: one FlexAttention launch forward and one backward per
    layer step, no sync the fast path does not have, the CPU's stand-ins removed afterwards; the
    causal layer's two kinds of head share one attention, so it launches fewer kernels than the
    fast path's two band attentions."""
    from fairseq_clusterformer.modules import flex
    from scripts.count_launches import count_step

    real = flex._flex, flex._within_tiles, flex.check_device
    for impl in ("cluster-flex", "cluster-causal-flex"):
        c = count_step(impl, 256, padded)
        assert c["ops"]["flex_attention"] == c["ops"]["flex_attention_backward"] == 1
        assert c["host_syncs"] == (1 if "causal" in impl else 0)
    assert (flex._flex, flex._within_tiles, flex.check_device) == real
    assert (
        count_step("cluster-causal-flex", 256, padded)["launches"]
        < count_step("cluster-causal", 256, padded)["launches"]
    )


@pytest.mark.parametrize("variant", [{"local_heads": 2}, {"causal": True, "window": 8, "local_heads": 2}])
def test_graph_replay_stand_in_keeps_values_and_gradients(variant):
    """compile="reduce-overhead" counted as on CUDA (each compiled function one graph replay per
    pass, plus its input copies): the stand-in runs the eager function, so outputs, losses and
    every gradient equal the eager layer's; the counts hold two replays per step (forward and
    backward) and far fewer launches than the eager step; the stand-in is gone afterwards."""
    import torch

    from fairseq_clusterformer.modules import ClusterAttention
    from fairseq_clusterformer.modules.cluster_attention import ClusterAttention as Layer
    from scripts.count_launches import NO_LAUNCH, _as_on_cuda, _counting_mode

    torch.manual_seed(0)
    eager = ClusterAttention(32, 4, 4, dense_max_len=0, **variant)
    graphs = ClusterAttention(32, 4, 4, dense_max_len=0, compile="reduce-overhead", **variant)
    graphs.load_state_dict(eager.state_dict())
    x = torch.randn(3, 96, 32)
    pad = torch.zeros(3, 96, dtype=torch.bool)
    pad[1, -9:] = True
    real_fast_path = Layer._fast_path
    results = {}
    for name, m in (("eager", eager), ("graphs", graphs)):
        xi = x.clone().requires_grad_()
        with _as_on_cuda("cluster-graphs"), _counting_mode() as count:
            out, info = m(xi, pad, assume_padding=True)
            (out.pow(2).sum() + info.clustering_loss + info.sorting_loss).backward()
        grads = [xi.grad] + [p.grad for p in m.parameters()]
        results[name] = out, info, grads, count.ops
    (out_e, info_e, grads_e, ops_e), (out_g, info_g, grads_g, ops_g) = results["eager"], results["graphs"]
    assert Layer._fast_path is real_fast_path
    torch.testing.assert_close(out_g, out_e, rtol=0, atol=0)
    assert torch.equal(info_g.assignments, info_e.assignments)
    torch.testing.assert_close(info_g.clustering_loss, info_e.clustering_loss, rtol=0, atol=0)
    torch.testing.assert_close(info_g.sorting_loss, info_e.sorting_loss, rtol=0, atol=0)
    assert all(g is not None for g in grads_g)
    for g_g, g_e in zip(grads_g, grads_e):
        torch.testing.assert_close(g_g, g_e, rtol=1e-6, atol=1e-7)
    assert ops_g["cuda_graph_replay"] == 2 and ops_e["cuda_graph_replay"] == 0
    assert ops_g["cuda_graph_input_copy"] >= 2  # at least x forward, the output's gradient backward
    launches = {k: sum(v for op, v in ops.items() if op not in NO_LAUNCH) for k, ops in (("e", ops_e), ("g", ops_g))}
    assert launches["g"] * 3 < launches["e"]


def test_count_launches_cli_writes_its_rows(tmp_path):
    out = tmp_path / "launches.csv"
    table = _run([*("-m", "scripts.count_launches"), "--n", "96", "--impls", "cluster,sdpa", "--csv", out], 120)
    assert "| cluster | 96 | no |" in table and "| sdpa | 96 | yes |" in table
    fields, rows = _rows(out)
    assert fields == ["impl", "n", "padded", "launches", "host_syncs", "forward_launches", "backward_launches"]
    assert [(r["impl"], r["padded"]) for r in rows] == [
        ("cluster", "0"),
        ("cluster", "1"),
        ("sdpa", "0"),
        ("sdpa", "1"),
    ]
    for r in rows:
        assert int(r["launches"]) == int(r["forward_launches"]) + int(r["backward_launches"]) > 0


def test_beam_search_is_counted_per_output_token():
    """--generate: both models decode the N + 1 steps they are held to, and ClusterFormer's
    steps make no more host syncs than the Transformer's."""
    from scripts.count_launches import count_generation

    ours = count_generation("clusterformer_iwslt", 12)
    theirs = count_generation("transformer_iwslt_de_en", 12)
    for c in (ours, theirs):
        assert c["steps"] == 13 and c["launches_per_step"] == round(c["launches"] / 13, 1) > 0
    assert 0 < ours["host_syncs"] <= theirs["host_syncs"]


@pytest.mark.parametrize("local_heads", [0, 2, 4])
def test_a_decoding_step_without_padding_takes_fewer_launches_and_the_same_values(local_heads):
    """The ring-buffer step without a padding mask (beam search's) skips the masking that keeps
    padding steps out: fewer launching operations, the same output and state as the step given
    a mask that marks no padding."""
    import torch

    from fairseq_clusterformer.modules import ClusterAttention
    from scripts.count_launches import NO_LAUNCH, _counting_mode

    torch.manual_seed(0)
    m = ClusterAttention(32, 4, 3, causal=True, window=4, local_heads=local_heads).eval()
    x = torch.randn(6, 20, 32)
    states = {}
    with torch.no_grad():
        for masked in (False, True):
            state = m.init_state(6, mode="ring")
            for t in range(19):
                _, state = m.step(x[:, t : t + 1], state, torch.zeros(6, dtype=torch.bool) if masked else None)
            with _counting_mode() as count:
                y, state = m.step(x[:, 19:], state, torch.zeros(6, dtype=torch.bool) if masked else None)
            states[masked] = y, state, sum(v for op, v in count.ops.items() if op not in NO_LAUNCH)
    (y, state, launches), (y_masked, state_masked, launches_masked) = states[False], states[True]
    torch.testing.assert_close(y, y_masked, atol=1e-6, rtol=1e-6)
    assert state.keys() == state_masked.keys()
    for name in state:
        torch.testing.assert_close(state[name], state_masked[name], atol=1e-6, rtol=1e-6)
    assert launches < launches_masked


def test_count_launches_cli_writes_its_generation_rows(tmp_path):
    out = tmp_path / "launches_generate.csv"
    table = _run([*("-m", "scripts.count_launches"), "--generate", "--n", "8", "--csv", out], 300)
    assert "| clusterformer_iwslt | 8 |" in table and "| transformer_iwslt_de_en | 8 |" in table
    fields, rows = _rows(out)
    assert fields == ["model", "n", "steps", "launches", "host_syncs", "launches_per_step", "host_syncs_per_step"]
    assert [r["model"] for r in rows] == ["clusterformer_iwslt", "transformer_iwslt_de_en"]
    for r in rows:
        assert r["steps"] == "9" and float(r["launches_per_step"]) == round(int(r["launches"]) / 9, 1)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.count_launches", "--generate", "--impls", "clusterformer_iwslt+flex"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown model 'clusterformer_iwslt+flex'" in proc.stderr


def test_whole_models_synchronise_no_more_than_fairseqs_transformer():
    """--models: a training step of clusterformer_iwslt makes no more host syncs than fairseq's
    transformer_iwslt_de_en (the decoder's near-tie screens against the Transformer encoder's
    per-layer padding checks; docs/benchmarks.md), padded or not; with its clustering layers
    replayed as CUDA graphs (+graphs) it launches fewer kernels than the Transformer."""
    from scripts.count_launches import count_model_step

    for padded in (False, True):
        ours = count_model_step("clusterformer_iwslt", 80, padded)
        theirs = count_model_step("transformer_iwslt_de_en", 80, padded)
        graphs = count_model_step("clusterformer_iwslt+graphs", 80, padded)
        assert 0 < theirs["host_syncs"] and ours["host_syncs"] <= theirs["host_syncs"]
        assert ours["ops"]["nonzero"] == 6  # one near-tie screen per decoder layer, and no other
        for c in (ours, theirs, graphs):
            assert c["launches"] == c["forward_launches"] + c["backward_launches"] > 0
        # As CUDA graphs: 12 layers, each a replay forward and backward; fewer launches than the
        # Transformer's step (docs/benchmarks.md), the same host syncs as the eager model.
        assert graphs["ops"]["cuda_graph_replay"] == 24 and graphs["host_syncs"] == ours["host_syncs"]
        assert graphs["launches"] < theirs["launches"] < ours["launches"]


def test_count_shapes_counts_fairseqs_batches_and_their_buckets(toy_bin, tmp_path):
    """scripts/count_shapes.py: the distinct (B, N, padded) shapes of an epoch of fairseq's own
    batches, no more than the batches; with --required-seq-len-multiple every N is a multiple of
    it and there are no more shapes than without; the CLI writes one CSV row per multiple and
    refuses a bad list."""
    from scripts.count_shapes import CSV_COLUMNS, count_shapes

    plain = count_shapes(toy_bin, max_tokens=200, batch_size_multiple=1, seq_len_multiple=1)
    bucketed = count_shapes(toy_bin, max_tokens=200, batch_size_multiple=1, seq_len_multiple=4)
    for c in (plain, bucketed):
        assert 1 <= c["encoder_shapes"] == len(c["encoder"]) <= c["batches"]
        assert 1 <= c["decoder_shapes"] == len(c["decoder"]) <= c["batches"]
        assert all(B * N <= 200 + 4 * B for B, N, _ in c["encoder"])  # the token budget, bucketing aside
    assert plain["batches"] == bucketed["batches"] > 1
    assert all(N % 4 == 0 for _, N, _ in bucketed["encoder"] | bucketed["decoder"])
    assert any(N % 4 for _, N, _ in plain["encoder"])  # the toy lengths are not all multiples of 4
    assert bucketed["encoder_shapes"] <= plain["encoder_shapes"]
    out = tmp_path / "shapes.csv"
    table = _run(
        ["-m", "scripts.count_shapes", toy_bin, "--max-tokens", "200", "--seq-len-multiples", "1,4", "--csv", out], 120
    )
    assert "| 1 |" in table and "| 4 |" in table
    fields, rows = _rows(out)
    assert fields == CSV_COLUMNS and [r["required_seq_len_multiple"] for r in rows] == ["1", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.count_shapes", str(toy_bin), "--seq-len-multiples", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "each at least 1" in proc.stderr
    for bad, message in (
        ([str(tmp_path)], "is not a fairseq-preprocess data-bin"),
        ([str(toy_bin), "--subset", "nosuch"], "nosuch"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "scripts.count_shapes", *bad], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
