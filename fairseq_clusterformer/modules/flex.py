"""impl="flex": the fast path's block attention as one FlexAttention call over every head.

The fast implementation (kernels.py) gathers the sorted words into a block layout per group of
heads that attend alike (clustered, local) and runs masked attention over the blocks: on CUDA
one call when the groups are equally large, else one per group.
This one keeps each head's words in its own sorted order as one sequence of N rows and leaves
the blocks to torch's FlexAttention: a BlockMask of TILE x TILE tiles lists the key tiles each
query tile may need (from host-known sizes in the decoder, from the block sizes in the
encoder), and a mask_mod states the rule exactly, in the sorted frame:

    encoder  sorted word r of sequence b sees sorted word s  iff  s < L_b and s // w_b is r // w_b
             (or r // w_b - 1, with previous_block);
    decoder  sorted word r sees sorted word s  iff  both are in one cluster and r - window < s <= r.

Local heads apply the same rule to the words in their own order (every real word in one
cluster, padding last). Each head gathers the projected q|k|v in its own order, so clustered and
local heads share one projection, one attention call and one output projection.

FlexAttention is fast where torch compiles it: on CUDA it runs as one Triton kernel per pass,
with flash attention's memory (no score tensor). On the CPU torch runs it eagerly as dense
masked attention (O(N^2) memory) and forward only (FlexAttention has no CPU backward): the CPU
runs this path for tests, with the tile list applied to the mask too, so that the CPU computes
what the CUDA kernel computes.
"""

import collections
import copy
import inspect
import weakref
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the package supports torch >= 2.1; FlexAttention with these BlockMask arguments is newer
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    AVAILABLE = "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters
except ImportError:
    BlockMask = flex_attention = None
    AVAILABLE = False

TILE = 128  # FlexAttention's block size, for queries and keys (its default)
_COMPILED_FLEX: Optional[Callable] = None  # torch.compile(flex_attention), made at the first CUDA call
# Eager calls: tile lists (BlockMasks without their mask_mod) that depend on sizes alone, by sizes.
_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_MAX_CACHED = 64
# Eager calls: the tile lists of the batch in flight, (weakref to its padding mask, the mask's
# version, key, BlockMask): every encoder layer of a batch gets the same mask.
_BATCH: Optional[tuple] = None


class HeadOrders(NamedTuple):
    """Each head's order of the words: G groups of heads (local, clustered) share one order."""

    sorted_idx: Tensor  # B x G x N: the original position of the word at each sorted position
    undo_sort: Tensor  # B x G x N: the sorted position of each word
    sorted_cluster: Optional[Tensor]  # B x G x N: each sorted position's cluster (-1: padding); decoder only
    head_group: Optional[Tensor]  # H long: the group of each head (None: one group, G = 1)


def check_available():
    """A clear error where this torch has no usable FlexAttention."""
    if not AVAILABLE:
        raise ValueError(
            f"impl='flex' needs torch's FlexAttention with BlockMask.from_kv_blocks(seq_lengths=...), "
            f"which this torch ({torch.__version__}) lacks: use impl='fast' (the same function)"
        )


def check_device(attn, x: Tensor):
    """Where impl="flex" cannot run, a clear error instead of torch's."""
    if x.is_cuda:
        return
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in attn.parameters()))
    if needs_grad:
        raise RuntimeError(
            "impl='flex' computes gradients on CUDA only (FlexAttention has no CPU backward): "
            "on the CPU, train with impl='fast' (the same function) or run under torch.no_grad()"
        )
    if attn.compile_mode and _compile_backend() == "inductor":
        raise RuntimeError(
            "impl='flex' with compile runs on CUDA only (inductor's CPU FlexAttention does not compile "
            "these masks): on the CPU, use compile=False"
        )


def _compile_backend() -> str:
    from .cluster_attention import COMPILE_BACKEND

    return COMPILE_BACKEND


