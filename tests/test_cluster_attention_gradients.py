"""Gradients of ClusterAttention with respect to its inputs *and every parameter*.

The module computes its backward pass by hand in five places (_Clustering, _GatherProject,
FlashBlockAttention, PairedViews, ScatterProject in kernels.py), so gradcheck
covers each of them, in both similarities, with padding (including a fully padded sequence and
empty blocks), with and without the previous block, with k = "auto" and carried centroids, and
in the causal variant, with block attention on torch's CPU flash kernel (chunked backward) and
on F.scaled_dot_product_attention.
"""

import pytest
import torch
from torch.func import functional_call

from fairseq_clusterformer.modules import incremental, kernels
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention
from fairseq_clusterformer.modules.incremental import assign_per_word, assign_step

CASES = {
    "cosine": dict(k=3),
    "dot": dict(k=3, similarity="dot"),
    "no-previous-block": dict(k=3, previous_block=False),
    "auto": dict(k="auto", max_clusters=4),
    "one-cluster": dict(k=1),
    "causal": dict(k=2, causal=True, window=2),
    "causal-dot": dict(k=3, causal=True, window=3, similarity="dot"),
    "causal-one-block": dict(k=2, causal=True, window=8),
    # Local heads: as many as clustered ones, in one call per group (the CPU's default) and both
    # groups in one block-attention call (CUDA's), and an unequal split (one call per group).
    "local-heads-half": dict(k=3, local_heads=1),
    "local-heads-half-one-call": dict(k=3, local_heads=1, one_call=True),
    "local-heads-1-of-4": dict(k=3, local_heads=1, heads=4),
    "causal-local-heads-half": dict(k=2, causal=True, window=2, local_heads=1),
    "causal-local-heads-half-one-call": dict(k=2, causal=True, window=2, local_heads=1, one_call=True),
    "causal-local-heads-1-of-4": dict(k=2, causal=True, window=3, local_heads=1, heads=4),
}


KERNELS = ["flash", "sdpa"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Block attention on torch's CPU flash kernel (its backward in several chunks) or on sdpa."""
    if request.param == "flash":
        if kernels.FLASH_CPU_OPS is None:
            pytest.skip("this torch has no CPU flash-attention op with masks")  # pragma: no cover
        monkeypatch.setattr(kernels, "_BACKWARD_CHUNK_BYTES", 1)  # as many chunks as allowed
    monkeypatch.setattr(kernels, "USE_FLASH_CPU_KERNEL", request.param == "flash")
    return request.param


def _padding(B, N):
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, :2] = True  # left padding
    kpm[2, N - 3 :] = True  # right padding
    kpm[3, :] = True  # a sequence that is all padding
    return kpm


