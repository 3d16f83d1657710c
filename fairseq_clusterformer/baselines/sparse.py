"""Sparse Transformer self-attention with the *fixed* pattern (Child et al. 2019), blocked.

The pattern (the paper's "fixed" factorisation with c = 1, both parts in every head, i.e. its
"merged head"): the words are cut into consecutive blocks of l words; a word attends to

- A1: the words of its own block (causal: only those up to itself), and
- A2: the summary words, the last word of every block (position s with s % l == l - 1); in
  the encoder all other blocks' summaries, in the decoder only those of earlier blocks.

Positions are counted among a sentence's real words (padding, left or right, is skipped), so a
word's output is a function of its sentence alone. Block length (docs/baselines.md, "sparse"):

- encoder: l = ceil(L / k) per sentence of L real words (k = --num-clusters, the same k as the
  other baselines; 'auto': k = ceil(sqrt(L)), so l is about sqrt(L), the paper's choice);
- decoder: a fixed l (= --causal-window), so that a word's blocks do not depend on the final
  length and incremental decoding is exact.

Computed without an N x N mask: the words are gathered into a B x nb x lmax block layout; each
block's queries attend to [its own lmax slots ; the nb summaries] with one call of
F.scaled_dot_product_attention, under a B x nb x lmax x (lmax + nb) mask. Cost O(N (l + N/l)).

SparseAttention needs only torch; FairseqSelfAttention (bottom) gives it, and the Linformer
(linformer.py), fairseq's MultiheadAttention calling convention and incremental state.
"""

import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from ..modules.fairseq_cluster_attention import InputBufferMixin, check_self_attention_call
from .linformer import _check_positive_int, checked_padding


def sentence_block_lengths(lengths: Tensor, num_blocks: Union[int, str, None], block_len: Optional[int]) -> Tensor:
    """B long: the block length l_b of each sentence of lengths[b] real words (at least 1)."""
    if block_len is not None:
        return torch.full_like(lengths, block_len)
    if num_blocks == "auto":  # k = ceil(sqrt(L)), in float64 so that perfect squares are exact
        k = lengths.double().sqrt().ceil().long().clamp(min=1)
    else:
        k = num_blocks
    return torch.div(lengths + k - 1, k, rounding_mode="floor").clamp(min=1)


class BlockLayout(NamedTuple):
    """Where the real words go in the B x nb x lmax block layout (rank r = a word's position among
    its sentence's real words; block r // l_b, slot r % l_b)."""

    src: Tensor  # B x nb*lmax long: the input position held by each slot (arbitrary where empty)
    slot_ok: Tensor  # B x nb x lmax bool: the slot holds a real word
    summary_src: Tensor  # B x nb long: the input position of each block's last word, its summary
    summary_ok: Tensor  # B x nb bool: the block is complete (has l_b words), so it has a summary
    dest: Tensor  # B x N long: each input position's slot in the flattened layout (arbitrary at padding)


def block_layout(pad: Optional[Tensor], B: int, N: int, l_b: Tensor, nb: int, lmax: int) -> BlockLayout:
    """pad: B x N (True at padding) or None; l_b: B block lengths; nb, lmax: the layout's size
    (nb >= every sentence's block count, lmax >= every l_b)."""
    device = l_b.device
    pos = torch.arange(N, device=device)
    if pad is None:
        lengths = torch.full((B,), N, device=device, dtype=torch.long)
        order = rank = pos.expand(B, N)
    else:
        real = ~pad
        lengths = real.sum(1)
        order = torch.argsort(pos + N * pad.long(), dim=1)  # B x N: real words first, in order
        rank = (real.long().cumsum(1) - 1).clamp(min=0)  # B x N: position among the real words
    i = torch.arange(lmax, device=device)
    block_start = torch.arange(nb, device=device)[None, :] * l_b[:, None]  # B x nb
    slot_rank = block_start[:, :, None] + i  # B x nb x lmax
    slot_ok = (i < l_b[:, None, None]) & (slot_rank < lengths[:, None, None])
    src = order.gather(1, slot_rank.clamp(max=N - 1).view(B, nb * lmax))
    summary_rank = block_start + l_b[:, None] - 1  # B x nb: the last slot of each block
    summary_ok = summary_rank < lengths[:, None]
    summary_src = order.gather(1, summary_rank.clamp(max=N - 1))
    dest = torch.div(rank, l_b[:, None], rounding_mode="floor") * lmax + rank % l_b[:, None]
    return BlockLayout(src, slot_ok, summary_src, summary_ok, dest)


