"""Property-based tests of ClusterAttention over random shapes, options and dtypes (hypothesis).

Only the module's public API is used. The strategies draw the batch, each sentence's length and
padding side, the number of clusters (k > N and "auto" included), heads, window and local heads,
the similarity, encoder or causal, and the dtype. The suite runs the derandomised "ci" profile
(tests/conftest.py); `pytest tests/test_properties.py --hypothesis-profile=thorough` runs many more
examples with fresh randomness.

Sizes are kept small (d <= 32, a batch of at most 3) so that lengths up to 300 stay cheap; the
float64 reference loops in Python, so the exactness property draws lengths up to 40.
"""

import math

import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from fairseq_clusterformer.modules.cluster_attention import ClusterAttention
from reference_cluster_attention import reference_forward

MAX_LEN = 300
REF_MAX_LEN = 40  # the reference is a per-query Python loop
LOW_PRECISION = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@st.composite
def options(draw, causal=None):
    """Constructor options of one ClusterAttention, and a seed for its weights."""
    causal = draw(st.booleans()) if causal is None else causal
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    kw = {
        "embed_dim": heads * head_dim,
        "num_heads": heads,
        "causal": causal,
        "similarity": draw(st.sampled_from(["cosine", "dot"])),
        # the fast path's two ways: the block layout (0) or a dense mask for short sequences
        "dense_max_len": draw(st.sampled_from([0, 8, 64])),
    }
    if causal:
        kw["num_clusters"] = draw(st.integers(1, 6))
        kw["window"] = draw(st.sampled_from([1, 2, 3, 5, 9, 64]))
        kw["local_heads"] = draw(st.integers(0, heads))
    else:
        kw["num_clusters"] = draw(st.one_of(st.just("auto"), st.integers(1, 12)))
        kw["previous_block"] = draw(st.booleans())
        if kw["num_clusters"] == "auto":
            kw["max_clusters"] = draw(st.sampled_from([2, 5, 256]))  # small: k_b gets clipped
    return kw, draw(st.integers(0, 2**31 - 1))


