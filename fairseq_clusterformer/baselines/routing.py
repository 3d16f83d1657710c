"""Routing Transformer self-attention (routing-transformer's SelfAttention) for the encoder.

From the package, unchanged: the local heads (local-attention's windowed attention with rotary
positions, one window back and forward) beside the routed heads, the routed heads' k-means
routing (each cluster takes the ``window`` words nearest its mean, by top-k; attention within
each cluster's window; outputs of a word routed to several clusters averaged, of a word routed
to none zero), the commitment loss (MSE of a word's unit vector to its mean), the output
projection. Changed here:

- **sizes per sentence**: the layer has k clusters (ClusterFormer's k); the routing window and
  the local window are ceil(L / k) for a sentence of L words (grouping.run_by_length: each
  length is run without padding), so each sentence is cut into k groups whatever its batch;
- **padding**: the length is rounded up to k windows with zero vectors, masked as keys and given
  the lowest score for every cluster, so the top-k never routes them in place of a word; the
  commitment loss and the k-means statistics count real words only;
- **k-means means**: updated once per optimizer step from the words of all micro-batches and,
  under DDP, of all processes (kmeans.py), instead of on each backward of one process; the
  package's 10-iteration initialisation on the first batch is replaced by the first update;
- the commitment loss is returned unweighted; the criterion weights it
  (``--commitment-loss-weight``, the package's 1e-4 by default).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from local_attention import LocalAttention
from routing_transformer.routing_transformer import Kmeans, SelfAttention, batched_index_select, expand_dim
from torch import Tensor, nn

from . import kmeans
from .grouping import run_by_length


class PaddingAwareKmeans(Kmeans):
    """The package's Kmeans with padding excluded (``valid``, set by the caller for one call)
    and the means updated by kmeans.apply_pending."""

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int, ema_decay: float):
        super().__init__(num_heads, head_dim, num_clusters, ema_decay, commitment=1.0)
        with torch.no_grad():
            self.means.copy_(F.normalize(self.means, dim=-1))
        self.valid: Optional[Tensor] = None
        kmeans.init_pending(self)

    def init(self, x):
        pass  # the first update sets the means (kmeans.py)

    def forward(self, x, update_means=False):
        b, dtype = x.shape[0], x.dtype
        means = self.means.type(dtype)
        x = F.normalize(x, 2, dim=-1).type(dtype)
        with torch.no_grad():
            dists = torch.einsum("bhld,hcd->bhlc", x, means)
            buckets = dists.argmax(-1)
            if self.valid is not None:  # padding: last for every cluster's top-k
                dists = dists.masked_fill(~self.valid[:, None, :, None], torch.finfo(dists.dtype).min)
        routed = batched_index_select(expand_dim(means, 0, b), buckets)
        err = (x - routed).pow(2).mean(-1)  # b x h x n
        if self.valid is None:
            loss = err.mean()
        else:
            w = self.valid[:, None, :].to(err.dtype)
            loss = (err * w).sum() / (w.sum() * err.size(1)).clamp(min=1)
        if update_means:
            kmeans.accumulate(self, x.detach(), buckets, self.valid)
        return dists, loss * self.commitment

    def set_num_updates(self, num_updates: int):
        kmeans.apply_pending(self, num_updates)


class _Float32LocalAttention(LocalAttention):
    """The package's local attention, computed in float32 and returned in the input's dtype.

    local-attention applies its rotary position embedding in float32, so in fp16/bf16 the
    attention weights come out float32 and meet half-precision values ("expected scalar type
    Float but found BFloat16"). Running the local heads in float32 is what the package computes
    in fp32, and costs little: they are half of the heads over windows of N/k words."""

    def forward(self, q, k, v, *args, **kwargs):
        dtype = q.dtype
        if dtype in (torch.float32, torch.float64):
            return super().forward(q, k, v, *args, **kwargs)
        return super().forward(q.float(), k.float(), v.float(), *args, **kwargs).to(dtype)


class RoutingEncoderAttention(nn.Module):
    """Batch-first routing self-attention, B x N x d with a B x N padding mask (True at padding).
    Returns (output, commitment loss: mean over real words, heads and dimensions)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_clusters: int,
        local_heads: int,
        dropout: float = 0.0,
        ema_decay: float = 0.999,
    ):
        super().__init__()
        if not 0 <= local_heads < num_heads:
            raise ValueError(f"routing needs at least one routed head: local heads must be in [0, {num_heads})")
        self.embed_dim, self.num_heads, self.num_clusters, self.local_heads = (
            embed_dim,
            num_heads,
            num_clusters,
            local_heads,
        )
        # max_seq_len / window_size is the package's cluster count; the window is set per call.
        self.attention = SelfAttention(
            embed_dim,
            depth=1,
            max_seq_len=num_clusters,
            heads=num_heads,
            local_attn_heads=local_heads,
            window_size=1,
            attn_dropout=dropout,
            kmeans_ema_decay=ema_decay,
        )
        if local_heads > 0:  # the same module, with a dtype-safe forward (see _Float32LocalAttention)
            self.attention.local_attn.__class__ = _Float32LocalAttention
        self.attention.global_attn.kmeans = PaddingAwareKmeans(
            num_heads - local_heads, embed_dim // num_heads, num_clusters, ema_decay
        )

    def extra_repr(self):
        return f"num_clusters={self.num_clusters}, local_heads={self.local_heads}"

    def _one_length(self, words: Tensor, L: int):
        w = math.ceil(L / self.num_clusters)
        T = w * self.num_clusters
        padded = F.pad(words, (0, 0, 0, T - L))
        valid = (torch.arange(T, device=words.device) < L).expand(words.size(0), T)
        attn = self.attention
        attn.global_attn.window_size = w
        if attn.local_attn_heads > 0:
            attn.local_attn.window_size = w
        attn.global_attn.kmeans.valid = torch.cat([valid, valid], 1)  # queries, then keys
        try:
            out, loss = attn(padded, input_mask=valid if T > L else None)
        finally:
            attn.global_attn.kmeans.valid = None
        return out[:, :L], loss

    def forward(self, x: Tensor, key_padding_mask=None):
        return run_by_length(self._one_length, x, key_padding_mask)
