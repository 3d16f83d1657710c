"""fairseq calling conventions for ClusterAttention.

fairseq's transformer layers call ``self.self_attn(query=x, key=x, value=x, key_padding_mask=...,
incremental_state=..., need_weights=..., attn_mask=...)`` with time-first T x B x C tensors and
expect ``(output, weights_or_None)``; the decoder layer also calls ``_get_input_buffer`` and beam
search calls ``reorder_incremental_state``. This adapter provides exactly that surface.

Centroids and losses travel as arguments and return values: the model's encoder layers call
``attend(x, padding_mask, centroids)``, which returns the layer's ClusterInfo (its updated
centroids for the next layer, its losses for the criterion); see models/clusterformer.py. When
fairseq's own decoder-layer code calls ``forward``, the ClusterInfo of that call is left in
``last_info`` for the calling layer to return, within the same layer call.
"""

from typing import Dict, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from .cluster_attention import ClusterAttention, ClusterInfo


def check_self_attention_call(query, key, value, static_kv: bool, before_softmax: bool, what: str):
    """The fairseq MultiheadAttention call options that a self-attention-only adapter refuses."""
    if static_kv or (key is not None and key is not query) or (value is not None and value is not query):
        raise ValueError(f"{what} is self-attention only: key and value must be the query")
    if before_softmax:
        raise ValueError(f"{what} does not expose pre-softmax scores")


class InputBufferMixin:
    """fairseq's ``_get_input_buffer`` / ``_set_input_buffer`` on one "attn_state" entry (the
    class must also be decorated with ``with_incremental_state``)."""

    def _get_input_buffer(self, incremental_state) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state, buffer: Dict[str, Optional[Tensor]]):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)


@with_incremental_state
class FairseqClusterAttention(InputBufferMixin, nn.Module):
    """Wraps a ClusterAttention with fairseq's MultiheadAttention interface (self-attention only).

    An encoder layer after the first clusters with the previous layer's updated centroids: build
    its attention with ``learned_centroids=False`` (no centroid parameter; an unused one would
    also break DistributedDataParallel), and ``attend`` must then be given centroids.
    """

    def __init__(self, attention: ClusterAttention):
        super().__init__()
        self.attention = attention
        # An encoder layer without its own centroids takes the previous layer's (the router of a
        # baseline decoder replaces the centroids instead).
        self.takes_carried_centroids = attention.centroids is None and attention.router is None
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim  # read by fairseq's decoder layer (head scaling)
        self.last_info: Optional[ClusterInfo] = None

    def attend(
        self, x: Tensor, key_padding_mask: Optional[Tensor], centroids: Optional[Tensor] = None
    ) -> Tuple[Tensor, ClusterInfo]:
        """Full-sequence self-attention, x: T x B x C. Returns (T x B x C output, ClusterInfo).

        fairseq's encoders and decoders pass a padding mask only when the batch has padding
        (they check it once per forward), so the layer is told to assume it (no host sync per
        layer); a mask without padding would give the same output, a little slower."""
        if self.takes_carried_centroids and centroids is None:
            raise ValueError("this clustering layer takes the previous layer's centroids, and none were given")
        out, info = self.attention(
            x.transpose(0, 1), key_padding_mask, centroids=centroids, assume_padding=key_padding_mask is not None
        )
        return out.transpose(0, 1), info

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
        The call's ClusterInfo is left in ``last_info`` (None in incremental decoding).
        """
        check_self_attention_call(query, key, value, static_kv, before_softmax, "ClusterAttention")
        if incremental_state is not None:
            if not self.attention.causal:
                raise ValueError("incremental decoding needs the causal (decoder) variant")
            self.last_info = None
            return self._forward_incremental(query.transpose(0, 1), key_padding_mask, incremental_state), None
        out, self.last_info = self.attend(query, key_padding_mask)
        return out, None

    def take_info(self) -> Optional[ClusterInfo]:
        """The ClusterInfo that the latest ``forward`` left, cleared (activations are not kept
        on the module beyond the layer call that produced them)."""
        info, self.last_info = self.last_info, None
        return info

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

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Beam search: reorder the per-cluster caches (batch is dim 0 of every cached tensor)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            incremental_state = self._set_input_buffer(
                incremental_state, ClusterAttention.reorder_state(buffer, new_order)
            )
        return incremental_state
