"""The attention module against its float64 reference, and the properties issue #3 lists."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fairseq_clusterformer.modules import kernels
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention, parse_num_clusters
from reference_cluster_attention import reference_forward

MODULES = Path(__file__).resolve().parents[1] / "fairseq_clusterformer" / "modules"
FAST_PATH_FILES = tuple(str(MODULES / f) for f in ("cluster_attention.py", "kernels.py"))


def make(d=32, heads=4, k=3, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return ClusterAttention(d, heads, k, **kw).to(dtype).eval()


def random_padding(B, N, seed):
    """Each row gets a random length, padded on the left or the right."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        L = int(torch.randint(1, N + 1, (1,), generator=g))
        if b % 2:
            kpm[b, : N - L] = True  # left padding
        else:
            kpm[b, L:] = True  # right padding
    kpm[0] = False  # one full row
    return kpm


SHAPES = [  # B, N, heads, k
    (2, 7, 2, 3),  # N not divisible by k
    (1, 1, 1, 3),  # N = 1, batch 1, N < k
    (3, 2, 4, 5),  # N < k
    (2, 12, 16, 4),  # 16 heads, divisible
    (4, 17, 8, 3),
    (2, 23, 4, "auto"),  # k = ceil(sqrt(L_b)) per sequence
    (1, 9, 2, 1),
]


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_matches_float64_reference(causal, shape, dtype, tol):
    B, N, H, k = shape
    if causal and k == "auto":
        k = 4
    m = make(d=32, heads=H, k=k, dtype=dtype, causal=causal, window=3, seed=N)
    x = torch.randn(B, N, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(N)).to(dtype)
    kpm = random_padding(B, N, seed=N)
    out, info = m(x, kpm)
    ref, ref_centroids, ref_cl, ref_sl, ref_assign = reference_forward(m, x, kpm)
    valid = ~kpm
    assert torch.equal(info.assignments, ref_assign)
    torch.testing.assert_close(out.double()[valid], ref[valid], atol=tol, rtol=tol)
    assert abs(info.clustering_loss.item() - ref_cl) < tol
    assert abs(info.sorting_loss.item() - ref_sl) < tol
    if not causal:
        for b in range(B):
            kb = ref_centroids[b].size(0)
            torch.testing.assert_close(info.centroids[b, :kb].double(), ref_centroids[b], atol=tol, rtol=tol)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("one_call", [True, False], ids=["as-on-cuda", "cpu"])
@pytest.mark.parametrize("local_heads", [1, 2, 4])
@pytest.mark.parametrize("window", [1, 3, 40])
def test_causal_local_heads_match_reference(local_heads, window, one_call, monkeypatch):
    """Local heads see the last `window` real words of any cluster; the others their cluster."""
    monkeypatch.setattr(kernels, "HEAD_GROUPS_IN_ONE_CALL_ON_CPU", one_call)
    B, N = 4, 17
    m = make(d=32, heads=4, k=3, causal=True, window=window, local_heads=local_heads, seed=window)
    x = torch.randn(B, N, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(window))
    kpm = random_padding(B, N, seed=window)
    out, info = m(x, kpm)
    ref, _, ref_cl, ref_sl, ref_assign = reference_forward(m, x, kpm)
    valid = ~kpm
    assert torch.equal(info.assignments, ref_assign)
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-9, rtol=1e-9)
    assert abs(info.clustering_loss.item() - ref_cl) < 1e-9 and abs(info.sorting_loss.item() - ref_sl) < 1e-9
    if local_heads < 4 and window > 1:  # the local heads change the output (window 1: both see only the word)
        m.local_heads = 0
        assert (reference_forward(m, x, kpm)[0][valid] - ref[valid]).abs().max() > 1e-3