def encoder_attention(
    attn, x: Tensor, pad: Optional[Tensor], orders: HeadOrders, lengths: Tensor, w_b: Union[int, Tensor], paired: bool
) -> Tensor:
    """The encoder's blocks: x B x N x d; lengths: B (L_b); w_b: B block sizes, or one int when
    every sequence has N words and a fixed k. Eager calls build the tile lists once per size
    (no padding) or once per batch (padding). Returns out_proj of the attention output,
    B x N x d (zero at padding before out_proj)."""
    B, N, _ = x.shape
    if isinstance(w_b, int):
        # A 0-dim tensor, not the int: a compiled FlexAttention would specialise on the int.
        w = _cached(("w", w_b, x.device), lambda: torch.tensor(w_b, device=x.device))

        def mask_mod(b, h, q, kv):  # every key is real
            q_block, kv_block = q // w, kv // w
            return (kv_block == q_block) | (paired & (kv_block == q_block - 1))

        key = ("encoder", N, w_b, paired, x.device)
        tiles = lambda: encoder_tiles(N, lengths[:1], w.view(1), paired)  # noqa: E731
    else:

        def mask_mod(b, h, q, kv):
            q_block, kv_block = q // w_b[b], kv // w_b[b]
            seen = kv_block == q_block
            if paired:
                seen = seen | (kv_block == q_block - 1)
            return seen & (kv < lengths[b])

        # The lists depend on L_b and w_b, which come from the padding mask and the layer's
        # cluster-count settings alone: every encoder layer of a batch (fairseq hands each the
        # same mask tensor) shares one build. Without padding (k="auto"), on the sizes alone.
        key = ("encoder", N, attn.num_clusters, attn.max_clusters, paired, x.device)
        if pad is None:
            tiles = lambda: encoder_tiles(N, lengths[:1], w_b[:1], paired)  # noqa: E731
        else:
            tiles = lambda: encoder_tiles(N, lengths, w_b, paired)  # noqa: E731
        return _attend(attn, x, pad, orders, _block_mask(key, tiles, x, mask_mod, batch=pad))
    return _attend(attn, x, pad, orders, _block_mask(key, tiles, x, mask_mod))


def causal_attention(attn, x: Tensor, pad: Optional[Tensor], orders: HeadOrders) -> Tensor:
    """The decoder's band: each word sees the last ``window`` words of its own cluster (local
    heads: of any cluster) up to itself. Returns out_proj of the attention output, B x N x d."""
    N, w = x.size(1), attn.window
    cluster = orders.sorted_cluster
    if orders.head_group is None:  # one group of heads

        def mask_mod(b, h, q, kv):
            return (cluster[b, 0, kv] == cluster[b, 0, q]) & (kv <= q) & (kv > q - w)

    else:
        group = orders.head_group

        def mask_mod(b, h, q, kv):
            g = group[h]
            return (cluster[b, g, kv] == cluster[b, g, q]) & (kv <= q) & (kv > q - w)

    key = ("band", N, w, x.device)
    return _attend(attn, x, pad, orders, _block_mask(key, lambda: band_tiles(N, w, x.device), x, mask_mod))