@st.composite
def batches(draw, max_len=MAX_LEN, max_batch=3):
    """Per-sentence lengths and padding sides; N is the longest plus some extra padding."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_batch))
    left = draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    extra = draw(st.integers(0, 3))
    return lengths, left, max(lengths) + extra, draw(st.integers(0, 2**31 - 1))


def describe(kw, lengths):
    """Events that `--hypothesis-show-statistics` counts, to see that the corners are drawn."""
    event(f"longest sentence {'> 100' if max(lengths) > 100 else '11-100' if max(lengths) > 10 else '<= 10'}")
    k = kw["num_clusters"]
    event("k = auto" if k == "auto" else "k > shortest sentence" if k > min(lengths) else "k <= shortest sentence")
    if len(lengths) > 1:
        event("batch with padding")


def build(kw, seed, dtype=torch.float64, carried=False):
    torch.manual_seed(seed)
    return ClusterAttention(**kw, learned_centroids=not carried).to(dtype).eval()


def make_input(lengths, left, N, d, seed, dtype=torch.float64, scale=1.0):
    """x (B x N x d, garbage in the padding too) and the key padding mask (True = pad)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    x = (torch.randn(B, N, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    pad = torch.ones(B, N, dtype=torch.bool)
    for b, (L, is_left) in enumerate(zip(lengths, left)):
        start = N - L if is_left else 0
        pad[b, start : start + L] = False
    return x, pad


def clusters_needed(kw, lengths):
    k = kw["num_clusters"]
    if k != "auto":
        return k
    return min(max(math.ceil(math.sqrt(L)) for L in lengths), kw.get("max_clusters", 256))


# --- the module equals the float64 reference --------------------------------------------------------
@given(options(), batches(max_len=REF_MAX_LEN), st.booleans())
def test_module_equals_float64_reference(opts, batch, carry_centroids):
    kw, wseed = opts
    lengths, left, N, xseed = batch
    carried = carry_centroids and not kw["causal"]
    m = build(kw, wseed, carried=carried)
    d = kw["embed_dim"]
    x, pad = make_input(lengths, left, N, d, xseed)
    centroids = None
    if carried:  # a previous layer's B x K x d centroids instead of the learned parameter
        g = torch.Generator().manual_seed(xseed + 1)
        centroids = torch.randn(
            len(lengths),
            clusters_needed(kw, lengths),
            d,
            generator=g,
            dtype=torch.float64,
        )
    note(f"options {kw}, lengths {lengths}, left {left}, N {N}, carried {carried}")
    describe(kw, lengths)
    with torch.no_grad():
        out, info = m(x, pad, centroids=centroids)
    ref, ref_centroids, ref_cl, ref_sl, ref_assign = reference_forward(m, x, pad, centroids=centroids)
    valid = ~pad
    assert torch.equal(info.assignments[valid], ref_assign[valid])
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-9, rtol=1e-7)
    assert abs(info.clustering_loss.item() - ref_cl) < 1e-9
    assert abs(info.sorting_loss.item() - ref_sl) < 1e-9
    if not kw["causal"]:
        for b, c in enumerate(ref_centroids):
            torch.testing.assert_close(info.centroids[b, : c.size(0)], c, atol=1e-9, rtol=1e-7)


# --- the fast path equals the plain-autograd reference path (impl="reference"), with gradients ------
@given(options(), batches(max_len=120), st.booleans())
def test_fast_path_equals_reference_path(opts, batch, carry_centroids):
    kw, wseed = opts
    lengths, left, N, xseed = batch
    carried = carry_centroids and not kw["causal"]
    fast = build(kw, wseed, carried=carried)
    slow = build(kw, wseed, carried=carried)
    slow.impl = "reference"
    d = kw["embed_dim"]
    x, pad = make_input(lengths, left, N, d, xseed)
    centroids = None
    if carried:
        g = torch.Generator().manual_seed(xseed + 1)
        centroids = torch.randn(len(lengths), clusters_needed(kw, lengths), d, generator=g, dtype=torch.float64)
    note(f"options {kw}, lengths {lengths}, left {left}, N {N}, carried {carried}")
    results = []
    for m in (fast, slow):
        xg = x.clone().requires_grad_(True)
        cg = None if centroids is None else centroids.clone().requires_grad_(True)
        out, info = m(xg, pad, centroids=cg)
        loss = (out * (~pad)[..., None]).sin().sum() + info.clustering_loss + info.sorting_loss
        inputs = [xg] + ([cg] if cg is not None else []) + list(m.parameters())
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results.append((out.detach(), info, grads))
    (out_f, info_f, grads_f), (out_r, info_r, grads_r) = results
    valid = ~pad
    assert torch.equal(info_f.assignments, info_r.assignments)
    torch.testing.assert_close(out_f[valid], out_r[valid], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(info_f.clustering_loss, info_r.clustering_loss, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(info_f.sorting_loss, info_r.sorting_loss, atol=1e-10, rtol=1e-8)
    for gf, gr in zip(grads_f, grads_r):
        if gf is None or gr is None:
            assert gf is None and gr is None
        else:
            torch.testing.assert_close(gf, gr, atol=1e-8, rtol=1e-6)


# --- a sentence's output does not depend on its batch or its padding --------------------------------
@given(options(), batches(), st.integers(0, 2))
def test_output_is_independent_of_batch_and_padding(opts, batch, which):
    kw, wseed = opts
    lengths, left, N, xseed = batch
    b = which % len(lengths)
    m = build(kw, wseed)
    x, pad = make_input(lengths, left, N, kw["embed_dim"], xseed)
    note(f"options {kw}, lengths {lengths}, left {left}, N {N}, sentence {b}")
    describe(kw, lengths)
    out, info = m(x, pad)
    real = ~pad[b]
    alone, alone_info = m(x[b : b + 1, real])  # the same sentence, alone and unpadded
    torch.testing.assert_close(out[b, real], alone[0], atol=1e-9, rtol=1e-7)
    assert torch.equal(info.assignments[b, real], alone_info.assignments[0])
    if not kw["causal"]:
        k_b = clusters_needed(kw, [lengths[b]])
        torch.testing.assert_close(info.centroids[b, :k_b], alone_info.centroids[0, :k_b], atol=1e-9, rtol=1e-7)


# --- causality: a later word never changes an earlier output ----------------------------------------
@given(
    options(causal=True),
    batches(),
    st.floats(0.0, 1.0),
    st.sampled_from(["float64", "float32"]),
)
def test_causal_later_words_never_change_earlier_outputs(opts, batch, cut, dtype_name):
    kw, wseed = opts
    lengths, left, N, xseed = batch
    dtype = getattr(torch, dtype_name)
    m = build(kw, wseed, dtype)
    x, pad = make_input(lengths, left, N, kw["embed_dim"], xseed, dtype)
    t = min(int(cut * N), N - 1)  # positions 0..t keep their words; t+1.. get new ones
    y = x.clone()
    g = torch.Generator().manual_seed(xseed + 7)
    y[:, t + 1 :] = (torch.randn(y[:, t + 1 :].shape, generator=g, dtype=torch.float64) * 10).to(dtype)
    note(f"options {kw}, lengths {lengths}, left {left}, N {N}, t {t}")
    describe(kw, lengths)
    xg = x.clone().requires_grad_(True)
    out, info = m(xg, pad)
    out2, info2 = m(y, pad)
    keep = ~pad[:, : t + 1]
    early, early2 = out[:, : t + 1][keep], out2[:, : t + 1][keep]
    assert torch.equal(info2.assignments[:, : t + 1][keep], info.assignments[:, : t + 1][keep])
    # No information flows backwards: d out[<= t] / d x[> t] is exactly zero...
    if t + 1 < N:
        early.double().sum().backward()
        assert torch.equal(xg.grad[:, t + 1 :], torch.zeros_like(xg.grad[:, t + 1 :]))
    # ...so the earlier outputs agree to rounding. Not bit for bit: a later word in another cluster
    # can move earlier words' keys to other blocks of the sorted layout, which reorders the
    # floating-point sums (docs/attention.md).
    torch.testing.assert_close(early2, early.detach(), atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)


# --- step-by-step decoding equals the full causal forward, with beam reordering ---------------------
@given(
    options(causal=True),
    st.integers(1, 3),
    st.integers(1, 40),
    st.sampled_from(["ring", "auto"]),
    st.lists(
        st.tuples(st.integers(0, 39), st.lists(st.integers(0, 2), min_size=3, max_size=3)),
        max_size=4,
    ),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 39)), max_size=4),
    st.integers(0, 2**31 - 1),
)
def test_step_decoding_equals_full_causal_forward(opts, B, T, mode, reorders, pad_steps, xseed):
    kw, wseed = opts
    m = build(kw, wseed)
    d = kw["embed_dim"]
    g = torch.Generator().manual_seed(xseed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, T, dtype=torch.bool)
    for (
        b,
        t,
    ) in pad_steps:  # padding steps anywhere (fairseq makes them for prefix tokens)
        if b < B and t < T:
            pad[b, t] = True
    reorder_at = {t: torch.tensor([i % B for i in order[:B]]) for t, order in reorders if 0 < t < T}
    note(f"options {kw}, B {B}, T {T}, mode {mode}, reorders {reorder_at}, pad {pad.nonzero().tolist()}")
    state = m.init_state(B, torch.device("cpu"), torch.float64, mode=mode)
    outs, hist, hpad = [], x[:, :0], pad[:, :0]
    for t in range(T):
        if t in reorder_at:  # beam search picks new parents: the history follows them
            order = reorder_at[t]
            state = ClusterAttention.reorder_state(state, order)
            hist, hpad, outs = hist[order], hpad[order], [o[order] for o in outs]
        # no padding steps drawn: no mask at all (the decoder's own path for that, as in beam search)
        y, state = m.step(x[:, t : t + 1], state, key_padding_mask=pad[:, t] if pad_steps else None)
        hist, hpad = (
            torch.cat([hist, x[:, t : t + 1]], 1),
            torch.cat([hpad, pad[:, t : t + 1]], 1),
        )
        outs.append(y)
    stepped = torch.cat(outs, 1)
    assert stepped.shape == (B, T, d)
    full, _ = m(hist, hpad)
    valid = ~hpad
    torch.testing.assert_close(stepped[valid], full[valid], atol=1e-9, rtol=1e-7)