class _CountAttentionCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the attention kernels (scaled_dot_product_attention's forward and backward ops)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += "scaled_dot_product" in func.overloadpacket.__name__
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("one_call", [True, False], ids=["as-on-cuda", "cpu"])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize(("local_heads", "calls"), [(0, 1), (2, 1), (4, 1), (1, 2), (3, 2)])
def test_local_and_clustered_heads_share_one_attention_call_when_equally_many(
    causal, local_heads, calls, one_call, monkeypatch
):
    """On the block path both kinds of head go into one attention call (forward and backward
    each) when they are equally many, as on CUDA; other splits, and equal ones on the CPU
    (kernels.HEAD_GROUPS_IN_ONE_CALL_ON_CPU), take one call per kind of head. Padding, so that
    the local heads' order needs a sort too."""
    monkeypatch.setattr(kernels, "HEAD_GROUPS_IN_ONE_CALL_ON_CPU", one_call)
    if not one_call and local_heads == 2:
        calls = 2
    kw = dict(causal=True, window=8) if causal else {}
    m = make(d=32, heads=4, k=3, local_heads=local_heads, dense_max_len=0, **kw).train()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1, 33:] = True
    for flash in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "USE_FLASH_CPU_KERNEL", flash)
            with _CountAttentionCalls() as counter:
                out, info = m(x, kpm)
                (out.square().sum() + info.clustering_loss + info.sorting_loss).backward()
        assert counter.calls == 2 * calls, (flash, counter.calls)


