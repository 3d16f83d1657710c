"""ClusterAttention(compile=True): the fast path through torch.compile gives the eager fast path's
outputs, losses, assignments and gradients, and traces without a graph break (a break would
split the compiled graph and bring the kernel launches back).

The compiled path is meant for GPUs (docs/benchmarks.md); on the CPU inductor compiles the same
graphs to C++, which is what these tests run. Both attention backends of kernels.block_attention
are covered: torch's CPU flash kernel (the CPU default) and F.scaled_dot_product_attention with
the block mask (the CUDA path).
"""

import pytest
import torch
import torch._dynamo

from fairseq_clusterformer.modules import cluster_attention, clustering, incremental, kernels
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention

VARIANTS = {
    "encoder": {"local_heads": 2},
    "causal": {"causal": True, "window": 9, "local_heads": 2},
}


@pytest.fixture(params=["cpu-flash", "sdpa"])
def backend(request, monkeypatch):
    monkeypatch.setattr(kernels, "USE_FLASH_CPU_KERNEL", request.param == "cpu-flash")
    return request.param


def _batch(seed=0, B=3, N=70, d=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, :9] = True  # left padding
    pad[2, 50:] = True  # right padding
    return x, pad


def _step(m, x, pad):
    x = x.clone().requires_grad_(True)
    m.zero_grad()
    out, info = m(x, pad)
    (out.pow(2).sum() + info.clustering_loss + info.sorting_loss).backward()
    grads = [x.grad] + [p.grad for p in m.parameters()]
    return out, info, grads


def _recording_aot_eager(graphs):
    """torch.compile's aot_eager backend (dynamo's graph, the traced forward and backward run by
    eager kernels) that also appends (kind, graph, the forward's metadata) to GRAPHS."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    def recorder(kind):
        def compile_graph(gm, example_inputs):
            context = TracingContext.try_get()
            graphs.append((kind, gm, None if context is None else context.fw_metadata))
            return make_boxed_func(gm.forward)

        return compile_graph

    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))


@pytest.fixture
def compiler(request, monkeypatch):
    """torch.compile's backend for one test, with a fresh cache of compiled functions: yields
    its name and the list of the traced graphs that aot_eager compiled."""
    graphs = []
    backend = _recording_aot_eager(graphs) if request.param == "aot_eager" else request.param
    monkeypatch.setattr(cluster_attention, "_COMPILED", {})
    monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    yield request.param, graphs
    torch._dynamo.reset()


# aot_eager: dynamo's graph and the traced forward/backward, run by eager kernels (seconds),
# the traced graphs also checked for CUDA graphs (_assert_fit_for_cuda_graphs);
# inductor: the whole pipeline with generated code (about a minute on the CPU: one case).
@pytest.mark.parametrize(
    "variant, backend, compiler",
    [
        ("encoder", "cpu-flash", "aot_eager"),
        ("encoder", "sdpa", "aot_eager"),
        ("causal", "cpu-flash", "aot_eager"),
        ("causal", "sdpa", "aot_eager"),
        ("encoder", "sdpa", "inductor"),
    ],
    indirect=["backend", "compiler"],
)
def test_compiled_fast_path_equals_eager(variant, backend, compiler):
    torch.manual_seed(1)
    eager = ClusterAttention(32, 4, 4, dense_max_len=0, **VARIANTS[variant])
    compiled = ClusterAttention(32, 4, 4, dense_max_len=0, compile=True, **VARIANTS[variant])
    compiled.load_state_dict(eager.state_dict())
    # Each padding case at two shapes: the second reuses the first's graphs (dynamic shapes), so
    # nothing of the first shape may be baked into them (inductor once fixed a stride so).
    for seed, with_pad, B, N in ((0, True, 3, 70), (1, False, 3, 70), (2, True, 4, 91), (3, False, 3, 83)):
        x, pad = _batch(seed, B, N)
        pad = pad if with_pad else None
        out_e, info_e, grads_e = _step(eager, x, pad)
        out_c, info_c, grads_c = _step(compiled, x, pad)
        assert torch.equal(info_c.assignments, info_e.assignments)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(info_c.clustering_loss, info_e.clustering_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(info_c.sorting_loss, info_e.sorting_loss, rtol=1e-5, atol=1e-6)
        if info_e.centroids is not None:
            torch.testing.assert_close(info_c.centroids, info_e.centroids, rtol=1e-5, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    name, graphs = compiler
    if name == "aot_eager":  # one forward and one backward graph per padding case
        assert [kind for kind, _, _ in graphs] == ["forward", "backward"] * 2
        _assert_fit_for_cuda_graphs(graphs)


def _assert_fit_for_cuda_graphs(graphs):
    """compile="reduce-overhead" replays a compiled function as a CUDA graph only where inductor
    allows it: no operation it marks unsafe for CUDA graphs, no size that depends on the data
    (unbacked symbols), no mutated graph input (else inductor skips the graph and every kernel
    is launched again). Checked on the traced forward and backward graphs with inductor's own
    test."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    for kind, gm, meta in graphs:
        node = get_first_incompatible_cudagraph_node(gm)
        assert node is None, f"{kind}: {node.target} keeps the graph from being recorded"
        assert meta is not None and not [i for i, inp in enumerate(meta.input_info) if inp.mutates_data], kind


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_path_compiles_into_one_graph(variant, monkeypatch):
    """The functions compile=True compiles trace whole on the sdpa path (the one CUDA runs)."""
    monkeypatch.setattr(kernels, "USE_FLASH_CPU_KERNEL", False)
    torch._dynamo.reset()
    torch.manual_seed(2)
    m = ClusterAttention(32, 4, 4, dense_max_len=0, **VARIANTS[variant])
    x, pad = _batch(3)
    words = clustering.words_of(x, pad)
    if m.causal:
        fn, args = ClusterAttention._fast_causal, (m, x, words, incremental.assign_per_word(m, x))
    else:
        k_b, K = clustering.cluster_counts(words.lengths, m.num_clusters, m.max_clusters)
        fn, args = ClusterAttention._fast_encoder, (m, x, words, m.layer_centroids(x, None, K), k_b, K)
    explanation = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compile_option_is_checked():
    for bad in ("yes", 1, "reduce_overhead"):
        with pytest.raises(ValueError, match="compile must be True, False or one of"):
            ClusterAttention(32, 4, 3, compile=bad)
    with pytest.raises(ValueError, match="compile applies to the fast implementation"):
        ClusterAttention(32, 4, 3, compile=True, impl="reference")
    assert "compile='default'" in repr(ClusterAttention(32, 4, 3, compile=True))
    m = ClusterAttention(32, 4, 3, compile="reduce-overhead")
    assert m.compile and m.compile_mode == "reduce-overhead" and "compile='reduce-overhead'" in repr(m)
    m.compile = False
    assert not m.compile and m.compile_mode is None and "compile" not in repr(m)