def band_tiles(N: int, window: int, device) -> Tuple[Tensor, Tensor]:
    """The key tiles of the decoder's band r - window < s <= r: (1 x 1 x nq tile counts,
    1 x 1 x nq x nq tile indices, the first counts of each row valid). Sizes only: no data."""
    n_tiles = -(-N // TILE)
    tile = torch.arange(n_tiles, device=device)
    first = (tile * TILE - window + 1).clamp(min=0) // TILE
    count = tile - first + 1
    idx = (first[:, None] + torch.arange(n_tiles, device=device)).clamp(max=n_tiles - 1)
    return count.view(1, 1, n_tiles).to(torch.int32), idx.view(1, 1, n_tiles, n_tiles).to(torch.int32)


def encoder_tiles(N: int, lengths: Tensor, w_b: Tensor, paired: bool) -> Tuple[Tensor, Tensor]:
    """The key tiles of the encoder's blocks, per sequence: (B x 1 x nq counts, B x 1 x nq x nq
    indices). Query tile i holds sorted positions [i T, (i + 1) T), in blocks q_lo..q_hi of w_b
    words; they see keys [(q_lo - 1) w_b, (q_hi + 1) w_b) (from q_lo w_b without the previous
    block), below L_b. A tile of padding queries past every key may list none (its rows are
    discarded)."""
    n_tiles = -(-N // TILE)
    tile = torch.arange(n_tiles, device=lengths.device)
    w = w_b[:, None]
    q_lo = (tile * TILE)[None, :] // w  # B x nq: the first and last block of each query tile
    q_hi = ((tile * TILE + TILE).clamp(max=N) - 1)[None, :] // w
    k_lo = (q_lo - int(paired)).clamp(min=0) * w
    k_hi = torch.minimum((q_hi + 1) * w, lengths[:, None]) - 1
    first = k_lo // TILE
    count = torch.where(k_hi >= k_lo, k_hi // TILE - first + 1, 0)  # none: padding queries past every key
    idx = (first[..., None] + torch.arange(n_tiles, device=lengths.device)).clamp(max=n_tiles - 1)
    return count[:, None].to(torch.int32), idx[:, None].to(torch.int32)


def _attend(attn, x: Tensor, pad: Optional[Tensor], orders: HeadOrders, block_mask: BlockMask) -> Tensor:
    """One q|k|v projection, each head's words in its order, one FlexAttention call, back in word
    order, zero at padding, out_proj."""
    B, N, d = x.shape
    H, hd = attn.num_heads, attn.head_dim
    qkv = F.linear(x, *attn.fused_qkv()).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 x B x H x N x hd (a view)
    order, undo = _per_head(orders.sorted_idx, H, orders), _per_head(orders.undo_sort, H, orders)  # B x H x N
    to_sorted, to_words = order[None, ..., None].expand(3, B, H, N, hd), undo[None, ..., None].expand(3, B, H, N, hd)
    qkv = Permute.apply(qkv, 3, to_sorted, to_words)  # each head's words, sorted
    q, k, v = qkv.unbind(0)  # B x H x N x hd each, contiguous
    out = _flex(q, k, v, block_mask)  # B x H x N x hd, sorted
    to_words, to_sorted = undo.transpose(1, 2)[..., None], order.transpose(1, 2)[..., None]  # B x N x H x 1
    out = Permute.apply(out.transpose(1, 2), 1, to_words.expand(B, N, H, hd), to_sorted.expand(B, N, H, hd))
    out = out.view(B, N, d)  # word order
    if pad is not None:
        out = out.masked_fill(pad[:, :, None], 0.0)
    return attn.out_proj(out)


class Permute(torch.autograd.Function):
    """t.gather(dim, index) where ``index`` permutes dim and ``inverse`` undoes it: the backward
    is one gather with the inverse, where autograd's would zero-fill a tensor of t's size and
    scatter-add into it."""

    @staticmethod
    def forward(ctx, t: Tensor, dim: int, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return t.gather(dim, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.gather(ctx.dim, inverse), None, None, None


def _per_head(per_group: Tensor, H: int, orders: HeadOrders) -> Tensor:
    """B x G x N -> B x H x N, each head its group's row (one group: a broadcast, no copy)."""
    if orders.head_group is None:
        return per_group.expand(-1, H, -1)
    return per_group[:, orders.head_group]


def _block_mask(key, tiles: Callable[[], Tuple[Tensor, Tensor]], x: Tensor, mask_mod, batch=None) -> BlockMask:
    """The BlockMask of the tile lists ``tiles()`` under ``mask_mod``. ``key``: the sizes and
    settings that determine the tiles, with ``batch`` (a padding mask) where they also depend on
    that mask's contents, None where they depend on other data. Eager calls build each once: by
    key (sizes alone), or once per batch (the same, unchanged mask tensor). The lists and their
    transposes for the backward are a few dozen small operations."""
    B, N = x.shape[:2]

    def masked(kv_num, kv_idx):
        return mask_mod if x.is_cuda else _within_tiles(mask_mod, kv_num, kv_idx, B)

    if key is None or torch.compiler.is_compiling():
        kv_num, kv_idx = tiles()
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, BLOCK_SIZE=TILE, mask_mod=masked(kv_num, kv_idx), seq_lengths=(N, N)
        )

    def build():
        return BlockMask.from_kv_blocks(*tiles(), BLOCK_SIZE=TILE, seq_lengths=(N, N))

    cached = _cached(key, build) if batch is None else _batch_cached(batch, key, build)
    block_mask = copy.copy(cached)  # the same tensors, this call's mask_mod
    block_mask.mask_mod = masked(cached.kv_num_blocks, cached.kv_indices)
    return block_mask


def _cached(key, build: Callable):
    """build(), made once per key (the most recent _MAX_CACHED keys are kept)."""
    value = _CACHE.get(key)
    if value is None:
        value = _CACHE[key] = build()
        while len(_CACHE) > _MAX_CACHED:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return value


def _batch_cached(batch: Tensor, key, build: Callable):
    """build(), made once while the same ``batch`` tensor, unchanged, comes with the same key
    (one slot: the batch in flight; a weak reference, so the slot keeps no batch alive)."""
    global _BATCH
    if _BATCH is not None:
        ref, version, cached_key, value = _BATCH
        if ref() is batch and version == batch._version and cached_key == key:
            return value
    value = build()
    _BATCH = (weakref.ref(batch), batch._version, key, value)
    return value


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """flex_attention, compiled on CUDA (inside a compiled fast path, torch.compile traces it)."""
    global _COMPILED_FLEX
    if q.is_cuda and not torch.compiler.is_compiling():
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


def _within_tiles(mask_mod, kv_num: Tensor, kv_idx: Tensor, B: int):
    """mask_mod restricted to the listed tiles. torch's eager FlexAttention (the CPU's) applies
    mask_mod to every query-key pair and ignores the tile list, which the CUDA kernel obeys: with
    this, a tile missing from the list changes the CPU's result as it would the GPU's."""
    n_tiles = kv_idx.size(-1)
    valid = torch.arange(kv_idx.size(-1), device=kv_idx.device) < kv_num[..., None]  # B|1 x 1 x nq x nq
    listed = torch.zeros(kv_idx.shape, dtype=torch.int32, device=kv_idx.device)
    listed = listed.scatter_add_(-1, kv_idx.long(), valid.to(torch.int32)) > 0  # duplicates: clamped, invalid
    listed = listed[:, 0].expand(B, n_tiles, n_tiles)

    def tiled(b, h, q, kv):
        return listed[b, q // TILE, kv // TILE] & mask_mod(b, h, q, kv)

    return tiled
