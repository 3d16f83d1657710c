"""The fast path (custom kernels) against the plain-autograd reference path, values and gradients."""

import copy

import pytest
import torch

from fairseq_clusterformer.modules import ClusterAttention

CASES = {
    "encoder-cosine": dict(k=3),
    "encoder-dot": dict(k=3, similarity="dot"),
    "encoder-auto": dict(k="auto", max_clusters=8),
    "encoder-no-previous-block": dict(k=4, previous_block=False),
    "encoder-k-above-length": dict(k=7),
    "encoder-local-heads": dict(k=3, local_heads=2),
    "encoder-all-local": dict(k=4, local_heads=4),
    "encoder-auto-local-heads": dict(k="auto", max_clusters=8, local_heads=1),
    "causal": dict(k=3, causal=True, window=4),
    "causal-dot": dict(k=2, causal=True, window=3, similarity="dot"),
    "causal-local-heads": dict(k=3, causal=True, window=5, local_heads=2),
    "causal-all-local": dict(k=3, causal=True, window=2, local_heads=4),
    "causal-window-above-length": dict(k=3, causal=True, window=32, local_heads=2),
}


def _padding(B, N):
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, :4] = True  # left padding
    kpm[2, N - 6 :] = True  # right padding
    kpm[3, 1:] = True  # one word
    return kpm


def _run(module, x, kpm, centroids=None):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    out, info = module(x, kpm, centroids=centroids)
    loss = (out * torch.linspace(-1, 1, out.size(-1), dtype=out.dtype)).sin().sum()
    loss = loss + 0.7 * info.clustering_loss + 1.3 * info.sorting_loss
    if info.centroids is not None:
        loss = loss + info.centroids.cos().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.detach(), info, x.grad, grads


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("dense_max_len", [0, 64], ids=["blocks", "dense-if-short"])
def test_fast_path_equals_reference_path(case, padded, dense_max_len):
    kw = dict(CASES[case])
    k = kw.pop("k")
    torch.manual_seed(11)
    fast = ClusterAttention(32, 4, k, dense_max_len=dense_max_len, **kw).double()
    reference = copy.deepcopy(fast)
    reference.impl = "reference"
    x = torch.randn(4, 23, 32, dtype=torch.float64)
    kpm = _padding(4, 23) if padded else None
    out_f, info_f, gx_f, g_f = _run(fast, x, kpm)
    out_r, info_r, gx_r, g_r = _run(reference, x, kpm)
    torch.testing.assert_close(out_f, out_r, atol=1e-10, rtol=1e-9)
    assert torch.equal(info_f.assignments, info_r.assignments)
    torch.testing.assert_close(info_f.clustering_loss, info_r.clustering_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(info_f.sorting_loss, info_r.sorting_loss, atol=1e-12, rtol=1e-10)
    if info_f.centroids is not None:
        torch.testing.assert_close(info_f.centroids, info_r.centroids, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-9, rtol=1e-8)
    assert g_f.keys() == g_r.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_r[name], atol=1e-9, rtol=1e-8, msg=name)
    if padded:  # nothing flows into padding words
        assert gx_f[kpm].abs().max() == 0


def test_reference_path_with_carried_centroids():
    torch.manual_seed(3)
    fast = ClusterAttention(32, 4, 3, learned_centroids=False).double()
    reference = copy.deepcopy(fast)
    reference.impl = "reference"
    x = torch.randn(4, 23, 32, dtype=torch.float64)
    carried = torch.randn(4, 3, 32, dtype=torch.float64, requires_grad=True)
    outs = []
    for module in (fast, reference):
        c = carried.detach().clone().requires_grad_(True)
        out, info, gx, _ = _run(module, x, _padding(4, 23), centroids=c)
        outs.append((out, gx, c.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="impl must be one of"):
        ClusterAttention(32, 4, 3, impl="triton")
