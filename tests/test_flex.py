"""ClusterAttention(impl="flex"): every head's block attention as one FlexAttention call.

On the CPU FlexAttention runs forward only (torch has no CPU backward for it), eagerly, as dense
masked attention that ignores the BlockMask's tile list; flex.py applies the tile list to the
mask there, so these tests see what the CUDA kernel computes: the float64 reference's outputs,
tile lists that hold exactly the tiles the rule needs (a missing tile changes the result), the
incremental decoder's outputs, one compiled graph. Gradients and the compiled CUDA kernel:
tests/test_cuda.py.
"""

import pytest
import torch
import torch._dynamo
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

from fairseq_clusterformer.modules import cluster_attention, flex
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention
from reference_cluster_attention import reference_forward

VARIANTS = {  # dense_max_len=0: every length takes the block path this file tests
    "encoder": {},
    "encoder-auto-k": {"num_clusters": "auto"},
    "encoder-own-block": {"previous_block": False},
    "causal": {"causal": True, "window": 37},
    "causal-wide-window": {"causal": True, "window": 200},  # the band spans three key tiles
}


def make(variant, local_heads, impl="flex", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    kw = {"num_clusters": 3, **VARIANTS[variant]}
    return ClusterAttention(32, 4, local_heads=local_heads, dense_max_len=0, impl=impl, **kw).to(dtype).eval()


def padded(B, N, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 32, generator=g, dtype=torch.float64).to(dtype)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, : N // 3] = True  # left padding
    pad[2, N - 45 :] = True  # right padding
    return x, pad


@pytest.mark.parametrize(
    "variant, local_heads, N",
    # two tiles with 0, half and all heads local; three tiles with the two groups of heads
    [(v, h, 130) for v in VARIANTS for h in (0, 2, 4)] + [(v, 2, 300) for v in VARIANTS],
)
def test_matches_float64_reference(variant, local_heads, N):
    m = make(variant, local_heads, seed=N)
    x, pad = padded(3, N, seed=local_heads)
    with torch.no_grad():
        out, info = m(x, pad)
    ref, _, ref_cl, ref_sl, ref_assign = reference_forward(m, x, pad)
    assert torch.equal(info.assignments, ref_assign)
    torch.testing.assert_close(out[~pad], ref[~pad], atol=1e-9, rtol=1e-9)
    assert (out[pad] == m.out_proj.bias).all()  # zero before out_proj at padding
    assert abs(info.clustering_loss.item() - ref_cl) < 1e-9 and abs(info.sorting_loss.item() - ref_sl) < 1e-9


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_padding", [False, True], ids=["no-padding", "padding"])
def test_equals_the_fast_path_in_float32(variant, with_padding):
    """Also without padding, where the encoder's block size is one host-known int (cached tile
    lists, a mask without length test)."""
    fast = make(variant, 2, impl="fast", dtype=torch.float32)
    m = make(variant, 2, dtype=torch.float32)
    m.load_state_dict(fast.state_dict())
    x, pad = padded(3, 260, seed=5, dtype=torch.float32)
    pad = pad if with_padding else None
    with torch.no_grad():
        (out_f, info_f), (out, info) = fast(x, pad), m(x, pad)
    assert torch.equal(info.assignments, info_f.assignments)
    torch.testing.assert_close(out, out_f, atol=1e-5, rtol=1e-5)


def _dense_tiles(visible, n_tiles):
    """B x N x N visibility -> B x nq x nq: the tiles that hold a visible pair."""
    B, N, _ = visible.shape
    padded_visible = torch.zeros(B, n_tiles * flex.TILE, n_tiles * flex.TILE, dtype=torch.bool)
    padded_visible[:, :N, :N] = visible
    return padded_visible.view(B, n_tiles, flex.TILE, n_tiles, flex.TILE).any(4).any(2)


def _listed_tiles(kv_num, kv_idx):
    n_tiles = kv_idx.size(-1)
    listed = torch.zeros(kv_idx.size(0), n_tiles, n_tiles, dtype=torch.bool)
    for b in range(kv_idx.size(0)):  # a loop is fine here: tests only
        for i in range(n_tiles):
            listed[b, i, kv_idx[b, 0, i, : kv_num[b, 0, i]].long()] = True
    return listed


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("N", [1, 127, 128, 129, 300, 700])
def test_encoder_tiles_are_exactly_the_tiles_the_blocks_need(paired, N):
    g = torch.Generator().manual_seed(N)
    lengths = torch.randint(1, N + 1, (5,), generator=g)
    lengths[0] = N
    k_b = torch.randint(1, 40, (5,), generator=g)
    w_b = -(-lengths // k_b)  # ceil(L_b / k_b)
    r = torch.arange(N)
    q_block, kv_block = r[None, :, None] // w_b[:, None, None], r[None, None, :] // w_b[:, None, None]
    visible = (kv_block == q_block) | (paired & (kv_block == q_block - 1))
    visible &= r[None, None, :] < lengths[:, None, None]  # B x N x N: the mask_mod's rule
    kv_num, kv_idx = flex.encoder_tiles(N, lengths, w_b, paired)
    n_tiles = -(-N // flex.TILE)
    assert torch.equal(_listed_tiles(kv_num, kv_idx), _dense_tiles(visible, n_tiles))


@pytest.mark.parametrize("window", [1, 37, 128, 129, 300])
@pytest.mark.parametrize("N", [1, 128, 129, 700])
def test_band_tiles_are_exactly_the_tiles_the_band_needs(window, N):
    r = torch.arange(N)
    distance = r[:, None] - r[None, :]  # query - key
    visible = ((distance >= 0) & (distance < window))[None]
    kv_num, kv_idx = flex.band_tiles(N, window, "cpu")
    assert torch.equal(_listed_tiles(kv_num, kv_idx), _dense_tiles(visible, -(-N // flex.TILE)))


def test_a_missing_tile_changes_the_result(monkeypatch):
    """The CPU obeys the tile list as the CUDA kernel does: drop each query tile's first key tile
    and the output moves away from the reference (so the tests above check the lists too)."""
    m = make("causal-wide-window", 0)
    x, pad = padded(3, 300, seed=1)
    with torch.no_grad():
        good, _ = m(x, pad)
        band_tiles = flex.band_tiles

        def dropping_first(N, window, device):
            count, idx = band_tiles(N, window, device)
            return (count - 1).clamp(min=1), torch.cat([idx[..., 1:], idx[..., -1:]], -1)

        monkeypatch.setattr(flex, "band_tiles", dropping_first)
        monkeypatch.setattr(flex, "_CACHE", type(flex._CACHE)())  # the lists are cached by sizes
        bad, _ = m(x, pad)
    assert (bad - good)[~pad].abs().max() > 1e-3


@pytest.mark.parametrize("local_heads", [0, 2])
def test_decoder_decodes_incrementally_as_its_forward(local_heads):
    m = make("causal", local_heads, dtype=torch.float32)
    B, N = 2, 150
    x = torch.randn(B, N, 32, generator=torch.Generator().manual_seed(local_heads))
    state, outs = None, []
    with torch.no_grad():
        for t in range(N):
            y, state = m.step(x[:, t : t + 1], state)
            outs.append(y)
        full, _ = m(x)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_flex_refuses_what_it_cannot_do(monkeypatch):
    with pytest.raises(ValueError, match="impl='flex' has no attention dropout"):
        ClusterAttention(32, 4, 3, impl="flex", dropout=0.1)
    m = ClusterAttention(32, 4, 3, impl="flex", dense_max_len=0)
    x = torch.randn(2, 140, 32)
    with pytest.raises(RuntimeError, match="impl='flex' computes gradients on CUDA only"):
        m(x)  # parameters require gradients: a training step
    with torch.no_grad():
        m(x)  # inference runs
    monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", "inductor")
    m.compile = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="impl='flex' with compile runs on CUDA only"):
        m(x)
    with pytest.raises(ValueError, match="impl must be one of"):
        ClusterAttention(32, 4, 3, impl="flash")
    monkeypatch.setattr(flex, "AVAILABLE", False)  # as under a torch without FlexAttention
    with pytest.raises(ValueError, match="impl='flex' needs torch's FlexAttention"):
        ClusterAttention(32, 4, 3, impl="flex")
    ClusterAttention(32, 4, 3)  # the other implementations do not need it


@pytest.mark.parametrize("variant", ["encoder", "causal"])
def test_compiled_flex_path_is_one_graph_per_case(variant, monkeypatch):
    """compile=True traces the flex path whole (aot_eager: dynamo's graphs run by eager kernels)
    and gives the eager outputs; two padding cases and short (one tile) and long sequences."""
    monkeypatch.setattr(cluster_attention, "_COMPILED", {})
    monkeypatch.setattr(cluster_attention, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = make(variant, 2, dtype=torch.float32)
    compiled = make(variant, 2, dtype=torch.float32)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile = True
    try:
        for N in (100, 300):
            for with_padding in (True, False):
                x, pad = padded(3, N, seed=N, dtype=torch.float32)
                pad = pad if with_padding else None
                with torch.no_grad():
                    (out_e, info_e), (out_c, info_c) = eager(x, pad), compiled(x, pad)
                assert torch.equal(info_c.assignments, info_e.assignments)
                torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        assert not torch._dynamo.utils.counters["graph_break"]
        fn = ClusterAttention._fast_causal if compiled.causal else ClusterAttention._fast_encoder
        # per padding case: one graph for one query tile (N <= 128), one for several
        assert 2 <= len(_debug_get_cache_entry_list(fn.__code__)) <= 4
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("router", ["lsh", "routing"])
def test_routed_decoders_take_the_flex_path_too(router):
    """The LSH and routing baselines' decoders (a router replaces the centroids; the rest of the
    causal layer is ClusterFormer's) give the fast path's outputs with impl="flex"."""
    from fairseq_clusterformer.baselines.routers import LSHRouter, RoutingRouter

    torch.manual_seed(4)
    make_router = (lambda: LSHRouter(32, 4)) if router == "lsh" else (lambda: RoutingRouter(32, 4))
    fast = ClusterAttention(32, 4, 4, causal=True, window=37, local_heads=2, dense_max_len=0, router=make_router())
    flexed = ClusterAttention(
        32, 4, 4, causal=True, window=37, local_heads=2, dense_max_len=0, router=make_router(), impl="flex"
    )
    flexed.load_state_dict(fast.state_dict())
    fast.eval(), flexed.eval()
    x, pad = padded(3, 200, seed=6, dtype=torch.float32)
    with torch.no_grad():
        (out_f, info_f), (out, info) = fast(x, pad), flexed(x, pad)
    assert torch.equal(info.assignments, info_f.assignments)
    torch.testing.assert_close(out, out_f, atol=1e-5, rtol=1e-5)


def _count_tile_builds(monkeypatch):
    monkeypatch.setattr(flex, "_CACHE", type(flex._CACHE)())
    monkeypatch.setattr(flex, "_BATCH", None)
    built = []
    for name in ("band_tiles", "encoder_tiles"):
        real = getattr(flex, name)
        monkeypatch.setattr(flex, name, lambda *a, real=real, name=name: built.append(name) or real(*a))
    return built


def test_tile_lists_are_built_once_per_size_and_once_per_padded_batch(monkeypatch):
    """Eager calls reuse the tile lists that depend on the sizes alone (the decoder's band, the
    encoder's blocks without padding, fixed or automatic k), with each call's own mask_mod; a
    padded encoder batch builds its lists once for all its layers (one mask tensor). Results
    stay the reference's (tests above)."""
    built = _count_tile_builds(monkeypatch)
    decoder, encoder = make("causal", 2, dtype=torch.float32), make("encoder", 2, dtype=torch.float32)
    auto = make("encoder-auto-k", 0, dtype=torch.float32)
    with torch.no_grad():
        for seed in range(3):
            x, pad = padded(3, 200, seed=seed, dtype=torch.float32)
            decoder(x, pad), encoder(x), auto(x)
            encoder(x, pad), encoder(x, pad)  # two layers of one batch
        decoder(padded(3, 260, seed=0, dtype=torch.float32)[0])  # a new size: new lists
    assert built.count("band_tiles") == 2
    assert built.count("encoder_tiles") == 2 + 3  # once per k without padding, once per padded batch


@pytest.mark.parametrize("variant", ["encoder", "encoder-auto-k"])
def test_a_padded_batch_reuses_its_tile_lists_only_while_its_mask_is_unchanged(monkeypatch, variant):
    """Another mask with the same contents, and the same mask changed in place, build new lists;
    after the change the output is that of a fresh mask (no stale tiles)."""
    built = _count_tile_builds(monkeypatch)
    m = make(variant, 2)
    x, pad = padded(3, 300, seed=4)
    with torch.no_grad():
        m(x, pad.clone()), m(x, pad)
        assert built.count("encoder_tiles") == 2
        pad[0, 160:] = True  # in place: sequence 0 loses 140 words (a block size and a tile change)
        out, _ = m(x, pad)
        assert built.count("encoder_tiles") == 3
        monkeypatch.setattr(flex, "_BATCH", None)
        fresh, _ = m(x, pad.clone())
    ref = reference_forward(m, x, pad)[0]
    assert torch.equal(out, fresh)
    torch.testing.assert_close(out[~pad], ref[~pad], atol=1e-9, rtol=1e-9)


def test_the_package_imports_under_a_torch_without_flex_attention():
    """setup.py accepts torch >= 2.1, older than FlexAttention: the module must import there and
    only impl="flex" refuse (a subprocess in which torch's flex_attention module cannot import)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch.nn.attention.flex_attention'] = None\n"
        "from fairseq_clusterformer.modules import ClusterAttention, flex\n"
        "assert not flex.AVAILABLE\n"
        "ClusterAttention(32, 4, 3)\n"
        "try:\n    ClusterAttention(32, 4, 3, impl='flex')\nexcept ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "impl='flex' needs torch's FlexAttention" in out.stdout


def test_permute_backward_is_the_inverse_gather():
    """flex.Permute (the orders' gathers, with a gather for a backward) against autograd's gather."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    order = torch.stack([torch.randperm(7, generator=g) for _ in range(6)]).view(2, 3, 7)
    undo = torch.empty_like(order).scatter_(-1, order, torch.arange(7).expand(2, 3, 7))
    index, inverse = order[..., None].expand(2, 3, 7, 4), undo[..., None].expand(2, 3, 7, 4)
    assert torch.autograd.gradcheck(lambda t: flex.Permute.apply(t, 2, index, inverse), (t,))
    w = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=g)
    (grad,) = torch.autograd.grad((flex.Permute.apply(t, 2, index, inverse) * w).sum(), t)
    (expected,) = torch.autograd.grad((t.gather(2, index) * w).sum(), t)
    assert torch.equal(grad, expected)


def _dense_flex(q, k, v, block_mask):
    """A CPU stand-in for the FlexAttention kernel with a backward: the mask_mod (the tile list
    included, as the CPU path applies it) as a dense mask for sdpa. Rows that see no key (padding
    queries past every key; the kernel gives them 0, and they are discarded) see every key here."""
    from torch.nn.attention.flex_attention import create_mask

    mask = create_mask(block_mask.mask_mod, q.size(0), q.size(1), q.size(2), k.size(2), device=q.device)
    mask = mask | ~mask.any(-1, keepdim=True)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("variant", ["encoder", "encoder-auto-k", "causal", "causal-wide-window"])
@pytest.mark.parametrize("with_padding", [False, True], ids=["no-padding", "padding"])
def test_gradients_around_the_kernel_equal_the_fast_paths(variant, with_padding, monkeypatch):
    """Everything of impl="flex" but the kernel, differentiated on the CPU: the kernel replaced by
    dense attention under the same mask_mod and tile lists, the gradients of the input and of every
    parameter (through the output and both losses) equal impl="fast"'s in float64."""
    monkeypatch.setattr(flex, "_flex", _dense_flex)
    monkeypatch.setattr(flex, "check_device", lambda attn, x: None)
    fast = make(variant, 2, impl="fast")
    m = make(variant, 2)
    m.load_state_dict(fast.state_dict())
    x, pad = padded(3, 200, seed=7)
    pad = pad if with_padding else None
    w = torch.randn(3, 200, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = []
    for layer in (fast, m):
        xi = x.clone().requires_grad_(True)
        out, info = layer(xi, pad)
        real = 1.0 if pad is None else (~pad)[..., None].double()
        ((out * w * real).sum() + info.clustering_loss + info.sorting_loss).backward()
        grads.append([xi.grad] + [p.grad for _, p in sorted(layer.named_parameters())])
    for (name, _), g_fast, g in zip([("x", None)] + sorted(m.named_parameters()), *grads):
        torch.testing.assert_close(g, g_fast, atol=1e-9, rtol=1e-9, msg=lambda s, n=name: f"{n}: {s}")
