"""ClusterAttention on a CUDA GPU: the float64 reference, half precision, gradients, incremental
decoding, batch invariance, and which scaled_dot_product_attention kernel really runs.

Marked ``cuda``: skipped where torch sees no CUDA device. scripts/gpu/check.sh runs them on the
GPU (``pytest -m cuda``); its ``--dry-run`` sets CLUSTERFORMER_CUDA_TESTS_DEVICE=cpu, which runs
the same tests on the CPU (all but the CUDA kernel checks, which need the CUDA backends), so that
they cannot rot while no GPU is at hand.

Tolerances: fp32 on the GPU against the float64 reference 1e-4 (as on the CPU; TF32 is switched
off); bfloat16 2e-2 and float16 3e-3 of the largest reference output (about five times the
errors seen on the CPU's kernels: 4.5e-3 and 4.7e-4), against the reference run on the same rounded weights
and inputs, on the sequences whose cluster assignments equal the reference's (an argmax may flip
on a near tie in half precision; at most one sequence of the batch may).
"""

import copy
import os

import pytest
import torch

from fairseq_clusterformer.modules import cluster_attention
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention
from reference_cluster_attention import reference_forward

DEVICE = os.environ.get("CLUSTERFORMER_CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (scripts/gpu/check.sh)",
    ),
]
HALF_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
VARIANTS = {
    "encoder": {},
    "causal": {"causal": True, "window": 5},
    "causal-local": {"causal": True, "window": 5, "local_heads": 2},
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: no TF32 in the matmuls of this module's tests."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make(variant, d=32, heads=4, k=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ClusterAttention(d, heads, k, **VARIANTS[variant]).to(DEVICE, dtype).eval()


def padded_batch(B, N, d, seed):
    """x (B x N x d, float32 on DEVICE) and a key padding mask with left and right padding, one full row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    for b in range(1, B):
        L = int(torch.randint(2, N, (1,), generator=g))
        if b % 2:
            kpm[b, : N - L] = True
        else:
            kpm[b, L:] = True
    return x.to(DEVICE), kpm.to(DEVICE)


def reference(m, x, kpm):
    """The float64 reference on the CPU, with m's weights (as they are, rounding included)."""
    m64 = copy.deepcopy(m).to("cpu", torch.float64)
    out, _, cl, sl, assign = reference_forward(m64, x.detach().cpu().double(), kpm.cpu())
    return out, cl, sl, assign


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_matches_float64_reference(variant):
    m = make(variant)
    x, kpm = padded_batch(4, 23, 32, seed=1)
    out, info = m(x, kpm)
    ref, ref_cl, ref_sl, ref_assign = reference(m, x, kpm)
    assert out.device.type == DEVICE and out.dtype == torch.float32
    valid = ~kpm.cpu()
    assert torch.equal(info.assignments.cpu(), ref_assign)
    torch.testing.assert_close(out.double().cpu()[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert abs(info.clustering_loss.item() - ref_cl) < 1e-4 and abs(info.sorting_loss.item() - ref_sl) < 1e-4
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_half_precision_within_tolerance(variant, dtype):
    m = make(variant, dtype=dtype)
    x, kpm = padded_batch(6, 31, 32, seed=2)
    x = x.to(dtype)
    out, info = m(x, kpm)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref, ref_cl, ref_sl, ref_assign = reference(m, x, kpm)
    tol = HALF_TOL[dtype] * float(ref.abs().max())
    assign = info.assignments.cpu()
    same = [b for b in range(x.size(0)) if torch.equal(assign[b], ref_assign[b])]
    assert len(same) >= x.size(0) - 1, (
        f"assignments differ from the reference in rows {set(range(x.size(0))) - set(same)}"
    )
    valid = ~kpm.cpu()
    for b in same:
        err = (out[b].double().cpu() - ref[b])[valid[b]].abs().max()
        assert err <= tol, f"row {b}: max error {float(err):.3g} > {tol:.3g}"
    if len(same) == x.size(0):  # the losses average over the whole batch
        assert abs(info.clustering_loss.item() - ref_cl) <= HALF_TOL[dtype]
        assert abs(info.sorting_loss.item() - ref_sl) <= HALF_TOL[dtype]


def steps_against_float64(m, m64, x, kpm, seed):
    """One training step of m (fp32 on DEVICE) and of m64 (float64 on the CPU) on the same batch,
    loss = a random weighting of the real outputs plus both clustering losses: for each,
    (output, assignments, [input gradient, every parameter's gradient by name])."""
    w = torch.randn(*x.shape, generator=torch.Generator().manual_seed(seed))
    results = []
    for layer, dev, dtype in ((m, DEVICE, torch.float32), (m64, "cpu", torch.float64)):
        xi = x.detach().to(dev, dtype).requires_grad_(True)
        out, info = layer(xi, kpm.to(dev))
        loss = (out * w.to(dev, dtype) * (~kpm.to(dev))[..., None]).sum() + info.clustering_loss + info.sorting_loss
        loss.backward()
        grads = [xi.grad] + [p.grad for _, p in sorted(layer.named_parameters())]
        results.append((out.detach(), info.assignments, grads))
    return results


def assert_gradients_close(m, grads, grads64):
    names = ["x"] + [n for n, _ in sorted(m.named_parameters())]
    for name, g, g64 in zip(names, grads, grads64):
        assert (g is None) == (g64 is None), name
        if g is not None:
            torch.testing.assert_close(g.double().cpu(), g64, atol=1e-4, rtol=1e-3, msg=lambda s, n=name: f"{n}: {s}")
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_float64(variant):
    """Gradients of the input and of every parameter (through the output and both clustering
    losses) equal those of the same layer in float64 on the CPU."""
    m = make(variant)
    x, kpm = padded_batch(3, 19, 32, seed=3)
    (_, _, grads), (_, _, grads64) = steps_against_float64(m, copy.deepcopy(m).to("cpu", torch.float64), x, kpm, 4)
    assert_gradients_close(m, grads, grads64)


@pytest.mark.parametrize("local_heads", [0, 2])
def test_incremental_decoding_with_beam_reordering_equals_full_forward(local_heads):
    torch.manual_seed(5)
    m = ClusterAttention(32, 4, 3, causal=True, window=3, local_heads=local_heads).to(DEVICE).eval()
    B, N = 4, 17
    x = torch.randn(B, N, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    reorders = {5: torch.tensor([2, 2, 0, 1]), 11: torch.tensor([3, 1, 1, 0])}
    for mode in ("ring", "auto"):
        state, outs, history = m.init_state(B, mode=mode), [], x[:, :0]
        for t in range(N):
            if t in reorders:
                order = reorders[t].to(DEVICE)
                state = ClusterAttention.reorder_state(state, order)
                history, outs = history[order], [o[order] for o in outs]
            y, state = m.step(x[:, t : t + 1], state)
            assert y.device.type == DEVICE
            history = torch.cat([history, x[:, t : t + 1]], 1)
            outs.append(y)
        full, _ = m(history)
        torch.testing.assert_close(
            torch.cat(outs, 1),
            full,
            atol=1e-5,
            rtol=1e-5,
            msg=lambda s, mode=mode: f"{mode}: {s}",
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_invariance(variant):
    """A sentence's output does not depend on its batch mates or on left/right padding."""
    m = make(variant)
    g = torch.Generator().manual_seed(7)
    sentence = torch.randn(1, 11, 32, generator=g).to(DEVICE)
    alone, _ = m(sentence)
    for pad_left, pad_right, mates in [(0, 6, 2), (6, 0, 3), (2, 5, 5)]:
        N = 11 + pad_left + pad_right
        batch, kpm = padded_batch(mates + 1, N, 32, seed=N + mates)
        row = mates // 2
        batch[row] = torch.randn(N, 32, generator=g).to(DEVICE) * 5  # garbage in the padding
        batch[row, pad_left : pad_left + 11] = sentence[0]
        kpm[row] = True
        kpm[row, pad_left : pad_left + 11] = False
        out, _ = m(batch, kpm)
        torch.testing.assert_close(out[row, pad_left : pad_left + 11], alone[0], atol=1e-5, rtol=1e-5)


def _sdpa_ops(fn):
    """Names of the aten attention ops that fn() runs (scaled_dot_product_* and the flash /
    memory-efficient kernels' own ops, e.g. aten::_efficient_attention_forward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::") and "attention" in e.key}


@pytest.mark.skipif(not ON_CUDA, reason="the flash and memory-efficient sdpa backends are CUDA's")
@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32],
    ids=["bf16", "fp16", "fp32"],
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sdpa_runs_a_fused_kernel_not_the_math_fallback(variant, dtype):
    """Forward and backward of the layer with only the flash and memory-efficient backends
    enabled (a math fallback would raise "No available kernel"), and the profiler shows the fused
    kernel ran and the math one did not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = make(variant, d=256, heads=4, k=4, dtype=dtype)  # head dim 64
    x, kpm = padded_batch(2, 200, 256, seed=8)
    x = x.to(dtype).requires_grad_(True)

    def step():
        out, info = m(x, kpm)
        (out.float().sum() + info.clustering_loss + info.sorting_loss).backward()
        torch.cuda.synchronize()

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ops = _sdpa_ops(step)
    fused = {op for op in ops if "flash" in op or "efficient" in op}
    assert fused, f"no fused sdpa kernel ran: {sorted(ops)}"
    assert not any("math" in op for op in ops), sorted(ops)
    assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not ON_CUDA, reason="the flash and memory-efficient sdpa backends are CUDA's")
@pytest.mark.parametrize("local_heads", [0, 2])
def test_incremental_step_runs_a_fused_kernel(local_heads):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(9)
    m = ClusterAttention(256, 4, 3, causal=True, window=8, local_heads=local_heads).to(DEVICE, torch.bfloat16).eval()
    x = torch.randn(3, 12, 256, device=DEVICE, dtype=torch.bfloat16)

    def decode():
        state = m.init_state(3)
        with torch.no_grad():
            for t in range(12):
                _, state = m.step(x[:, t : t + 1], state)
        torch.cuda.synchronize()

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ops = _sdpa_ops(decode)
    assert {op for op in ops if "flash" in op or "efficient" in op}, sorted(ops)
    assert not any("math" in op for op in ops), sorted(ops)


@pytest.mark.parametrize(
    "variant, dtype, mode",
    [(variant, dtype, True) for variant in ("encoder", "causal-local") for dtype in (torch.float32, torch.bfloat16)]
    + [(variant, torch.bfloat16, "reduce-overhead") for variant in ("encoder", "causal-local")],
    ids=lambda v: {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        True: "default",
        "reduce-overhead": "cuda-graphs",
    }.get(v, v),
)
def test_compiled_fast_path_equals_eager(variant, dtype, mode, monkeypatch):
    """compile=True (Triton kernels on CUDA), and compile="reduce-overhead" (the same replayed as
    CUDA graphs: its steps warm up, record, then replay), against the eager fast path on the
    same device, step after step as in training and at three shapes: assignments equal, outputs
    and gradients within the dtype's tolerance. On the CPU (the dry run) the compiled graphs run
    through torch.compile's aot_eager backend: dynamo's and autograd's traced graphs, run by
    eager kernels, without inductor's C++ build (tests/test_compile.py runs inductor on the CPU)."""
    if mode == "reduce-overhead" and not ON_CUDA:
        pytest.skip("CUDA graphs are CUDA's (on the CPU the mode compiles what compile=True does)")
    if not ON_CUDA:
        monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", "aot_eager")
        monkeypatch.setattr(cluster_attention, "_COMPILED", {})
    eager = make(variant, d=64, heads=4, k=4, dtype=dtype)
    compiled = copy.deepcopy(eager)
    compiled.compile = mode
    tol = 1e-4 if dtype == torch.float32 else HALF_TOL[dtype]
    # With CUDA graphs: warm-up, recording, replays; then two other shapes, which reuse the
    # compiled graphs (dynamic shapes) and record their own CUDA graphs.
    for step, (B, N) in enumerate([(3, 150)] * 4 + [(4, 131), (2, 170)]):
        x, kpm = padded_batch(B, N, 64, seed=11 + step)
        results = []
        for m in (eager, compiled):
            xx = x.to(dtype).requires_grad_(True)
            out, info = m(xx, kpm)
            (out.float().pow(2).sum() + info.clustering_loss + info.sorting_loss).backward()
            results.append((out.float().detach().clone(), info.assignments.clone(), xx.grad.float()))
        (out_e, a_e, g_e), (out_c, a_c, g_c) = results
        assert torch.equal(a_c, a_e), step
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=tol * out_e.abs().max().item())
        torch.testing.assert_close(g_c, g_e, rtol=0, atol=tol * g_e.abs().max().item())


FLEX_VARIANTS = {
    "encoder": {"local_heads": 2},
    "causal-local": {"causal": True, "window": 5, "local_heads": 2},
    "causal-wide-window": {"causal": True, "window": 200, "local_heads": 2},  # the band spans 3 tiles
}


@pytest.mark.skipif(not ON_CUDA, reason="FlexAttention trains on CUDA only (its CPU forward: tests/test_flex.py)")
@pytest.mark.parametrize("compiled", [False, True], ids=["flex", "flex-compiled"])
@pytest.mark.parametrize("variant", list(FLEX_VARIANTS))
def test_flex_matches_float64_with_gradients(variant, compiled):
    """impl="flex" (the FlexAttention kernel; compiled: inside the compiled fast path) in fp32
    on the GPU: outputs, assignments and every gradient equal the same layer's in float64 on the
    CPU (the fast path there: FlexAttention has no CPU backward), sequences of 2-3 tiles, at two
    shapes (compiled, the second reuses the first's graphs: dynamic shapes)."""
    torch.manual_seed(12)
    m = ClusterAttention(64, 4, 4, impl="flex", dense_max_len=0, compile=compiled, **FLEX_VARIANTS[variant])
    m = m.to(DEVICE)
    m64 = copy.deepcopy(m).to("cpu", torch.float64)
    m64.impl, m64.compile = "fast", False
    for B, N, seed in ((3, 300, 13), (2, 270, 17)):
        m.zero_grad(set_to_none=True)
        m64.zero_grad(set_to_none=True)
        x, kpm = padded_batch(B, N, 64, seed=seed)
        (out, assign, grads), (out64, assign64, grads64) = steps_against_float64(m, m64, x, kpm, seed + 1)
        valid = ~kpm.cpu()
        assert torch.equal(assign.cpu(), assign64), (B, N)
        torch.testing.assert_close(out.double().cpu()[valid], out64[valid], atol=1e-4, rtol=1e-4)
        assert_gradients_close(m, grads, grads64)


@pytest.mark.skipif(not ON_CUDA, reason="FlexAttention trains on CUDA only (its CPU forward: tests/test_flex.py)")
@pytest.mark.parametrize("variant", list(FLEX_VARIANTS))
def test_flex_in_bf16_equals_the_fast_path(variant):
    """bf16, as training runs: impl="flex" against impl="fast" on the same weights and batch,
    outputs and input gradients within the bf16 tolerance."""
    torch.manual_seed(15)
    fast = ClusterAttention(64, 4, 4, dense_max_len=0, **FLEX_VARIANTS[variant]).to(DEVICE, torch.bfloat16)
    flexed = copy.deepcopy(fast)
    flexed.impl = "flex"
    x, kpm = padded_batch(3, 300, 64, seed=16)
    results = []
    for m in (fast, flexed):
        xx = x.to(torch.bfloat16).requires_grad_(True)
        out, info = m(xx, kpm)
        (out.float().pow(2).sum() + info.clustering_loss + info.sorting_loss).backward()
        results.append((out.float().detach(), info.assignments, xx.grad.float()))
    (out_f, a_f, g_f), (out, a, g) = results
    tol = HALF_TOL[torch.bfloat16]
    assert torch.equal(a, a_f)
    torch.testing.assert_close(out, out_f, rtol=0, atol=tol * out_f.abs().max().item())
    torch.testing.assert_close(g, g_f, rtol=0, atol=tol * g_f.abs().max().item())


def _pairs(task, n, src_len, tgt_len, seed, padded):
    """A fairseq sample of N random pairs on DEVICE; PADDED: the last source 5 tokens shorter
    (left-padded, as fairseq's collater pads sources)."""
    from fairseq_helpers import toy_batch

    src, src_lengths, prev = toy_batch(task, n, src_len, tgt_len, seed)
    if padded:
        src[-1, :5] = task.source_dictionary.pad()
        src_lengths[-1] -= 5
    target = torch.cat([prev[:, 1:], prev[:, :1]], dim=1)  # the next tokens, </s> last
    net_input = {"src_tokens": src, "src_lengths": src_lengths, "prev_output_tokens": prev}
    sample = {"id": torch.arange(n), "nsentences": n, "ntokens": target.numel(), "target": target}
    sample["net_input"] = {k: v.to(DEVICE) for k, v in net_input.items()}
    sample["target"] = target.to(DEVICE)
    return sample


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs are CUDA's (the CPU compiles what compile=True does)")
def test_fairseq_model_trains_and_validates_as_cuda_graphs_across_shapes(toy_bin):
    """clusterformer_iwslt with --cluster-compile-mode reduce-overhead as fairseq trains it:
    training steps (criterion, backward) on batches of changing shapes, with and without padding,
    a shape met again (its recorded graphs replayed), and validation in between (no_grad, eval):
    losses and every gradient equal the eager model's within fp32 tolerance (1e-4 of the largest
    gradient), step after step."""
    from fairseq_helpers import CLUSTER_CRITERION, build_toy_model

    flags = [*CLUSTER_CRITERION, "--dropout", "0", "--attention-dropout", "0", "--relu-dropout", "0"]
    task, eager, args = build_toy_model(toy_bin, flags)
    _, graphs, _ = build_toy_model(toy_bin, [*flags, "--cluster-compile", "--cluster-compile-mode", "reduce-overhead"])
    graphs.load_state_dict(eager.state_dict())
    criterion = task.build_criterion(args)
    eager, graphs = eager.to(DEVICE), graphs.to(DEVICE)
    # (sentences, source length, target length, padded): above the dense path's 64 tokens, so the
    # layers run their blocks; the first shape three times (warm-up, recording, replay) and again
    # after the others.
    shapes = [(4, 80, 75, True)] * 3 + [(3, 96, 90, False), (5, 70, 72, True), (4, 80, 75, True)]
    for step, (n, src_len, tgt_len, padded) in enumerate(shapes):
        sample = _pairs(task, n, src_len, tgt_len, seed=step, padded=padded)
        results = []
        for model in (eager, graphs):
            model.train()
            model.zero_grad(set_to_none=True)
            loss, _, log = criterion(model, sample)
            loss.backward()
            grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
            model.eval()
            with torch.no_grad():
                valid_loss = criterion(model, _pairs(task, 2, 66, 70, seed=100 + step, padded=True))[0]
            results.append((loss.detach(), float(log["clustering_loss"]), grads, valid_loss))
        (loss_e, cl_e, grads_e, valid_e), (loss_g, cl_g, grads_g, valid_g) = results
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-4, atol=0)
        torch.testing.assert_close(valid_g, valid_e, rtol=1e-4, atol=0)
        assert abs(cl_g - cl_e) <= 1e-4 * abs(cl_e), step
        assert len(grads_g) == len(grads_e), step
        scale = max(g.abs().max().item() for g in grads_e)  # of the whole gradient: some are ~0
        for g_g, g_e in zip(grads_g, grads_e):
            torch.testing.assert_close(g_g, g_e, rtol=0, atol=1e-4 * scale)
