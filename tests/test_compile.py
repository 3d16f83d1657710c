"""ClusterAttention(compile=True): the fast path through torch.compile gives the eager fast path's
outputs, losses, assignments and gradients, and traces without a graph break (a break would
split the compiled graph and bring the kernel launches back).

The compiled path is meant for GPUs (docs/benchmarks.md); on the CPU inductor compiles the same
graphs to C++, which one case here runs; the others trace through aot_eager (dynamo's and
autograd's graphs run by eager kernels). These tests compile the attention backend CUDA runs
(F.scaled_dot_product_attention with the block mask); torch's CPU flash kernel (the CPU default)
compiled is tests/test_cuda.py's compiled cases, which scripts/gpu/check.sh --dry-run runs on the
CPU (tests/harness/test_gpu_check.py).
"""

import logging

import pytest
import torch
import torch._dynamo

from fairseq_clusterformer.modules import cluster_attention, clustering, incremental, kernels
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention

VARIANTS = {
    "encoder": {"local_heads": 2},
    "causal": {"causal": True, "window": 9, "local_heads": 2},
}


def _batch(seed=0, B=3, N=70, d=32):
    """x: B x N x d, a view of a time-first tensor as fairseq passes it (its strides change with
    B), and a padding mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, B, d, generator=g).transpose(0, 1)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, :9] = True  # left padding
    pad[2, 50:] = True  # right padding
    return x, pad


def _step(layers, x, pad):
    """One training step through LAYERS, each encoder layer after the first given the centroids
    the one before it carried: the output, each layer's info, and every gradient."""
    x = x.clone().requires_grad_(True)
    out, centroids, infos = x, None, []
    for m in layers:
        m.zero_grad()
        out, info = m(out, pad) if centroids is None else m(out, pad, centroids=centroids)
        centroids = None if m.causal else info.centroids
        infos.append(info)
    loss = out.pow(2).sum() + sum(info.clustering_loss + info.sorting_loss for info in infos)
    loss.backward()
    grads = [x.grad] + [p.grad for m in layers for p in m.parameters()]
    return out, infos, grads


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


class _Restarts(logging.Handler):
    """Dynamo's "Restarting analysis" messages: a restarted trace is traced again from the start
    (a float made symbolic, then needed as a number, restarts it and doubles the compile)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons = []

    def emit(self, record):
        if record.getMessage().startswith("Restarting analysis"):
            self.reasons.append(record.getMessage())


@pytest.fixture
def compiler(request, monkeypatch):
    """torch.compile's backend for one test, with a fresh cache of compiled functions: yields
    its name, the list of the traced graphs that aot_eager compiled, and the reasons of any
    restarted trace."""
    graphs = []
    backend = _recording_aot_eager(graphs) if request.param == "aot_eager" else request.param
    monkeypatch.setattr(cluster_attention, "_COMPILED", {})
    monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    restarts = _Restarts()
    log = logging.getLogger("torch._dynamo.convert_frame")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(restarts)
    try:
        yield request.param, graphs, restarts.reasons
    finally:
        log.removeHandler(restarts)
        log.setLevel(level)
        torch._dynamo.reset()


# aot_eager: the traced graphs also checked for CUDA graphs (_assert_fit_for_cuda_graphs);
# inductor: the whole pipeline with generated code (half a minute on the CPU: one case).
@pytest.mark.parametrize(
    "variant, compiler",
    [("encoder", "aot_eager"), ("causal", "aot_eager"), ("encoder", "inductor")],
    indirect=["compiler"],
)
def test_compiled_fast_path_equals_eager(variant, compiler, monkeypatch):
    """The compiled layers' outputs, losses, assignments, carried centroids and gradients equal
    the eager ones', each padding case at two shapes of other batch sizes, lengths and strides,
    the encoder's first layer (learned centroids) and a later one (carried centroids) sharing
    the compiled functions; with aot_eager, exactly one forward and one backward graph per
    padding case: nothing of the first shape or layer baked in (inductor once fixed a stride
    so), nothing that recompiles (each compile costs seconds to minutes)."""
    monkeypatch.setattr(kernels, "USE_FLASH_CPU_KERNEL", False)  # the sdpa path, CUDA's
    torch.manual_seed(1)
    n_layers = 2 if variant == "encoder" else 1
    eager = [
        ClusterAttention(32, 4, 4, dense_max_len=0, learned_centroids=i == 0, **VARIANTS[variant])
        for i in range(n_layers)
    ]
    compiled = [
        ClusterAttention(32, 4, 4, dense_max_len=0, compile=True, learned_centroids=i == 0, **VARIANTS[variant])
        for i in range(n_layers)
    ]
    for c, e in zip(compiled, eager):
        c.load_state_dict(e.state_dict())
    for seed, with_pad, B, N in ((0, True, 3, 70), (1, False, 5, 70), (2, True, 4, 91), (3, False, 3, 83)):
        x, pad = _batch(seed, B, N)
        pad = pad if with_pad else None
        out_e, infos_e, grads_e = _step(eager, x, pad)
        out_c, infos_c, grads_c = _step(compiled, x, pad)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        for info_c, info_e in zip(infos_c, infos_e):
            assert torch.equal(info_c.assignments, info_e.assignments)
            torch.testing.assert_close(info_c.clustering_loss, info_e.clustering_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(info_c.sorting_loss, info_e.sorting_loss, rtol=1e-5, atol=1e-6)
            if info_e.centroids is not None:
                torch.testing.assert_close(info_c.centroids, info_e.centroids, rtol=1e-5, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    name, graphs, restarts = compiler
    assert not restarts, restarts  # each graph traced once
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