# --- gradients are finite in every dtype, and zero at padding ---------------------------------------
@given(
    options(),
    batches(),
    st.sampled_from(sorted(LOW_PRECISION) + ["float64"]),
    st.sampled_from([1.0, 4.0]),
)
def test_gradients_are_finite_and_zero_at_padding(opts, batch, dtype_name, scale):
    kw, wseed = opts
    lengths, left, N, xseed = batch
    dtype = LOW_PRECISION.get(dtype_name, torch.float64)
    m = build(kw, wseed, dtype)
    x, pad = make_input(lengths, left, N, kw["embed_dim"], xseed, dtype, scale)
    x.requires_grad_(True)
    note(f"options {kw}, lengths {lengths}, left {left}, N {N}, dtype {dtype_name}, scale {scale}")
    describe(kw, lengths)
    out, info = m(x, pad)
    assert torch.isfinite(out[~pad]).all()
    assert torch.isfinite(info.clustering_loss) and torch.isfinite(info.sorting_loss)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(xseed), dtype=torch.float64)
    task = (out * weights.to(dtype) * (~pad)[..., None]).sum() / max(sum(lengths), 1)
    (task + info.clustering_loss + info.sorting_loss).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[pad], torch.zeros_like(x.grad[pad]))  # padding gets no gradient
    assert x.grad[~pad].abs().sum() > 0  # the real words do
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
