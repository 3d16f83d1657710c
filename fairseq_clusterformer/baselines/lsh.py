"""Reformer LSH self-attention (reformer-pytorch's LSHSelfAttention) for the encoder.

From the package, unchanged: the shared-QK projections, the hashing (argmax over [x R; -x R],
one random rotation per hash round), the sort by (bucket, position), chunks that attend to
themselves and the chunk before (wrapping around), the self-attention mask, the combination of
hash rounds by their log-sum-exp, the output projection. Changed here, each in a few lines:

- **sizes per sentence**: ``n_buckets`` is fixed by the layer (from ClusterFormer's k), and the
  bucket (chunk) size is ceil(L / n_buckets) for a sentence of L words: each sentence is cut
  into the same number of chunks whatever its batch (grouping.run_by_length calls the package
  on the sentences of each length together, without padding);
- **padding**: the length is rounded up to n_buckets x bucket size (the package's divisibility
  rule) with zero vectors that are hashed into the last bucket of every round, where they sort
  after every real word, and are masked as keys: they never take a word's place in a chunk;
- **evaluation**: the rotations are a per-layer buffer drawn once (from the global RNG, at
  construction) and used in eval mode, so two evaluation passes agree; training draws fresh
  rotations per call, as the package does;
- the package's switch to full attention below ``full_attn_thres`` (default: the bucket size,
  64, i.e. every MT sentence) is off.
"""

import math

import torch
from reformer_pytorch.reformer_pytorch import LSHAttention, LSHSelfAttention
from torch import Tensor, nn

from .grouping import run_by_length


class PaddingAwareLSHAttention(LSHAttention):
    """LSHAttention with a fixed bucket count, per-call bucket size, padding hashed last and
    fixed rotations in evaluation."""

    def __init__(self, n_buckets: int, dim_head: int, **kwargs):
        super().__init__(**kwargs)
        if n_buckets < 2 or n_buckets % 2:
            raise ValueError(f"LSH needs an even number of buckets >= 2, got {n_buckets}")
        self.n_buckets = n_buckets
        self.register_buffer("eval_rotations", torch.randn(1, dim_head, self.n_hashes, n_buckets // 2))
        self._valid = None

    def forward(self, qk, v, query_len=None, input_mask=None, **kwargs):
        seqlen = qk.size(1)
        if seqlen % self.n_buckets:
            raise ValueError(f"length {seqlen} is not a multiple of the {self.n_buckets} buckets")
        self.bucket_size = seqlen // self.n_buckets
        self._valid = input_mask
        try:
            return super().forward(qk, v, query_len=query_len, input_mask=input_mask, **kwargs)
        finally:
            self._valid = None

    def hash_vectors(self, n_buckets, vecs, key_namespace=None, fetch=False, set_cache=True):
        """The package's hash_vectors (rehash_each_round), with the two changes above."""
        batch_size, seqlen, dim = vecs.shape
        if self.training:
            rotations = torch.randn(1, dim, self.n_hashes, n_buckets // 2, dtype=vecs.dtype, device=vecs.device)
        else:
            rotations = self.eval_rotations.to(vecs.dtype)
        rotated = torch.einsum("btf,bfhi->bhti", self.dropout_for_hash(vecs), rotations.expand(batch_size, -1, -1, -1))
        buckets = torch.argmax(torch.cat([rotated, -rotated], dim=-1), dim=-1)  # batch x n_hashes x seqlen
        if self._valid is not None:
            buckets = buckets.masked_fill(~self._valid[:, None, :], n_buckets - 1)
        offsets = torch.arange(self.n_hashes, device=vecs.device).view(1, -1, 1) * n_buckets
        return (buckets + offsets).reshape(batch_size, -1)


class LSHEncoderAttention(nn.Module):
    """Batch-first LSH self-attention, B x N x d with a B x N padding mask (True at padding)."""

    def __init__(self, embed_dim: int, num_heads: int, n_buckets: int, n_hashes: int, dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.n_buckets, self.n_hashes = embed_dim, num_heads, n_buckets, n_hashes
        self.attention = LSHSelfAttention(
            embed_dim, heads=num_heads, bucket_size=1, n_hashes=n_hashes, dropout=dropout, full_attn_thres=0
        )
        self.attention.lsh_attn = PaddingAwareLSHAttention(
            n_buckets, embed_dim // num_heads, bucket_size=1, n_hashes=n_hashes, dropout=dropout
        )

    def extra_repr(self):
        return f"n_buckets={self.n_buckets}, n_hashes={self.n_hashes}"

    def _one_length(self, words: Tensor, L: int):
        bucket = math.ceil(L / self.n_buckets)
        T = bucket * self.n_buckets
        padded = nn.functional.pad(words, (0, 0, 0, T - L))
        valid = (torch.arange(T, device=words.device) < L).expand(words.size(0), T)
        return self.attention(padded, input_mask=valid)[:, :L], None

    def forward(self, x: Tensor, key_padding_mask=None):
        out, _ = run_by_length(self._one_length, x, key_padding_mask)
        return out, None
