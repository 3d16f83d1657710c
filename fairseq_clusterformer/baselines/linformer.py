"""Linformer self-attention (Wang et al. 2020) for the encoder, padding-aware.

From the paper and fairseq's examples/linformer (``MultiheadLinearAttention``, self-attention
branch): keys and values are projected along the sequence to k rows by learned E and F (one
pair per layer, shared by the heads, as fairseq's default ``shared_kv_compressed=0``), applied
to the layer input before the key/value projections: K = k_proj(E X), V = v_proj(F X), each
k x d; every word attends to those k rows, O(N k) instead of O(N^2). E and F have a row per
position up to ``max_positions`` (--max-source-positions); a sentence uses the first L rows.
Initialisation as fairseq's (xavier uniform, gain 1/sqrt(2)).

Changed here (docs/baselines.md, "linformer"): fairseq slices E to the *padded* length and
does not apply the key-padding mask, so padding words enter every key and value and a word's
output depends on its batch. Here the padding is zeroed before the projection and a real word
uses the row of its position among its sentence's real words (left or right padding alike):
the output of a sentence does not depend on its padding or batch mates.

Encoder only: each projected row mixes all positions, the future included, so there is no
causal Linformer; the model refuses ``--self-attention-decoder linformer``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def checked_padding(x: Tensor, key_padding_mask: Optional[Tensor], embed_dim: int) -> Optional[Tensor]:
    """The padding mask of a batch-first self-attention call on x (B x N x d), checked: None when
    there is none or no position is padding (one host sync), else B x N bool (True at padding)."""
    B, N, d = x.shape
    if d != embed_dim:
        raise ValueError(f"expected inputs of width {embed_dim}, got {tuple(x.shape)}")
    pad = key_padding_mask
    if pad is None:
        return None
    if pad.shape != (B, N) or pad.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape {(B, N)}, got {pad.dtype} {tuple(pad.shape)}"
        )
    return pad if bool(pad.any()) else None


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class LinformerAttention(nn.Module):
    """Batch-first Linformer self-attention: B x N x d with a B x N padding mask (True at padding).

    Args:
        embed_dim, num_heads: model width and heads.
        proj_len: k, the number of projected key/value rows (--linformer-k).
        max_positions: the longest sentence (rows of E and F; --max-source-positions).
        dropout: attention dropout (training only).
    """

    causal = False  # read by FairseqSelfAttention: no incremental decoding

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        proj_len: int = 32,
        max_positions: int = 1024,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        _check_positive_int("proj_len (--linformer-k)", proj_len)
        _check_positive_int("max_positions (--max-source-positions)", max_positions)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.proj_len, self.max_positions, self.dropout = proj_len, max_positions, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # The paper's E and F, stored transposed (max_positions x k) so that a sentence's rows
        # are a slice or a gather along dim 0.
        self.seq_proj_key = nn.Parameter(torch.empty(max_positions, proj_len))
        self.seq_proj_value = nn.Parameter(torch.empty(max_positions, proj_len))
        self.reset_parameters()

    def reset_parameters(self):
        # As fairseq's MultiheadLinearAttention (q/k/v of equal size).
        gain = 1 / math.sqrt(2)
        for w in (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight):
            nn.init.xavier_uniform_(w, gain=gain)
        # fairseq's compress_k/v are nn.Linear(max_seq_len, k): weight k x max_seq_len; xavier's
        # bound is symmetric in the two fan sizes, so the transposed parameter gets the same.
        nn.init.xavier_uniform_(self.seq_proj_key, gain=gain)
        nn.init.xavier_uniform_(self.seq_proj_value, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, k={self.proj_len}, "
            f"max_positions={self.max_positions}"
        )

    def _heads(self, t: Tensor) -> Tensor:
        B, M, _ = t.shape
        return t.view(B, M, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x M x hd

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: B x N x d; key_padding_mask: B x N bool (True at padding) or None. Returns B x N x d,
        zero at padding."""
        B, N, d = x.shape
        pad = checked_padding(x, key_padding_mask, self.embed_dim)
        if N > self.max_positions:  # only then can a sentence be too long (one host sync)
            longest = N if pad is None else int((~pad).sum(1).max())
            if longest > self.max_positions:
                raise ValueError(
                    f"Linformer: a sentence of {longest} words is longer than its {self.max_positions} "
                    f"projection rows (--max-source-positions, fixed when the model was built)"
                )
        if pad is None:
            E = self.seq_proj_key[:N].to(x.dtype)  # N x k: the first N rows
            Fv = self.seq_proj_value[:N].to(x.dtype)
            xk = torch.einsum("nk,bnd->bkd", E, x)  # B x k x d
            xv = torch.einsum("nk,bnd->bkd", Fv, x)
        else:
            # A real word takes the row of its position among its sentence's real words; padding
            # is zeroed (its row and its input) before the projection, so it reaches no key or value.
            real = ~pad
            rank = (real.long().cumsum(1) - 1).clamp(min=0).clamp(max=self.max_positions - 1)  # B x N
            keep = real[..., None].to(x.dtype)
            x = x.masked_fill(pad[..., None], 0.0)  # also keeps inf/nan padding content out
            E = self.seq_proj_key.to(x.dtype)[rank] * keep  # B x N x k
            Fv = self.seq_proj_value.to(x.dtype)[rank] * keep
            xk = torch.einsum("bnk,bnd->bkd", E, x)  # B x k x d
            xv = torch.einsum("bnk,bnd->bkd", Fv, x)
        q = self._heads(self.q_proj(x))  # B x H x N x hd
        k = self._heads(self.k_proj(xk))  # B x H x k x hd: k mixtures of the sentence's words
        v = self._heads(self.v_proj(xv))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(B, N, d))
        return out if pad is None else out.masked_fill(pad[..., None], 0.0)