def block_mask(layout: BlockLayout, causal: bool) -> Tensor:
    """B x 1 x nb x lmax x (lmax + nb) bool (True: attend): query slot (j, i) against the keys
    [own block's slots i' ; summaries of blocks j']."""
    slot_ok, summary_ok = layout.slot_ok, layout.summary_ok
    nb, lmax = slot_ok.shape[1:]
    device = slot_ok.device
    own = slot_ok[:, :, None, :]  # B x nb x 1 x lmax (keys of the own block)
    if causal:
        own = own & torch.ones(lmax, lmax, dtype=torch.bool, device=device).tril()  # key i' <= query i
    # A query slot without a word (padding, or past its sentence's l_b) would have an empty row,
    # whose softmax is NaN (and NaN gradients); it attends to its own slot, and its output is dropped.
    own = own | (~slot_ok[..., None] & torch.eye(lmax, dtype=torch.bool, device=device))  # B x nb x lmax x lmax
    j = torch.arange(nb, device=device)
    other = j[None, :] < j[:, None] if causal else j[None, :] != j[:, None]  # query block x key block
    # The own block's summary is already among its slots (encoder) or in the future (decoder).
    summary = summary_ok[:, None, None, :] & other[None, :, None, :]  # B x nb x 1 x nb
    return torch.cat([own, summary.expand(-1, -1, lmax, -1)], dim=-1)[:, None]