@pytest.mark.parametrize("one_call", [True, False], ids=["as-on-cuda", "cpu"])
@pytest.mark.parametrize("local_heads", [1, 2, 4])
@pytest.mark.parametrize("dense_max_len", [0, 64], ids=["blocks", "dense-if-short"])
@pytest.mark.parametrize("k", [3, "auto"])
def test_encoder_local_heads_match_reference(local_heads, dense_max_len, k, one_call, monkeypatch):
    """Encoder local heads: the blocks of the words in their own order (counted from the first
    real word, whatever the padding); the other heads the blocks of the cluster-sorted words."""
    monkeypatch.setattr(kernels, "HEAD_GROUPS_IN_ONE_CALL_ON_CPU", one_call)
    B, N = 4, 19
    m = make(d=32, heads=4, k=k, local_heads=local_heads, dense_max_len=dense_max_len, seed=local_heads)
    x = torch.randn(B, N, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(local_heads))
    kpm = random_padding(B, N, seed=local_heads)
    out, info = m(x, kpm)
    ref, _, ref_cl, ref_sl, ref_assign = reference_forward(m, x, kpm)
    valid = ~kpm
    assert torch.equal(info.assignments, ref_assign)
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-9, rtol=1e-9)
    if local_heads < 4:  # the clustered heads still see the clusters, the local ones the order
        m.local_heads = 0
        assert (reference_forward(m, x, kpm)[0][valid] - ref[valid]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("local_heads", [0, 2])
@pytest.mark.parametrize("k", [3, "auto"])
def test_batches_without_padding_match_reference(causal, local_heads, k):
    """A batch without padding takes the layer's own shortcuts (block sizes known on the host,
    the local heads' words left in their order, unsorted); with ``assume_padding`` and a mask
    that holds no padding, the padded path runs instead. Both equal the float64 reference, in
    values and in gradients."""
    if causal and k == "auto":
        pytest.skip("the causal variant needs an integer k")
    B, N = 3, 20
    m = make(d=32, heads=4, k=k, causal=causal, window=6, local_heads=local_heads, dense_max_len=0, seed=7)
    x = torch.randn(B, N, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    no_pad = torch.zeros(B, N, dtype=torch.bool)
    ref, _, ref_cl, ref_sl, ref_assign = reference_forward(m, x, no_pad)
    grads = []
    for kpm, assume in ((None, False), (no_pad, False), (no_pad, True)):
        xg = x.clone().requires_grad_()
        out, info = m(xg, kpm, assume_padding=assume)
        assert torch.equal(info.assignments, ref_assign)
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
        assert info.clustering_loss.item() == pytest.approx(float(ref_cl), abs=1e-12, rel=1e-9)
        assert info.sorting_loss.item() == pytest.approx(float(ref_sl), abs=1e-12, rel=1e-9)
        (out.square().sum() + info.clustering_loss + info.sorting_loss).backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[2], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(grads[1], grads[2], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_losses_survive_batches_beyond_the_float16_range(dtype):
    """66,000 words in one half-precision batch: a float16 sum of their similarities (or their
    count) overflows, which made the clustering loss read 0 and pass no gradient. The losses are
    summed in float32 (clustering.loss_dtype) and equal the float32 layer's within half-precision
    rounding, gradients included."""
    torch.manual_seed(0)
    m32 = ClusterAttention(8, 1, 200).float()  # blocks of 165 words: the attention stays cheap
    m16 = copy.deepcopy(m32).to(dtype)
    x = torch.randn(2, 33_000, 8)
    pad = torch.zeros(2, 33_000, dtype=torch.bool)
    pad[1, -5:] = True
    for kpm in (None, pad):
        results = []
        for m, xx in ((m32, x), (m16, x.to(dtype))):
            xx = xx.clone().requires_grad_()
            _, info = m(xx, kpm)
            assert info.clustering_loss.dtype == info.sorting_loss.dtype == torch.float32
            (info.clustering_loss + info.sorting_loss).backward()
            results.append((info.clustering_loss.item(), info.sorting_loss.item(), xx.grad.float()))
        (cl32, sl32, g32), (cl16, sl16, g16) = results
        assert cl16 == pytest.approx(cl32, rel=2e-2) and cl32 < -0.05
        assert sl16 == pytest.approx(sl32, rel=5e-2, abs=2e-3)
        assert torch.isfinite(g16).all()
        assert (g16 - g32).norm() < 0.1 * g32.norm()


def test_without_previous_block_matches_reference():
    m = make(k=3, previous_block=False)
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    kpm = random_padding(3, 11, seed=3)
    out, _ = m(x, kpm)
    ref = reference_forward(m, x, kpm)[0]
    torch.testing.assert_close(out[~kpm], ref[~kpm], atol=1e-9, rtol=1e-9)


def test_carried_centroids_match_reference():
    """Layer 2 takes layer 1's updated centroids instead of its own parameter."""
    first = make(k=3)
    second = make(k=3, learned_centroids=False, seed=1)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    kpm = random_padding(2, 9, seed=9)
    _, info = first(x, kpm)
    out, _ = second(x, kpm, centroids=info.centroids)
    ref = reference_forward(second, x, kpm, centroids=info.centroids)[0]
    torch.testing.assert_close(out[~kpm], ref[~kpm], atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="no learned centroids"):
        second(x, kpm)


def _fairseq_mha_like(m):
    from fairseq.modules import MultiheadAttention

    mha = MultiheadAttention(m.embed_dim, m.num_heads, self_attention=True).to(m.q_proj.weight.dtype).eval()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(mha, name).load_state_dict(getattr(m, name).state_dict())
    return mha


def test_one_cluster_equals_standard_multihead_attention():
    m = make(d=32, heads=4, k=1)
    mha = _fairseq_mha_like(m)
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    kpm = random_padding(3, 10, seed=1)
    out, _ = m(x, kpm)
    ref, _ = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out[~kpm], ref.transpose(0, 1)[~kpm], atol=1e-10, rtol=1e-10)


def test_one_cluster_causal_with_full_window_equals_causal_attention():
    N = 10
    m = make(d=32, heads=4, k=1, causal=True, window=N)
    mha = _fairseq_mha_like(m)
    x = torch.randn(2, N, 32, dtype=torch.float64)
    future = torch.triu(torch.full((N, N), float("-inf"), dtype=torch.float64), 1)
    out, _ = m(x)
    ref, _ = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn_mask=future, need_weights=False)
    torch.testing.assert_close(out, ref.transpose(0, 1), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant", ["encoder", "encoder-auto", "causal"])
def test_batch_composition_invariance(variant):
    """A sentence's output does not depend on its batch mates or on left/right padding."""
    kw = dict(causal=True, window=4) if variant == "causal" else {}
    k = "auto" if variant == "encoder-auto" else 3
    m = make(d=32, heads=4, k=k, dtype=torch.float32, **kw)
    g = torch.Generator().manual_seed(5)
    sentence = torch.randn(1, 9, 32, generator=g)
    alone, _ = m(sentence)
    for pad_left, pad_right, mates in [(0, 7, 2), (7, 0, 3), (3, 4, 1), (0, 0, 4)]:
        N = 9 + pad_left + pad_right
        batch = torch.randn(mates + 1, N, 32, generator=g)
        kpm = random_padding(mates + 1, N, seed=N + mates)
        row = mates // 2
        batch[row] = torch.randn(N, 32, generator=g)  # garbage in the padding
        batch[row, pad_left : pad_left + 9] = sentence[0]
        kpm[row] = True
        kpm[row, pad_left : pad_left + 9] = False
        out, _ = m(batch, kpm)
        torch.testing.assert_close(out[row, pad_left : pad_left + 9], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("local_heads", [0, 2])
def test_causal_later_tokens_never_reach_earlier_positions(local_heads):
    m = make(d=32, heads=4, k=3, dtype=torch.float32, causal=True, window=4, local_heads=local_heads)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 20, 32, generator=g)
    out, info = m(x)
    for t in (0, 5, 13, 18):
        y = x.clone()
        y[:, t + 1 :] = torch.randn(2, 20 - t - 1, 32, generator=g) * 10
        out2, info2 = m(y)
        # Equal to float rounding (a later word can move earlier keys to another block of the
        # sorted layout, reordering sums); the zero gradient below is the exact statement.
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], atol=1e-6, rtol=0)
        assert torch.equal(info2.assignments[:, : t + 1], info.assignments[:, : t + 1])
    # Gradient view: d out[t] / d x[s] is exactly zero for every s > t.
    xg = x.detach().clone().requires_grad_(True)
    m(xg)[0][:, 7].sum().backward()
    assert xg.grad[:, 8:].abs().max() == 0
    assert xg.grad[:, :8].abs().max() > 0


