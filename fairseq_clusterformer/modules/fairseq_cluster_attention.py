"""fairseq calling conventions for ClusterAttention.

fairseq's transformer layers call ``self.self_attn(query=x, key=x, value=x, key_padding_mask=...,
incremental_state=..., need_weights=..., attn_mask=...)`` with time-first T x B x C tensors and
expect ``(output, weights_or_None)``; the decoder layer also calls ``_get_input_buffer`` and beam
search calls ``reorder_incremental_state``. This adapter provides exactly that surface.

Centroids travel between encoder layers, and both losses travel to the criterion, through a
``ClusterCarrier`` shared by the layers of one encoder (or decoder): the encoder/decoder resets it
at the start of each forward, each clustering layer reads the previous layer's centroids from it
and appends its losses. This keeps fairseq's layer signatures untouched (no ``(x, loss)`` tuples
threaded through layers).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq.incremental_decoding_utils import with_incremental_state

from .cluster_attention import ClusterAttention


class ClusterCarrier:
    """Per-forward state shared by the clustering layers of one encoder or decoder."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.centroids: Optional[Tensor] = None  # B x K x d, from the previous encoder layer
        self.clustering_losses: List[Tensor] = []
        self.sorting_losses: List[Tensor] = []
        self.assignments: List[Tensor] = []  # per layer, B x T cluster ids (-1 at padding)

    def __getstate__(self):  # never pickle activations along with a model
        return {}

    def __setstate__(self, state):
        self.reset()


@with_incremental_state
class FairseqClusterAttention(nn.Module):
    """Wraps a ClusterAttention with fairseq's MultiheadAttention interface (self-attention only)."""

    def __init__(self, attention: ClusterAttention):
        super().__init__()
        self.attention = attention
        self.carrier: Optional[ClusterCarrier] = None
        self.takes_carried_centroids = False
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim  # read by fairseq's decoder layer (head scaling)

    def bind(self, carrier: ClusterCarrier, takes_carried_centroids: bool):
        """Attach to the encoder's/decoder's carrier. Encoder layers after the first take the
        previous layer's updated centroids, so their own centroid parameter is dropped (an unused
        parameter would also break DistributedDataParallel)."""
        self.carrier = carrier
        self.takes_carried_centroids = takes_carried_centroids
        if takes_carried_centroids:
            if self.attention.causal:
                raise ValueError("causal layers use their own learned centroids; they cannot take carried ones")
            self.attention.centroids = None

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
        """query/key/value: T x B x C (self-attention: key and value are query or None).

        ``attn_mask`` (the decoder's future mask) is not needed: the causal variant is causal by
        construction. Attention weights are never materialised, so the second output is None.
        """
        if static_kv or (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("ClusterAttention is self-attention only: key and value must be the query")
        if before_softmax:
            raise ValueError("ClusterAttention does not expose pre-softmax scores")
        x = query.transpose(0, 1)  # B x T x C
        if incremental_state is not None:
            if not self.attention.causal:
                raise ValueError("incremental decoding needs the causal (decoder) variant")
            return self._forward_incremental(x, key_padding_mask, incremental_state), None

        centroids = None
        if self.takes_carried_centroids:
            centroids = self.carrier.centroids if self.carrier is not None else None
            if centroids is None:
                raise RuntimeError(
                    "this clustering layer expects the previous layer's centroids, but none were "
                    "carried: call the encoder (which resets the carrier), not the layer alone"
                )
        out, info = self.attention(x, key_padding_mask, centroids=centroids)
        if self.carrier is not None:
            self.carrier.centroids = info.centroids
            self.carrier.clustering_losses.append(info.clustering_loss)
            self.carrier.sorting_losses.append(info.sorting_loss)
            self.carrier.assignments.append(info.assignments)
        return out.transpose(0, 1), None

    def _forward_incremental(self, x: Tensor, key_padding_mask: Optional[Tensor], incremental_state) -> Tensor:
        state = self._get_input_buffer(incremental_state)
        if not state:
            state = self.attention.init_state(x.size(0), x.device, x.dtype, mode="auto")
        outs = []
        # fairseq's generator feeds one position per call; a longer chunk (e.g. a forced prefix
        # replayed at once) is decoded position by position so the cache stays exact.
        for t in range(x.size(1)):
            pad = None
            if key_padding_mask is not None:
                pad = key_padding_mask[:, key_padding_mask.size(1) - x.size(1) + t]
            y, state = self.attention.step(x[:, t : t + 1], state, key_padding_mask=pad)
            outs.append(y)
        self._set_input_buffer(incremental_state, state)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.transpose(0, 1)

    def _get_input_buffer(self, incremental_state) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state, buffer: Dict[str, Optional[Tensor]]):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Beam search: reorder the per-cluster caches (batch is dim 0 of every cached tensor)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            incremental_state = self._set_input_buffer(
                incremental_state, ClusterAttention.reorder_state(buffer, new_order)
            )
        return incremental_state