class SparseAttention(nn.Module):
    """Multi-head self-attention with the Sparse Transformer's fixed pattern (batch first).

    Args:
        embed_dim, num_heads: model width and heads (the pattern is the same in every head).
        causal: decoder variant (keys up to the query only; needs ``block_len``; ``step``
            decodes exactly).
        num_blocks: encoder: k, the number of blocks per sentence: l = ceil(L / k) for a
            sentence of L real words; 'auto': k = ceil(sqrt(L)). Ignored when ``block_len`` is set.
        block_len: a fixed block length l (required in the decoder; optional in the encoder).
        dropout: attention dropout (training only).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        num_blocks: Union[int, str] = 3,
        block_len: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if block_len is not None:
            _check_positive_int("block_len", block_len)
        elif causal:
            raise ValueError(
                "the causal sparse attention needs a fixed block_len: a decoder does not know the final "
                "length, so blocks of ceil(L / k) would change as words are added"
            )
        elif num_blocks != "auto":
            _check_positive_int("num_blocks", num_blocks)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.num_blocks, self.block_len, self.dropout = causal, num_blocks, block_len, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        # As fairseq's MultiheadAttention (self-attention with q/k/v of equal size).
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self):
        size = f"block_len={self.block_len}" if self.block_len is not None else f"num_blocks={self.num_blocks}"
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, {size}"

    def _heads(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x N x hd

    def layout_size(self, N: int) -> Tuple[int, int]:
        """(nb, lmax) for a padded length N: bounds over every real length L <= N, known without
        looking at the lengths (no host synchronisation)."""
        if self.block_len is not None:
            return -(-N // self.block_len), self.block_len
        if self.num_blocks == "auto":  # l_b <= ceil(sqrt(L)) and nb_b <= ceil(sqrt(L)), L <= N
            s = math.isqrt(N - 1) + 1 if N > 0 else 1
            return s, s
        return self.num_blocks, -(-N // self.num_blocks)  # nb_b = ceil(L / ceil(L / k)) <= k

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: B x N x d; key_padding_mask: B x N bool (True at padding) or None. Returns B x N x d,
        zero at padding."""
        B, N, d = x.shape
        pad = checked_padding(x, key_padding_mask, self.embed_dim)
        if N == 0:
            return self.out_proj(x)
        if pad is not None:
            # Empty slots of the layout gather some position's key (masked, but a non-finite
            # padding vector would still turn its scores into NaN): padding enters as zeros.
            x = x.masked_fill(pad[..., None], 0.0)
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # B x H x N x hd
        H, hd = self.num_heads, self.head_dim
        lengths = torch.full((B,), N, device=x.device) if pad is None else (~pad).sum(1)
        l_b = sentence_block_lengths(lengths, self.num_blocks, self.block_len)  # B
        nb, lmax = self.layout_size(N)
        layout = block_layout(pad, B, N, l_b, nb, lmax)

        def gather(t: Tensor, idx: Tensor) -> Tensor:  # t: B x H x N x hd, idx: B x M -> B x H x M x hd
            return t.gather(2, idx[:, None, :, None].expand(-1, H, -1, hd))

        qb, kb, vb = (gather(t, layout.src).view(B, H, nb, lmax, hd) for t in (q, k, v))
        ks, vs = (gather(t, layout.summary_src)[:, :, None].expand(-1, -1, nb, -1, -1) for t in (k, v))
        keys = torch.cat([kb, ks], dim=3)  # B x H x nb x (lmax + nb) x hd: own block, then every summary
        values = torch.cat([vb, vs], dim=3)
        out = F.scaled_dot_product_attention(
            qb,
            keys,
            values,
            attn_mask=block_mask(layout, self.causal),
            dropout_p=self.dropout if self.training else 0.0,
        )  # B x H x nb x lmax x hd
        out = gather(out.reshape(B, H, nb * lmax, hd), layout.dest)  # B x H x N x hd, back in input order
        out = self.out_proj(out.transpose(1, 2).reshape(B, N, d))
        return out if pad is None else out.masked_fill(pad[..., None], 0.0)

    # ------------------------------------------------------------------------------------------
    # Incremental decoding (causal only): the current block's keys/values (l slots) and the
    # summaries of the completed blocks; O((l + t/l) d) per step.
    def init_state(self, batch_size: int, device=None, dtype=None) -> Dict[str, Tensor]:
        if not self.causal:
            raise ValueError("incremental decoding needs the causal (decoder) variant")
        block = torch.zeros(batch_size, self.num_heads, self.block_len, self.head_dim, device=device, dtype=dtype)
        summary = block[:, :, :0]
        return {
            "block_key": block,  # B x H x l x hd: slot i holds the current block's i-th word
            "block_value": block.clone(),
            "summary_key": summary,  # B x H x S x hd: the last word of each completed block
            "summary_value": summary.clone(),
            "length": torch.zeros(batch_size, dtype=torch.long, device=device),  # B: real words so far
        }

    def step(
        self, x: Tensor, state: Optional[Dict[str, Tensor]] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One position. x: B x 1 x d; key_padding_mask: B bool (True: this position is padding,
        which is skipped: it does not advance the sentence) or None. Returns (B x 1 x d, state)."""
        if not self.causal:
            raise ValueError("incremental decoding needs the causal (decoder) variant")
        B, T, d = x.shape
        if T != 1 or d != self.embed_dim:
            raise ValueError(f"step takes one position, B x 1 x {self.embed_dim}; got {tuple(x.shape)}")
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        bl, device = self.block_len, x.device
        real = torch.ones(B, dtype=torch.bool, device=device) if key_padding_mask is None else ~key_padding_mask
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # B x H x 1 x hd
        length = state["length"]
        slot, block = length % bl, torch.div(length, bl, rounding_mode="floor")  # B, B
        here = (torch.arange(bl, device=device) == slot[:, None]) & real[:, None]  # B x bl
        block_key = torch.where(here[:, None, :, None], k, state["block_key"])
        block_value = torch.where(here[:, None, :, None], v, state["block_value"])
        summary_key, summary_value = state["summary_key"], state["summary_value"]
        S = summary_key.size(2)
        own_ok = torch.arange(bl, device=device) <= slot[:, None]  # B x bl (later slots: an older block)
        summary_ok = torch.arange(S, device=device) < block[:, None]  # B x S: earlier blocks
        mask = torch.cat([own_ok, summary_ok], 1)[:, None, None, :]  # B x 1 x 1 x (bl + S)
        y = F.scaled_dot_product_attention(
            q,
            torch.cat([block_key, summary_key], 2),
            torch.cat([block_value, summary_value], 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # B x H x 1 x hd
        y = self.out_proj(y.transpose(1, 2).reshape(B, 1, d)).masked_fill(~real[:, None, None], 0.0)
        # A word in a block's last slot is that block's summary for every later block.
        closes = real & (slot == bl - 1)  # B
        new_length = length + real.long()
        completed = int(torch.div(new_length, bl, rounding_mode="floor").max())  # one host sync per step
        if completed > S:
            grow = (0, 0, 0, completed - S)
            summary_key, summary_value = F.pad(summary_key, grow), F.pad(summary_value, grow)
        at = ((torch.arange(summary_key.size(2), device=device) == block[:, None]) & closes[:, None])[:, None, :, None]
        state = {
            "block_key": block_key,
            "block_value": block_value,
            "summary_key": torch.where(at, k, summary_key),
            "summary_value": torch.where(at, v, summary_value),
            "length": new_length,
        }
        return y, state

    @staticmethod
    def reorder_state(state: Dict[str, Tensor], new_order: Tensor) -> Dict[str, Tensor]:
        """Beam search: select/reorder the batch entries of a decoding state (batch is dim 0)."""
        return {name: t.index_select(0, new_order) for name, t in state.items()}


@with_incremental_state
class FairseqSelfAttention(InputBufferMixin, nn.Module):
    """fairseq's MultiheadAttention calling convention around a batch-first self-attention
    ``attention(x, key_padding_mask) -> B x N x d`` (SparseAttention, LinformerAttention).

    Time-first T x B x C in and out, ``(output, None)`` (weights are never materialised). With a
    causal attention, incremental decoding through its ``init_state``/``step``/``reorder_state``,
    cached under fairseq's "attn_state" input buffer (batch on dim 0, so beam search reorders it).
    Encoder layers call ``forward`` through fairseq's own layer code (no ``attend`` method).
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.embed_dim // attention.num_heads  # read by fairseq's decoder layer
        self.causal = bool(getattr(attention, "causal", False))

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """query/key/value: T x B x C (self-attention: key and value are the query or None).

        ``attn_mask``: the decoder's future mask is not needed (the causal pattern lies within
        it) and is ignored; the encoder variant takes none.
        """
        what = type(self.attention).__name__
        check_self_attention_call(query, key, value, static_kv, before_softmax, what)
        if attn_mask is not None and not self.causal:
            raise ValueError(f"{what} (encoder) takes no attn_mask: its pattern is its own")
        if incremental_state is not None:
            if not self.causal:
                raise ValueError(f"{what} is encoder self-attention: incremental decoding needs a causal attention")
            return self._forward_incremental(query.transpose(0, 1), key_padding_mask, incremental_state), None
        return self.attention(query.transpose(0, 1), key_padding_mask).transpose(0, 1), None

    def _forward_incremental(self, x: Tensor, key_padding_mask: Optional[Tensor], incremental_state) -> Tensor:
        state = self._get_input_buffer(incremental_state)
        if not state:
            state = self.attention.init_state(x.size(0), x.device, x.dtype)
        outs = []
        # fairseq's generator feeds one position per call; a longer chunk (a prefix replayed at
        # once) is decoded position by position, so that the cache stays exact.
        for t in range(x.size(1)):
            pad = None
            if key_padding_mask is not None:
                pad = key_padding_mask[:, key_padding_mask.size(1) - x.size(1) + t]
            y, state = self.attention.step(x[:, t : t + 1], state, key_padding_mask=pad)
            outs.append(y)
        self._set_input_buffer(incremental_state, state)
        return torch.cat(outs, dim=1).transpose(0, 1)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Beam search: reorder the cache (batch is dim 0 of every cached tensor)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            incremental_state = self._set_input_buffer(
                incremental_state, {name: t.index_select(0, new_order) for name, t in buffer.items()}
            )
        return incremental_state