@pytest.mark.parametrize("local_heads", [0, 1])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_incremental_decoding_with_beam_reordering_equals_full_forward(window, local_heads):
    m = make(d=32, heads=4, k=3, dtype=torch.float32, causal=True, window=window, local_heads=local_heads)
    g = torch.Generator().manual_seed(window)
    B, N = 4, 15
    x = torch.randn(B, N, 32, generator=g)
    reorders = {5: torch.tensor([2, 2, 0, 1]), 9: torch.tensor([3, 1, 1, 0])}
    state, outs, history = None, [], x[:, :0]
    for t in range(N):
        if t in reorders:
            state = ClusterAttention.reorder_state(state, reorders[t])
            history = history[reorders[t]]
            outs = [o[reorders[t]] for o in outs]
        y, state = m.step(x[:, t : t + 1], state)
        history = torch.cat([history, x[:, t : t + 1]], 1)
        outs.append(y)
        sizes = {name: tuple(v.shape) for name, v in state.items()}
        assert sizes["cluster_kv"] == (B, 3, 2, window, 4 - local_heads, 8)  # O(window) per cluster, whatever t
        assert sizes["local_kv"] == (B, 2, window, local_heads, 8)
    full, _ = m(history)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("local_heads", [0, 1])
def test_incremental_padding_step_leaves_state_unchanged(local_heads):
    m = make(d=16, heads=2, k=2, dtype=torch.float32, causal=True, window=3, local_heads=local_heads)
    x = torch.randn(2, 6, 16)
    kpm = torch.tensor([[False, False, True, False, False, False], [False] * 6])  # a padding step in row 0
    state, outs = None, []
    for t in range(6):
        before = None if state is None else {n: v.clone() for n, v in state.items()}
        y, state = m.step(x[:, t : t + 1], state, key_padding_mask=kpm[:, t])
        outs.append(y)
        if t == 2:
            for name in state:
                assert torch.equal(state[name][0], before[name][0]), name
    # The stepped outputs equal the full forward with the same padding, at every real word; the
    # padding step outputs out_proj of zero (its bias), as the full forward does.
    full, _ = m(x, kpm)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[0, 2], m.out_proj.bias)


def test_gradcheck_encoder_inputs_and_centroids():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)
    m2 = make(d=8, heads=2, k=2, learned_centroids=False, seed=1)
    kpm = torch.tensor([[False] * 5, [True, False, False, False, False]])

    def f(x, c):
        out, info = m2(x, kpm, centroids=c)
        return out * (~kpm)[:, :, None], info.clustering_loss, info.sorting_loss, info.centroids

    assert torch.autograd.gradcheck(f, (x, c), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("local_heads", [0, 1])
def test_gradcheck_causal(local_heads):
    m = make(d=8, heads=2, k=2, causal=True, window=2, local_heads=local_heads)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)

    def f(x):
        out, info = m(x)
        return out, info.clustering_loss, info.sorting_loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("used", ["clustering", "sorting", "centroids", "clustering+centroids", "output"])