@pytest.mark.parametrize("pad", [True, False], ids=["padding", "no-padding"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gradcheck_inputs_and_parameters(case, pad, kernel, monkeypatch):
    kw = dict(CASES[case])
    k, heads = kw.pop("k"), kw.pop("heads", 2)
    monkeypatch.setattr(kernels, "HEAD_GROUPS_IN_ONE_CALL_ON_CPU", kw.pop("one_call", False))
    torch.manual_seed(0)
    m = ClusterAttention(8, heads, k, **kw).double().eval()
    B, N = 4, 7
    x = torch.randn(B, N, 8, dtype=torch.float64, requires_grad=True)
    kpm = _padding(B, N) if pad else None
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in m.named_parameters())
    keep = (~kpm)[:, :, None].double() if pad else 1.0

    def f(x, *ps):
        out, info = functional_call(m, dict(zip(names, ps)), (x, kpm))
        outs = (out * keep, info.clustering_loss, info.sorting_loss)
        return outs if info.centroids is None else outs + (info.centroids,)

    # fast_mode checks random projections of the Jacobian: the same failures, far fewer passes.
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_gradcheck_carried_centroids_with_padding():
    torch.manual_seed(1)
    m = ClusterAttention(8, 2, 3, learned_centroids=False).double()
    x = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    kpm = _padding(4, 6)

    def f(x, c):
        out, info = m(x, kpm, centroids=c)
        return out * (~kpm)[:, :, None], info.clustering_loss, info.sorting_loss, info.centroids

    assert torch.autograd.gradcheck(f, (x, c), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_all_padding_mask_equals_no_mask():
    """An all-False key_padding_mask takes the no-padding path: same outputs and gradients."""
    torch.manual_seed(2)
    m = ClusterAttention(16, 2, 3)
    x = torch.randn(3, 10, 16)
    results = []
    for kpm in (None, torch.zeros(3, 10, dtype=torch.bool)):
        xx = x.clone().requires_grad_(True)
        m.zero_grad()
        out, info = m(xx, kpm)
        (out.pow(2).sum() + info.clustering_loss + info.sorting_loss).backward()
        results.append([out.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_causal_assignment_matches_elementwise_definition_on_ties(dtype):
    """The decoder's word->cluster assignment takes a float64 matmul shortcut away from near-ties;
    it must equal the elementwise definition everywhere, exact ties and zero words included."""
    torch.manual_seed(3)
    m = ClusterAttention(64, 4, 5, causal=True, window=4).to(dtype)
    with torch.no_grad():
        m.centroids[1] = m.centroids[0]  # exact ties
        m.centroids[3] = m.centroids[2] * (1 + 1e-7)  # near-ties
    x = torch.randn(4, 200, 64).to(dtype)
    x[0, :5] = 0
    cw = m.centroid_proj(m.centroids.to(dtype)).detach()
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # half precision: scored in float32
    definition = (x.to(acc).unsqueeze(-2) * cw.to(acc)).sum(-1).argmax(-1)
    assert torch.equal(assign_per_word(m, x), definition)
    one_at_a_time = torch.stack([assign_per_word(m, x[:, t]) for t in range(x.size(1))], 1)
    assert torch.equal(one_at_a_time, definition)
    assert torch.equal(torch.stack([assign_step(m, x[:, t]) for t in range(x.size(1))], 1), definition)


def test_causal_assignment_scores_near_ties_in_bounded_chunks(monkeypatch):
    """The near-tie rows are scored a few at a time (the elementwise product of all N words is
    N x K x d: 15 GB for a batch of 20 x 8192 words in the decoder's bf16 benchmark), with the
    same result; and in bf16 most words are decided by the float64 screen (scores in float32)."""
    torch.manual_seed(4)
    m = ClusterAttention(64, 4, 5, causal=True, window=4).to(torch.bfloat16)
    with torch.no_grad():
        m.centroids[1] = m.centroids[0]
    x = torch.randn(3, 300, 64).to(torch.bfloat16)
    cw = m.centroid_proj(m.centroids.to(torch.bfloat16)).detach()
    definition = (x.float().unsqueeze(-2) * cw.float()).sum(-1).argmax(-1)
    scored_rows = []
    real = incremental._elementwise_scores

    def recording(words, cw):
        scored_rows.append(words.size(0))
        return real(words, cw)

    monkeypatch.setattr(incremental, "_elementwise_scores", recording)
    monkeypatch.setattr(incremental, "_NEAR_TIE_CHUNK_ELEMENTS", 7 * 5 * 64)
    assert torch.equal(assign_per_word(m, x), definition)
    assert len(scored_rows) > 1 and max(scored_rows) <= 7
    # centroids 0 and 1 tie exactly: the words whose best cluster is one of them are near-ties
    tied = int(((definition == 0) | (definition == 1)).sum())
    assert tied <= sum(scored_rows) < 0.5 * x.shape[0] * x.shape[1]


@pytest.mark.parametrize(
    "kw",
    [
        dict(k=4),
        dict(k=4, previous_block=False),
        dict(k="auto", max_clusters=8),
        dict(k=3, causal=True, window=5),
        dict(k=3, causal=True, window=5, local_heads=1),
    ],
    ids=["encoder", "no-previous-block", "auto", "causal", "causal-local-heads"],
)
def test_flash_kernel_and_sdpa_give_the_same_outputs_and_gradients(kw, monkeypatch):
    """The chunked flash backward (several chunks, chunk edges inside sequences) against sdpa's
    autograd, on every gradient, with left and right padding."""
    if kernels.FLASH_CPU_OPS is None:
        pytest.skip("this torch has no CPU flash-attention op with masks")  # pragma: no cover
    kw = dict(kw)
    k = kw.pop("k")
    torch.manual_seed(4)
    m = ClusterAttention(32, 4, k, **kw).double()
    x = torch.randn(5, 29, 32, dtype=torch.float64)
    kpm = torch.zeros(5, 29, dtype=torch.bool)
    kpm[1, :7] = kpm[2, 20:] = kpm[4, 1:] = True
    results = {}
    monkeypatch.setattr(kernels, "_BACKWARD_CHUNK_BYTES", 4096)  # 16 chunks, most mid-sequence
    for flash in (True, False):
        monkeypatch.setattr(kernels, "USE_FLASH_CPU_KERNEL", flash)
        xx = x.clone().requires_grad_(True)
        m.zero_grad()
        out, info = m(xx, kpm)
        (out.sin().sum() + info.clustering_loss + info.sorting_loss).backward()
        results[flash] = [out.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_attention_dropout_in_training(causal):
    """With dropout (sdpa's path), training outputs differ from evaluation, and gradients reach
    every projection and are finite."""
    torch.manual_seed(5)
    m = ClusterAttention(16, 2, 3, dropout=0.5, causal=causal, window=4)
    x = torch.randn(2, 12, 16, requires_grad=True)
    out, _ = m(x)
    out.pow(2).sum().backward()
    with torch.no_grad():
        evaluated, _ = m.eval()(x)
    assert not torch.allclose(out, evaluated)
    for p in (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.out_proj.weight):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()
