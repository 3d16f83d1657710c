"""Exact incremental decoding for the causal variant: the assignment, the cache, one step, beam
reordering.

The functions take the ClusterAttention layer (``attn``) as their first argument;
``ClusterAttention.init_state`` / ``step`` / ``reorder_state`` call them. The decoder's
assignment rule lives here because decoding is exact only if a word gets the same cluster alone
in a step (``assign_step``) as in a full forward (``assign_per_word``).

Two cache layouts, because beam search reorders the whole cache at every step:
    ring    per sequence and cluster, a ring buffer of the last ``window`` keys and values
            (and one ring of the last ``window`` words for the local heads): O(window d) per
            step and a fixed size, K window slots from the first step on;
    auto    the keys, values and clusters of the whole prefix, as a standard decoder keeps
            them, switched to the ring layout once the prefix reaches K window positions. It
            holds far less while outputs are short (most translations never switch), so beam
            search copies less. fairseq's adapter uses it.
Both give the same outputs as the full causal forward (tests/test_cluster_attention_decoding.py).
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import arange, filled
from .kernels import additive_mask

# The near-tie rows of assign_per_word are scored in chunks of at most this many products
# (x_j c_i, each K x d per word): the memory of the exact definition stays bounded whatever N is.
_NEAR_TIE_CHUNK_ELEMENTS = 1 << 24


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the decoder's cluster scores are computed in: float32 for float16/bfloat16 input
    (their products are exact in float32, and its sum rounds about 2**16 times less than a
    half-precision one, so far fewer words are near a tie), else the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def _elementwise_scores(words: Tensor, cw: Tensor) -> Tensor:
    """The definition of the decoder's cluster scores: rows x d, K x d -> rows x K, an
    elementwise product summed over d in score_dtype (not a matmul: see assign_per_word)."""
    acc = score_dtype(words.dtype)
    return (words.to(acc).unsqueeze(-2) * cw.to(acc)).sum(-1)


@torch.no_grad()
def assign_per_word(attn, x: Tensor) -> Tensor:
    """The decoder's assignment: argmax_i (c_i W_C) . x_t for each word, ... x d -> ... long.

    Defined as the argmax of an elementwise product summed over d in score_dtype (float32 for
    half-precision input): every word gets the same floating-point result whether it comes in a
    full sequence or alone in a decoding step (a batched matmul may block the reduction
    differently by shape and flip a near-tie). Materialising that product for all words costs
    N x K x d, so the argmax is taken from a float64 matmul instead wherever its top two scores
    are further apart than the rounding error of either computation can bridge (then both
    argmaxes agree), and the elementwise product is computed only for the remaining near-ties,
    in chunks of bounded size: the same result as computing it everywhere.

    With a router, its ``directions`` take the place of C W_C (the same exact argmax).
    """
    cw = assignment_directions(attn, x.dtype)  # K x d
    if cw.size(0) == 1:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    d = x.size(-1)
    words = x.reshape(-1, d)
    words64, cw64 = words.double(), cw.double()
    top = torch.matmul(words64, cw64.t()).topk(2, dim=-1)  # rows x 2
    # Both sums of d products are within gamma_d * sum_i |x_i c_i| <= (d + 2) eps |x| |c| of the
    # exact dot product (any summation order; the float64 one far closer), eps that of the
    # score dtype (products of half-precision numbers are exact in float32).
    eps = torch.finfo(score_dtype(x.dtype)).eps
    bound = torch.linalg.vector_norm(words64, dim=-1).mul_(
        torch.linalg.vector_norm(cw64, dim=-1).max() * (2 * (d + 2) * eps)
    )
    assign = top.indices[:, 0]
    near = (top.values[:, 0] - top.values[:, 1] <= bound).nonzero()[:, 0]
    # A loop over memory-sized chunks of the near-tie rows (usually one), not over words.
    step = max(1, _NEAR_TIE_CHUNK_ELEMENTS // (cw.size(0) * d))
    for first in range(0, near.numel(), step):
        rows = near[first : first + step]
        assign[rows] = _elementwise_scores(words[rows], cw).argmax(-1)
    return assign.view(x.shape[:-1])


@torch.no_grad()
def assign_step(attn, x: Tensor) -> Tensor:
    """assign_per_word for the few words of one decoding step, B x d -> B: the elementwise
    product that defines the assignment, computed for every word (B x K x d is small here),
    without the float64 screen that spares a full sequence from materialising it."""
    return _elementwise_scores(x, assignment_directions(attn, x.dtype)).argmax(-1)


def assignment_directions(attn, dtype) -> Tensor:
    """The K x d rows a decoder word's assignment is the argmax against: the router's
    directions, or C W_C. C W_C is computed once per parameter state (a decoding run calls
    this at every step of every layer): the cache key holds each parameter's storage and
    version counter, which every in-place update through the parameter (torch's optimizers,
    load_state_dict) and every replacement changes, and init_state drops the cache (updates
    through ``.data``, fairseq's optimizers', change no version counter)."""
    if attn.router is not None:
        return attn.router.directions(dtype)
    params = (attn.centroids, attn.centroid_proj.weight)
    key = (dtype, *((p.data_ptr(), p._version) for p in params))
    cached = getattr(attn, "_directions_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, attn.centroid_proj(attn.centroids.to(dtype)))
        attn._directions_cache = cached
    return cached[1]


def init_state(attn, batch_size: int, device=None, dtype=None, mode: str = "ring") -> Dict[str, Tensor]:
    """An empty cache for incremental decoding (batch on dim 0).

    ``mode="ring"``: per sequence and cluster, a ring buffer of the last ``window`` keys and
    values (K x window slots from the first step on): O(window * d) per step whatever the
    length. ``mode="auto"``: first the keys, values and clusters of the whole prefix, as a
    standard decoder keeps them (O(t * d) per step), switched to the ring buffers once the
    prefix reaches K x window positions. Both give the same outputs; "auto" keeps far less
    while the output is short, which matters in beam search, where the whole cache is
    reordered at every step (fairseq's adapter uses it).

    The ring buffers keep keys and values in one tensor (a dimension of 2 before the slots:
    key, value), and the word counts in one: a step writes and gathers, and beam search
    reorders, one tensor for both. The prefix keeps them apart: it grows by a concatenation at
    every step, and on the CPU two half-size allocations a step were measured faster than one
    (the allocator returns large blocks to the system and faults them in again).
    """
    # A new decoding run: drop the caches made per parameter state (C W_C, the stacked q|k|v).
    # Their keys see every in-place update made through the parameters, but not one made
    # through ``.data``, as fairseq's optimizers make theirs (a model that generates during
    # training, e.g. --eval-bleu, decodes again after such updates).
    attn._directions_cache = attn._step_projection_cache = None
    p = attn.q_proj.weight
    return _empty_state(attn, batch_size, device or p.device, dtype or p.dtype, mode)


def _empty_state(attn, batch_size: int, device, dtype, mode: str) -> Dict[str, Tensor]:
    K, w, H, hd = attn.num_clusters, attn.window, attn.num_heads, attn.head_dim
    Hl = attn.local_heads
    if mode == "auto":
        return {
            "prefix_key": torch.zeros(batch_size, 0, H, hd, device=device, dtype=dtype),  # B x t x H x hd
            "prefix_value": torch.zeros(batch_size, 0, H, hd, device=device, dtype=dtype),
            "prefix_cluster": torch.zeros(batch_size, 0, dtype=torch.long, device=device),  # -1: padding step
        }
    if mode != "ring":
        raise ValueError(f"mode must be 'ring' or 'auto', got {mode!r}")
    return {  # clustered heads (Hl..H-1): per cluster; local heads (0..Hl-1): one ring of any cluster
        "cluster_kv": torch.zeros(batch_size, K, 2, w, H - Hl, hd, device=device, dtype=dtype),
        "local_kv": torch.zeros(batch_size, 2, w, Hl, hd, device=device, dtype=dtype),
        # real words seen: of each cluster (columns 0..K-1), and of any cluster (column K)
        "count": torch.zeros(batch_size, K + 1, dtype=torch.long, device=device),
    }


def step(
    attn, x: Tensor, state: Optional[Dict[str, Tensor]] = None, key_padding_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Decode one position (causal variant): x is B x 1 x d (or B x d).

    The state (``init_state``; None starts a ring-buffer one) holds per sequence and cluster
    the last ``window`` keys and values and the number of words seen, or (``mode="auto"``)
    the whole prefix until it reaches K x window positions. A padding step
    (``key_padding_mask`` True) changes nothing that later steps see and outputs zero
    before ``out_proj``. Returns (B x 1 x d output, new state); ring buffers are updated in
    place.
    """
    if not attn.causal:
        raise RuntimeError("step() is for the causal variant; the encoder variant sees the whole sequence")
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, None]
    if x.dim() != 3 or x.size(1) != 1 or x.size(-1) != attn.embed_dim:
        raise ValueError(f"step() takes one position, B x 1 x {attn.embed_dim}; got {tuple(x.shape)}")
    B, _, d = x.shape
    H, hd = attn.num_heads, attn.head_dim
    if state is None:
        state = init_state(attn, B, x.device, x.dtype)
    # real: B, False at a padding step; None when no step of the batch is padding (fewer ops)
    real = None if key_padding_mask is None else ~key_padding_mask.reshape(B).to(torch.bool)

    x0 = x[:, 0]  # B x d
    cluster = assign_step(attn, x0)  # B
    qkv = F.linear(x0, *step_projection(attn)).view(B, 3, H, hd)
    q, kv = qkv[:, 0], qkv[:, 1:]  # B x H x hd, B x 2 x H x hd (key, value)

    if "prefix_key" in state:
        out, state = _attend_prefix(attn, state, q, kv, cluster, real)
    else:
        out = _attend_rings(attn, state, q, kv, cluster, real)  # updates the rings in place
    out = out.reshape(B, 1, d)  # B x H x 1 x hd -> B x 1 x d
    if real is not None:
        out = out * real[:, None, None].to(out.dtype)
    out = attn.out_proj(out)
    return (out[:, 0] if squeeze else out), state