def test_fused_clustering_backward_when_some_outputs_are_unused(used):
    """The clustering Function's unused outputs get no gradient tensor (None, not zeros): every
    subset of its outputs that a loss may use gives the reference's gradients."""
    x0 = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, :2] = True
    grads = {}
    for impl in ("reference", "fast"):
        m = make(d=8, heads=2, k=3, impl=impl)
        x = x0.clone().requires_grad_()
        out, info = m(x, kpm)
        parts = {
            "clustering": info.clustering_loss,
            "sorting": info.sorting_loss,
            "centroids": (info.centroids**2).sum(),
            "output": (out * (~kpm)[:, :, None]).sum(),
        }
        sum(parts[name] for name in used.split("+")).backward()
        grads[impl] = (x.grad, m.centroids.grad, m.centroid_proj.weight.grad)
    for fast, reference in zip(grads["fast"], grads["reference"]):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_fused_clustering_backward_at_words_of_zero_norm_is_autograds_of_the_reference(causal, padding):
    """Where |x_j| |c'_a_j| < eps the cosine's clamp holds the denominator (gradcheck cannot probe
    a kink): the fused backward's gradients of both losses, with respect to the input and the
    learned centroids, are autograd's through the reference functions, a word of norm 0 and one
    of norm 1e-9 included."""
    x0 = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0[0, 2] = 0.0
    x0[1, 4] = 1e-9
    kpm = None
    if padding:
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[2, :3] = True
    grads = {}
    for impl in ("reference", "fast"):
        m = make(d=8, heads=2, k=3, causal=causal, window=2, impl=impl)
        x = x0.clone().requires_grad_()
        _, info = m(x, kpm)
        (1.3 * info.clustering_loss + 0.7 * info.sorting_loss).backward()
        assert torch.isfinite(x.grad).all()
        grads[impl] = (info.clustering_loss.detach(), info.sorting_loss.detach(), x.grad, m.centroids.grad)
    for fast, reference in zip(grads["fast"], grads["reference"]):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_gradients_reach_what_they_should(causal):
    m = make(d=16, heads=2, k=3, causal=causal, window=4)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    out, info = m(x)
    # The two losses reach the centroids, W_C and the word states...
    (info.clustering_loss + info.sorting_loss).backward(retain_graph=True)
    assert m.centroids.grad.abs().sum() > 0
    assert m.centroid_proj.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    for p in (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight):
        assert p.grad is None  # ...and nothing else
    # ...and the task loss reaches Q, K and V through the un-sort.
    m.zero_grad()
    out.pow(2).sum().backward()
    for p in (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.out_proj.weight):
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_low_precision_masks_are_finite(dtype, causal):
    m = make(d=32, heads=4, k=3, dtype=dtype, causal=causal, window=4)
    x = torch.randn(3, 10, 32).to(dtype) * 4
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, 1:] = True  # all padding but one token
    kpm[2, :] = True  # a fully padded row
    out, info = m(x, kpm)
    assert torch.isfinite(out).all()
    assert torch.isfinite(info.clustering_loss) and torch.isfinite(info.sorting_loss)
    if not causal:
        assert torch.isfinite(info.centroids).all()
    # fp32 agreement on the real tokens, at low-precision tolerance.
    ref, _ = copy.deepcopy(m).float()(x.float(), kpm)
    torch.testing.assert_close(out.float()[~kpm], ref[~kpm], atol=0.1, rtol=0.1)


