"""Incremental decoding with the "auto" cache (whole prefix first, ring buffers once the prefix
reaches K x window positions) equals the full forward and the ring-buffer cache."""

import pytest
import torch

from fairseq_clusterformer.modules.cluster_attention import ClusterAttention
from fairseq_clusterformer.modules.incremental import assign_per_word, assign_step


@pytest.mark.parametrize("local_heads", [0, 1, 4], ids=["clustered", "1-local-head", "all-local"])
@pytest.mark.parametrize("window,k", [(1, 3), (3, 3), (4, 1), (16, 3)])
def test_auto_cache_equals_full_forward_and_ring_cache(window, k, local_heads):
    m = ClusterAttention(32, 4, k, causal=True, window=window, local_heads=local_heads).eval()
    g = torch.Generator().manual_seed(window * 10 + k)
    B, N = 4, 30
    x = torch.randn(B, N, 32, generator=g)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, :3] = True  # left padding, as fairseq's generator never makes; still exact
    pad[2, 10:12] = True
    reorders = {5: torch.tensor([2, 2, 0, 1]), 9: torch.tensor([3, 1, 1, 0]), 20: torch.tensor([0, 0, 3, 2])}
    results = {}
    for mode in ("ring", "auto"):
        state, outs, hist, hpad = m.init_state(B, mode=mode), [], x[:, :0], pad[:, :0]
        kinds = []
        for t in range(N):
            if t in reorders:
                state = ClusterAttention.reorder_state(state, reorders[t])
                hist, hpad, outs = hist[reorders[t]], hpad[reorders[t]], [o[reorders[t]] for o in outs]
            y, state = m.step(x[:, t : t + 1], state, key_padding_mask=pad[:, t])
            hist, hpad = torch.cat([hist, x[:, t : t + 1]], 1), torch.cat([hpad, pad[:, t : t + 1]], 1)
            outs.append(y)
            kinds.append("prefix" if "prefix_key" in state else "ring")
        full, _ = m(hist, hpad)
        out = torch.cat(outs, 1)
        torch.testing.assert_close(out[~hpad], full[~hpad], atol=1e-5, rtol=1e-5)
        results[mode] = (out, kinds)
    torch.testing.assert_close(results["auto"][0], results["ring"][0], atol=1e-5, rtol=1e-5)
    kinds = results["auto"][1]
    switch = k * window  # the prefix is converted once it holds K x window positions
    assert kinds == ["prefix"] * min(switch - 1, N) + ["ring"] * max(N - switch + 1, 0)
    assert set(results["ring"][1]) == {"ring"}


def test_auto_cache_stays_small_while_short():
    m = ClusterAttention(32, 4, 3, causal=True, window=64)
    state = m.init_state(2, mode="auto")
    for _ in range(5):
        _, state = m.step(torch.randn(2, 1, 32), state)
    assert state["prefix_key"].shape == (2, 5, 4, 8)  # 5 positions, not 3 x 64 slots


def test_bad_cache_mode_is_named():
    with pytest.raises(ValueError, match="mode must be"):
        ClusterAttention(32, 4, 3, causal=True).init_state(2, mode="prefix")


def test_step_directions_follow_every_parameter_change():
    """The decoding step's cached C W_C is recomputed after an in-place update, a loaded state
    dict and a replaced parameter: the assignments always equal assign_per_word's."""
    torch.manual_seed(0)
    m = ClusterAttention(16, 2, 4, causal=True, window=4).eval()
    x = torch.randn(64, 16)

    def check():
        assert torch.equal(assign_step(m, x), assign_per_word(m, x))

    check()
    with torch.no_grad():
        m.centroids.mul_(-1.0)  # in place: every assignment moves
    check()
    other = ClusterAttention(16, 2, 4, causal=True, window=4)
    m.load_state_dict(other.state_dict())
    check()
    m.centroid_proj.weight = torch.nn.Parameter(torch.randn(16, 16))
    check()
    m.double()
    check_x = x.double()
    assert torch.equal(assign_step(m, check_x), assign_per_word(m, check_x))


@pytest.mark.parametrize("mode", ["ring", "auto"])
def test_a_new_decoding_run_follows_updates_made_through_data(mode):
    """fairseq's optimizers update parameters through ``.data``, which changes no version
    counter: a model that decodes, trains a step that way, and decodes again (--eval-bleu) must
    decode with its new parameters (the per-parameter-state caches are dropped by init_state)."""
    torch.manual_seed(0)
    m = ClusterAttention(16, 2, 3, causal=True, window=4, local_heads=1).eval()
    x = torch.randn(3, 12, 16)

    def decode():
        state, outs = m.init_state(3, mode=mode), []
        for t in range(x.size(1)):
            y, state = m.step(x[:, t : t + 1], state)
            outs.append(y)
        return torch.cat(outs, 1)

    with torch.no_grad():
        torch.testing.assert_close(decode(), m(x)[0], atol=1e-5, rtol=1e-5)
        for p in (m.centroids, m.centroid_proj.weight, m.q_proj.weight, m.k_proj.bias, m.v_proj.weight):
            p.data.add_(torch.randn_like(p))  # as fairseq's Adam: no version counter moves
        torch.testing.assert_close(decode(), m(x)[0], atol=1e-5, rtol=1e-5)