def step_projection(attn) -> Tuple[Tensor, Optional[Tensor]]:
    """The stacked q|k|v projection of a decoding step (``attn.fused_qkv()``: one matmul, not
    three), made once per parameter state where no gradient is wanted (every step of every
    layer would otherwise concatenate the weights anew), with the same key as
    assignment_directions' cache and dropped by init_state like it. The cache keeps one more
    copy of the three weights per layer."""
    params = [t for proj in (attn.q_proj, attn.k_proj, attn.v_proj) for t in (proj.weight, proj.bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return attn.fused_qkv()  # autograd must see the concatenation
    key = tuple((t.data_ptr(), t._version) for t in params)
    cached = getattr(attn, "_step_projection_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, attn.fused_qkv())
        attn._step_projection_cache = cached
    return cached[1]


def _attend_prefix(attn, state, q, kv, cluster, real):
    """The "auto" cache while it holds the whole prefix. q: B x H x hd, kv: B x 2 x H x hd of
    this word; cluster: B; real: B (False at a padding step) or None (no padding). Returns
    (B x H x 1 x hd, new state)."""
    H, w, Hl = attn.num_heads, attn.window, attn.local_heads
    # A clustered head attends to the last w words of this word's cluster, a local head to the
    # last w real words; both include the word itself.
    keys = torch.cat([state["prefix_key"], kv[:, 0, None]], 1)  # B x t+1 x H x hd
    values = torch.cat([state["prefix_value"], kv[:, 1, None]], 1)
    word_cluster = cluster if real is None else cluster.masked_fill(~real, -1)  # -1: padding
    clusters = torch.cat([state["prefix_cluster"], word_cluster[:, None]], 1)  # B x t+1
    same = clusters == cluster[:, None]  # B x t+1
    short = clusters.size(1) <= w  # a prefix of at most w words: no word is more than w back
    visible = (same if short else _last(same, w))[:, None, :]
    if Hl:
        seen = clusters >= 0
        recent = (seen if short else _last(seen, w))[:, None, :]
        B, T = clusters.shape
        visible = torch.cat([recent.expand(B, Hl, T), visible.expand(B, H - Hl, T)], 1)  # B x H x t+1
    if real is not None:
        visible = visible | ~real[:, None, None]  # a padding step's (discarded) row stays finite
    state = {"prefix_key": keys, "prefix_value": values, "prefix_cluster": clusters}
    if keys.size(1) >= attn.num_clusters * w:
        state = prefix_to_ring(attn, keys, values, clusters)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=additive_mask(visible[:, :, None, :], q.dtype),
    )  # B x H x 1 x hd
    return out, state


def _last(member: Tensor, w: int) -> Tensor:
    """member (B x T bool) restricted to each row's last w members. The n-th member from the
    start (n = its running count) is among the last w iff n > total - w."""
    count = member.cumsum(1)  # B x T
    return member & (count > count[:, -1:] - w)


def _attend_rings(attn, state, q, kv, cluster, real):
    """The ring-buffer cache: writes this word into its rings (padding steps write nothing) and
    attends to them. Returns B x H x 1 x hd.

    Without padding (``real`` None, as in beam search) the writes are plain index_put_s: a step
    is bound by its number of kernel launches on a GPU (it runs in every layer for every output
    token), so keys and values travel as one tensor and the masks come from the counts alone."""
    B, H, _ = q.shape
    K, w, Hl = attn.num_clusters, attn.window, attn.local_heads
    batch, ring_slot = arange(B, q.device), arange(w, q.device)
    count, local_kv, cluster_kv = state["count"], state["local_kv"], state["cluster_kv"]
    # The count columns of the local ring (K: words of any cluster) and of this word's cluster
    column = F.pad(cluster[:, None], (1, 0), value=K)  # B x 2
    seen = count.gather(1, column)  # B x 2: real words so far
    slot = seen % w  # the oldest word's slot, which this word takes
    if Hl:
        _write(local_kv, (batch, slice(None), slot[:, 0]), kv[:, :, :Hl], real)
    if Hl < H:
        _write(cluster_kv, (batch, cluster, slice(None), slot[:, 1]), kv[:, :, Hl:], real)
    # Slot s holds a word iff s < the count after this word (s < window always: no clamp needed).
    if real is None:
        count.scatter_add_(1, column, filled((B, 2), 1, torch.long, q.device))
        visible = ring_slot <= seen[:, :, None]  # B x 2 x w: the local ring, this cluster's ring
    else:
        after = seen + real.long()[:, None]  # B x 2
        count.scatter_(1, column, after)
        visible = (ring_slot < after[:, :, None]) | ~real[:, None, None]  # a padding step's row stays finite
    visible = additive_mask(visible, q.dtype)  # once for both calls
    # One attention call per kind of head: one call over both would copy the two rings into one
    # tensor first, measured slower on the CPU (a GPU would save two launches).
    parts = []
    if Hl:
        keys, values = local_kv.transpose(2, 3).unbind(1)  # B x Hl x w x hd each
        parts.append(F.scaled_dot_product_attention(q[:, :Hl, None], keys, values, attn_mask=visible[:, None, :1]))
    if Hl < H:
        keys, values = cluster_kv[batch, cluster].transpose(2, 3).unbind(1)  # B x H-Hl x w x hd each
        parts.append(F.scaled_dot_product_attention(q[:, Hl:, None], keys, values, attn_mask=visible[:, None, 1:]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # B x H x 1 x hd


def _write(buffer: Tensor, index: tuple, value: Tensor, real: Optional[Tensor]):
    """buffer[index] = value (B x 2 x heads x hd: the index picks one slot per sequence), in
    place; where ``real`` is False (a padding step), nothing."""
    if real is None:
        buffer[index] = value
    else:
        buffer[index] = torch.where(real[:, None, None, None], value, buffer[index])


def prefix_to_ring(attn, keys: Tensor, values: Tensor, clusters: Tensor) -> Dict[str, Tensor]:
    """The ring-buffer state equal to a whole-prefix one (keys, values: B x T x H x hd, clusters:
    B x T, -1 at padding steps): the n-th word of cluster c (n from 0) sits in slot n % w of
    c's buffer, if it is among c's last w words."""
    B, T = clusters.shape
    K, w = attn.num_clusters, attn.window
    real = clusters >= 0
    c = clusters.clamp(min=0)
    seen = (F.one_hot(c, K) * real[..., None]).cumsum(1)  # B x T x K: words of each cluster so far
    count = seen[:, -1]  # B x K
    n = seen.gather(2, c[..., None])[..., 0] - 1  # B x T: index of each word within its cluster
    keep = real & (count.gather(1, c) - n <= w)
    b, j = keep.nonzero(as_tuple=True)
    state = _empty_state(attn, B, keys.device, keys.dtype, "ring")
    kvs = torch.stack([keys, values], 1)  # B x 2 x T x H x hd, once per decoding run
    Hl = attn.local_heads
    state["cluster_kv"][b, c[b, j], :, n[b, j] % w] = kvs[b, :, j, Hl:]  # (words x 2 x H-Hl x hd)
    # Local heads: the m-th real word (from 0) sits in slot m % w if it is among the last w.
    m = real.long().cumsum(1) - 1  # B x T
    total = m[:, -1] + 1
    b, j = (real & (total[:, None] - m <= w)).nonzero(as_tuple=True)
    state["local_kv"][b, :, m[b, j] % w] = kvs[b, :, j, :Hl]
    state["count"] = torch.cat([count, total[:, None]], 1)
    return state


def reorder_state(state: Dict[str, Tensor], new_order: Tensor) -> Dict[str, Tensor]:
    """Beam search: select/reorder the batch entries of a decoding state."""
    return {name: t.index_select(0, new_order) for name, t in state.items()}