def _count_lines(fn):
    counts = {"n": 0}

    def tracer(frame, event, arg):
        if frame.f_code.co_filename in FAST_PATH_FILES:
            if event == "line":
                counts["n"] += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return counts["n"]


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_forward_has_no_python_loops_over_batch_heads_clusters_or_blocks(causal, monkeypatch):
    """The number of Python lines executed does not grow with batch, heads, clusters or blocks,
    and block attention is one scaled_dot_product_attention call."""

    def run(B, N, H, k):
        m = make(d=32, heads=H, k=k, dtype=torch.float32, causal=causal, window=2)
        x = torch.randn(B, N, 32)
        kpm = random_padding(B, N, seed=B + N)
        m(x, kpm)  # the first call of a size makes its size-only tensors (constants.py)
        return _count_lines(lambda: m(x, kpm))

    base = run(2, 8, 2, 2)
    assert run(16, 8, 2, 2) == base  # batch
    assert run(2, 8, 16, 2) == base  # heads
    assert run(2, 64, 2, 2) == base  # blocks (more of them as N grows)
    assert run(2, 8, 2, 8) == base  # clusters
    for flash in (True, False):  # torch's CPU flash kernel, or F.scaled_dot_product_attention
        monkeypatch.setattr(kernels, "USE_FLASH_CPU_KERNEL", flash)
        calls = []

        def counting(fn, calls=calls):
            return lambda *a, **k: calls.append(1) or fn(*a, **k)

        monkeypatch.setattr(
            torch.nn.functional,
            "scaled_dot_product_attention",
            counting(torch.nn.functional.scaled_dot_product_attention),
        )
        if kernels.FLASH_CPU_OPS is not None:
            fwd, bwd = kernels.FLASH_CPU_OPS
            monkeypatch.setattr(kernels, "FLASH_CPU_OPS", (counting(fwd), bwd))
        make(d=32, heads=2, k=5, dtype=torch.float32, causal=causal)(torch.randn(3, 40, 32))
        assert len(calls) == 1
        monkeypatch.undo()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_clusters=0), "num_clusters must be >= 1"),
        (dict(num_clusters=-2), "num_clusters must be >= 1"),
        (dict(num_clusters="three"), "positive integer or 'auto'"),
        (dict(num_clusters=300, max_clusters=256), "larger than max_clusters"),
        (dict(num_clusters="auto", causal=True), "causal decoder"),
        (dict(num_clusters=3, causal=True, window=0), "window must be >= 1"),
        (dict(num_clusters=3, causal=True, local_heads=5), "local_heads must be an integer in"),
        (dict(num_clusters=3, causal=True, local_heads=-1), "local_heads must be an integer in"),
        (dict(num_clusters=3, similarity="l2"), "similarity must be one of"),
        (dict(num_clusters=3, embed_dim=30, num_heads=4), "divisible"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    args = dict(embed_dim=32, num_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ClusterAttention(**args)


def test_bad_inputs_are_named():
    m = make(d=32, heads=4, k=3)
    with pytest.raises(ValueError, match="expected x of shape"):
        m(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        m(torch.randn(2, 5, 32, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.bool))
    for shape in [(0, 5, 32), (2, 0, 32)]:
        for module in (m, make(d=32, heads=4, k=3, causal=True, window=4)):
            with pytest.raises(ValueError, match="at least one sequence of at least one word"):
                module(torch.randn(*shape, dtype=torch.float64))
    assert parse_num_clusters("auto") == "auto" and parse_num_clusters("4") == 4


def test_the_attention_package_works_without_fairseq(tmp_path):
    """ClusterAttention in a plain PyTorch project: fairseq absent, forward, backward, decoding."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules['fairseq'] = None  # fairseq absent: any import of it fails
        import torch
        from fairseq_clusterformer.modules import ClusterAttention
        enc = ClusterAttention(16, 2, 3)
        out, info = enc(torch.randn(2, 7, 16, requires_grad=True))
        (out.sum() + info.clustering_loss).backward()
        dec = ClusterAttention(16, 2, 3, causal=True, window=4, local_heads=1)
        y, state = dec.step(torch.randn(2, 1, 16))
        loaded = sorted(k for k in sys.modules if k == 'fairseq' or k.startswith('fairseq.'))
        print('OK', tuple(out.shape), tuple(y.shape), loaded, sys.modules['fairseq'])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "OK (2, 7, 16) (2, 1, 16) ['fairseq'] None" in proc.stdout


def test_additive_mask_is_the_conversion_attention_makes_of_a_bool_mask(monkeypatch):
    """kernels.additive_mask gives scaled_dot_product_attention the 0 / -inf mask it would make of
    the bool one itself (the same outputs, bit for bit), in the query's dtype, with its two
    values made once per dtype and device (here first under inference mode, as in generation)."""
    from fairseq_clusterformer.modules import constants, kernels

    monkeypatch.setattr(constants, "_CONSTANTS", {})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    allowed = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    allowed[..., 0] = True  # every query sees a key
    with torch.inference_mode():
        kernels.additive_mask(allowed, torch.float16)
    mask = kernels.additive_mask(allowed, q.dtype)
    assert mask.dtype == q.dtype and mask.shape == allowed.shape
    assert torch.equal(mask == 0, allowed) and torch.isneginf(mask[~allowed]).all()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)
    key = ("mask values", torch.float16, q.device)
    values = constants._CONSTANTS[key]
    half = kernels.additive_mask(allowed, torch.float16)
    assert half.dtype == torch.float16 and constants._CONSTANTS[key] is values
    assert torch.equal(half == 0, allowed)
