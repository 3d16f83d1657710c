"""The LSH and routing baselines as modules (torch only, no fairseq): the encoder subclasses of the
published packages (padding, batch composition, evaluation determinism, sizes from k), the
packages' own causal leak, and the decoders (ClusterAttention with a router): causality, the
reference path, exact incremental decoding with beam reordering, the k-means update."""

import math

import pytest
import torch

from fairseq_clusterformer.baselines import LSHRouter, RoutingRouter
from fairseq_clusterformer.modules.cluster_attention import ClusterAttention
from fairseq_clusterformer.modules.incremental import assign_per_word

lsh = pytest.importorskip("fairseq_clusterformer.baselines.lsh", reason="needs the baselines extra")
routing = pytest.importorskip("fairseq_clusterformer.baselines.routing", reason="needs the baselines extra")

D, H = 32, 4


def encoder(kind, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "lsh":
        return lsh.LSHEncoderAttention(D, H, n_buckets=4, n_hashes=kw.get("n_hashes", 2))
    return routing.RoutingEncoderAttention(D, H, num_clusters=3, local_heads=kw.get("local_heads", 2))


def embed_in_batch(sentence, length=14, side="left", seed=1):
    """The sentence (L x d) as row 1 of a batch of 3 padded to ``length``, with random padding content."""
    g = torch.Generator().manual_seed(seed)
    L = sentence.size(0)
    x = torch.randn(3, length, D, generator=g) * 3
    pad = torch.zeros(3, length, dtype=torch.bool)
    span = slice(length - L, length) if side == "left" else slice(0, L)
    x[1, span] = sentence
    pad[1] = True
    pad[1, span] = False
    pad[2, : length // 3] = True  # a batch mate of another length
    return x, pad, span


@pytest.mark.parametrize("kind", ["lsh", "routing"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_encoder_output_does_not_depend_on_padding_or_batch_mates(kind, mode):
    m = encoder(kind)
    m.train(mode == "train")
    sentence = torch.randn(10, D)
    outs = []
    for length, side, seed in ((14, "left", 1), (14, "left", 2), (23, "right", 3), (10, "alone", 0)):
        if side == "alone":
            x, pad, span = sentence[None], None, slice(0, 10)
            row = 0
        else:
            x, pad, span = embed_in_batch(sentence, length, side, seed)
            row = 1
        if kind == "lsh" and mode == "train":
            torch.manual_seed(5)  # training draws fresh rotations per call (the package's behaviour)
        out, _ = m(x, pad)
        outs.append(out[row, span])
        if pad is not None:
            assert torch.all(out[pad] == 0)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lsh", "routing"])
def test_the_packages_alone_depend_on_padding_content(kind):
    """What the subclasses fix: the published modules hash/route padding with the words."""
    torch.manual_seed(0)
    if kind == "lsh":
        from reformer_pytorch import LSHSelfAttention

        m = LSHSelfAttention(D, heads=H, bucket_size=4, n_hashes=2).eval()
    else:
        from routing_transformer.routing_transformer import SelfAttention

        m = SelfAttention(D, depth=1, max_seq_len=16, heads=H, local_attn_heads=2, window_size=4).eval()
    sentence = torch.randn(10, D)
    diffs = []
    for seed in (1, 2):
        x, pad, span = embed_in_batch(sentence, 16, "right", seed)
        torch.manual_seed(7)
        out = m(x, input_mask=~pad)
        out = out[0] if isinstance(out, tuple) else out
        diffs.append(out[1, span])
    assert (diffs[0] - diffs[1]).abs().max() > 1e-3


def test_lsh_evaluation_is_deterministic_and_leaves_the_global_rng_alone():
    m = encoder("lsh").eval()
    x = torch.randn(2, 12, D)
    state = torch.get_rng_state()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # no draw, no reseed
    m.train()
    c, _ = m(x)
    d, _ = m(x)
    assert not torch.equal(c, d)  # training draws rotations per call, as the package does
    # The fixed rotations are part of the state dict, so a loaded model hashes the same.
    fresh = encoder("lsh", seed=9).eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x)[0], a)


def test_buckets_and_windows_come_from_k_and_each_sentence_length():
    m = encoder("lsh")
    seen = []
    m.attention.lsh_attn.register_forward_hook(lambda mod, args, out: seen.append(mod.bucket_size))
    x, pad, _ = embed_in_batch(torch.randn(10, D), 14, "left")
    m(x, pad)  # lengths 14, 10 and 10 (row 2 has 14 - 4 real words)
    assert sorted(seen) == sorted({math.ceil(L / 4) for L in (14, 10)})
    r = encoder("routing")
    windows = []
    r.attention.global_attn.register_forward_hook(lambda mod, args, out: windows.append(mod.window_size))
    r(torch.randn(2, 11, D))
    assert windows == [math.ceil(11 / 3)] and r.attention.local_attn.window_size == 4
    # Not full attention in disguise: a word's routed/hashed output misses most of a long sentence.
    # With one head, one hash round and 4 buckets of 15, word 0 sees 2 chunks: 30 of the 60 words.
    long = torch.randn(1, 60, D, requires_grad=True)
    lsh.LSHEncoderAttention(D, 1, n_buckets=4, n_hashes=1).eval()(long)[0][0, 0].sum().backward()
    assert (long.grad[0].abs().sum(-1) == 0).sum() >= 30


def test_packages_causal_modes_leak_the_future():
    """Kept to show why the decoders do not use the packages: later words change earlier outputs."""
    from reformer_pytorch import LSHSelfAttention
    from routing_transformer.routing_transformer import SelfAttention

    torch.manual_seed(0)
    x = torch.randn(2, 32, D)
    y = x.clone()
    y[:, 20:] = torch.randn(2, 12, D)
    for m in (
        LSHSelfAttention(D, heads=H, bucket_size=4, n_hashes=2, causal=True).eval(),
        SelfAttention(D, depth=1, max_seq_len=32, heads=H, local_attn_heads=0, window_size=8, causal=True).eval(),
    ):
        outs = []
        for inp in (x, y):
            torch.manual_seed(3)  # the same LSH rotations for both calls
            out = m(inp)
            outs.append(out[0] if isinstance(out, tuple) else out)
        leak = (outs[0][:, :20] - outs[1][:, :20]).abs().max()
        assert leak > 1e-3, (type(m).__name__, leak)


# ---------------------------------------------------------------------------------------------
# decoders: ClusterAttention(causal=True, router=...)


def decoder(kind, local_heads=0, window=3, seed=0, impl="fast"):
    torch.manual_seed(seed)
    router = LSHRouter(D, 4) if kind == "lsh" else RoutingRouter(D, 4)
    return ClusterAttention(D, H, 4, causal=True, window=window, local_heads=local_heads, router=router, impl=impl)


@pytest.mark.parametrize("kind", ["lsh", "routing"])
@pytest.mark.parametrize("local_heads", [0, 2])
def test_router_decoder_is_causal_and_matches_the_reference_path(kind, local_heads):
    m = decoder(kind, local_heads).train()
    x = torch.randn(3, 17, D, dtype=torch.float64, requires_grad=True)
    m = m.double()
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[1, 12:] = True
    out, info = m(x, pad)
    assert (info.assignments[~pad] >= 0).all() and (info.assignments[pad] == -1).all()
    assert len(set(info.assignments[~pad].tolist())) > 1  # the router really splits the words
    m.impl = "reference"
    ref, ref_info = m(x, pad)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(out)
    extra = 0 if info.commitment_loss is None else info.commitment_loss
    g = torch.autograd.grad((out * w).sum() + extra, x)[0]
    ref_extra = 0 if ref_info.commitment_loss is None else ref_info.commitment_loss
    g_ref = torch.autograd.grad((ref * w).sum() + ref_extra, x)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-9)
    # Causality (float32, as the model runs): d out[t] / d x[s] is exactly zero for s > t, and
    # words after t leave outputs up to t equal to float rounding (a later word can move earlier
    # keys to another block of the sorted layout, reordering sums).
    m = m.float().eval()
    m.impl = "fast"
    x32 = x.detach().float()
    out32, _ = m(x32, pad)
    for t in (0, 5, 11):
        y = x32.clone()
        y[:, t + 1 :] = torch.randn_like(y[:, t + 1 :]) * 10
        torch.testing.assert_close(m(y, pad)[0][:, : t + 1], out32[:, : t + 1], atol=1e-6, rtol=0)
    xg = x32.clone().requires_grad_(True)
    m(xg, pad)[0][:, 7].sum().backward()
    assert xg.grad[:, 8:].abs().max() == 0 and xg.grad[:, :8].abs().max() > 0
    if kind == "routing":
        assert info.commitment_loss is not None and ref_info.commitment_loss is not None
        torch.testing.assert_close(info.commitment_loss, ref_info.commitment_loss)
    else:
        assert info.commitment_loss is None and info.clustering_loss is None


@pytest.mark.parametrize("kind", ["lsh", "routing"])
@pytest.mark.parametrize("mode", ["ring", "auto"])
def test_router_decoder_steps_exactly_with_beam_reordering(kind, mode):
    m = decoder(kind, local_heads=2, window=3).eval()
    x = torch.randn(3, 20, D)
    state = m.init_state(3, mode=mode)
    order = torch.tensor([2, 0, 0])
    steps = []
    for t in range(20):
        if t == 9:
            state = m.reorder_state(state, order)
            x = torch.cat([x[order][:, :9], x[:, 9:]], 1)
            steps = [s[order] for s in steps]
        y, state = m.step(x[:, t : t + 1], state)
        steps.append(y)
    full, _ = m(x)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lsh", "routing"])
def test_router_decoder_does_not_depend_on_batch_mates_or_padding(kind):
    m = decoder(kind, local_heads=1).eval()
    sentence = torch.randn(1, 9, D)
    alone, _ = m(sentence)
    x = torch.randn(3, 14, D) * 3
    x[1, :9] = sentence[0]
    pad = torch.zeros(3, 14, dtype=torch.bool)
    pad[1, 9:] = True
    out, _ = m(x, pad)
    torch.testing.assert_close(out[1, :9], alone[0], atol=1e-5, rtol=1e-5)


def test_lsh_router_is_argmax_over_plus_minus_rotations():
    r = LSHRouter(D, 6)
    m = ClusterAttention(D, H, 6, causal=True, router=r)
    x = torch.randn(50, D)
    rotated = x @ r.rotations
    expected = torch.cat([rotated, -rotated], -1).argmax(-1)
    assert torch.equal(assign_per_word(m, x), expected)
    with pytest.raises(ValueError, match="even number"):
        LSHRouter(D, 3)


def test_routing_means_move_once_per_optimizer_step_from_real_words_only():
    m = decoder("routing").train()
    r = m.router
    before = r.means.clone()
    x = torch.randn(2, 10, D)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True

    def kmeans_step(inputs, means):
        """One k-means step on the real words: each mean -> the direction of its words' unit vectors."""
        words = torch.cat([torch.nn.functional.normalize(i[~pad], dim=-1) for i in inputs])
        assign = (words @ means[0].t()).argmax(-1)
        sums = torch.zeros_like(means[0]).index_add_(0, assign, words)
        return torch.nn.functional.normalize(sums, dim=-1)[None]

    r.set_num_updates(0)
    y = x.clone()
    y[1, 6:] = torch.randn(4, D) * 10  # other padding content
    la = m(x, pad)[1].commitment_loss
    lb = m(y, pad)[1].commitment_loss  # two micro-batches of one update
    torch.testing.assert_close(la, lb)  # padding changes neither the loss ...
    assert torch.equal(r.means, before)  # ... and nothing moves within a step
    r.set_num_updates(1)
    first = r.means.clone()
    torch.testing.assert_close(first, kmeans_step([x, y], before))  # ... nor the statistics
    assert bool(r.initted)
    r.set_num_updates(1)  # fairseq calls it before every micro-batch: applied once
    assert torch.equal(r.means, first)
    m(x, pad)
    r.set_num_updates(2)
    torch.testing.assert_close(r.means, 0.999 * first + 0.001 * kmeans_step([x], first))  # then an EMA
    second = r.means.clone()
    m.eval()
    m(x, pad)
    r.set_num_updates(3)
    assert torch.equal(r.means, second)  # evaluation does not train the means


def test_routing_encoder_means_update_from_real_words_and_commitment_is_returned():
    m = encoder("routing").train()
    km = m.attention.global_attn.kmeans
    before = km.means.clone()
    x, pad, _ = embed_in_batch(torch.randn(10, D), 14, "left")
    km.set_num_updates(0)
    _, loss = m(x, pad)
    assert loss is not None and loss.requires_grad and 0 < loss.item() < 4
    assert int(km._pending_count.sum()) == 2 * (~pad).sum() * km.means.size(0)  # queries and keys, per head
    km.set_num_updates(1)
    assert not torch.equal(km.means, before) and bool(km.initted)
    torch.testing.assert_close(km.means.norm(dim=-1), torch.ones(km.means.shape[:2]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["lsh", "routing"])
def test_encoders_run_in_half_precision(kind, dtype):
    """fp16/bf16 training (fairseq's --fp16 / --bf16): forward and backward finite, in the input's
    dtype. (local-attention's rotary embedding upcasts to float32; the routing adapter runs the
    local heads in float32 so the package does not fail on mixed dtypes.)"""
    m = encoder(kind).to(dtype)
    x = torch.randn(2, 12, D).to(dtype).requires_grad_(True)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    for train in (True, False):
        m.train(train)
        out, loss = m(x, pad)
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
        if train:
            total = out.float().sum() + (loss.float() if loss is not None else 0.0)
            (grad,) = torch.autograd.grad(total, x)
            assert torch.isfinite(grad.float()).all() and grad[~pad].abs().sum() > 0