@pytest.mark.parametrize("mode", cluster_attention.COMPILE_MODES)
def test_compile_modes_reach_torch_compile(mode, monkeypatch):
    """Each mode compiles its own functions with that mode's inductor options (CUDA graphs for
    reduce-overhead), and the layer runs them: here torch.compile is replaced by a recorder that
    returns the function itself, so the call runs eagerly and its result is the eager one."""
    from torch._inductor import list_mode_options

    calls = []

    def recorder(fn, **kwargs):
        calls.append((fn.__name__, kwargs))
        return fn

    monkeypatch.setattr(cluster_attention, "_COMPILED", {})
    monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(torch, "compile", recorder)
    torch.manual_seed(3)
    for variant in VARIANTS:
        eager = ClusterAttention(32, 4, 4, dense_max_len=0, **VARIANTS[variant])
        compiled = ClusterAttention(32, 4, 4, dense_max_len=0, compile=mode, **VARIANTS[variant])
        compiled.load_state_dict(eager.state_dict())
        x, pad = _batch(4)
        torch.testing.assert_close(compiled(x, pad)[0], eager(x, pad)[0], rtol=0, atol=0)
    assert [name for name, _ in calls] == ["_fast_encoder", "_fast_causal"]
    for _, kwargs in calls:
        assert kwargs["dynamic"] is True and kwargs["backend"] == "inductor"
        assert kwargs["options"] == {**list_mode_options(mode), "cpp.simdlen": 1}
    assert set(cluster_attention._COMPILED) == {("_fast_encoder", mode), ("_fast_causal", mode)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_batch_sizes_and_lengths_do_not_recompile(variant, monkeypatch):
    """fairseq hands the layer a transposed time-first tensor, whose strides change with the
    batch size, and the first encoder layer expanded learned centroids where later layers get
    carried ones: none of that may recompile (each compile costs seconds to minutes)."""
    monkeypatch.setattr(cluster_attention, "_COMPILED", {})
    monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch.manual_seed(5)
    first = ClusterAttention(32, 4, 4, dense_max_len=0, compile=True, **VARIANTS[variant])
    later = None
    if variant == "encoder":
        later = ClusterAttention(32, 4, 4, dense_max_len=0, compile=True, learned_centroids=False, **VARIANTS[variant])

    def run(B, N):
        x = torch.randn(N, B, 32).transpose(0, 1)  # B x N x d view of a time-first tensor
        out, info = first(x, None)
        if later is not None:
            out, _ = later(out, None, centroids=info.centroids)
        out.sum().backward()

    from torch._dynamo.utils import counters

    counters.clear()
    run(2, 70)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for B, N in ((3, 70), (5, 81), (2, 96)):
        run(B, N)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
