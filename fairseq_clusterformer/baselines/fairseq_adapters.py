"""fairseq calling conventions for the encoder baselines (lsh.py, routing.py).

Like modules/fairseq_cluster_attention.py: time-first T x B x C in and out, ``key_padding_mask``
(B x T, True at padding), ``(output, None)`` from ``forward``, and the incremental-state methods
(``_get_input_buffer``, ``reorder_incremental_state``) that fairseq's layers and beam search call.
These modules are encoder self-attention only: incremental decoding is refused (the decoder
baselines are ClusterAttention with a router, routers.py). The model's encoder layer calls
``attend``, which returns the layer's ClusterInfo: no centroids and no clustering losses, and
the routing baseline's commitment loss in ``commitment_loss``.
"""

from typing import Dict, Optional, Tuple

from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from ..modules.cluster_attention import ClusterInfo
from ..modules.fairseq_cluster_attention import InputBufferMixin, check_self_attention_call


@with_incremental_state
class FairseqBaselineAttention(InputBufferMixin, nn.Module):
    """Wraps a batch-first baseline attention, ``attention(x, key_padding_mask) -> (out, loss|None)``."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.embed_dim // attention.num_heads

    def attend(
        self, x: Tensor, key_padding_mask: Optional[Tensor], centroids: Optional[Tensor] = None
    ) -> Tuple[Tensor, ClusterInfo]:
        """x: T x B x C. Returns (T x B x C output, ClusterInfo with only ``commitment_loss``)."""
        if centroids is not None:
            raise ValueError(f"{type(self.attention).__name__} takes no centroids")
        out, loss = self.attention(x.transpose(0, 1), key_padding_mask)
        return out.transpose(0, 1), ClusterInfo(None, None, None, None, loss)

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
        """fairseq's MultiheadAttention signature (self-attention, encoder only). Weights are not
        returned; use ``attend`` to get the commitment loss."""
        check_self_attention_call(query, key, value, static_kv, before_softmax, "the baseline attention")
        if attn_mask is not None:
            raise ValueError("the baseline attentions take no attn_mask")
        if incremental_state is not None:
            raise ValueError(
                "the package baselines are encoder attention; "
                "the lsh/routing decoders are ClusterAttention with a router"
            )
        out, _ = self.attend(query, key_padding_mask)
        return out, None

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        return incremental_state  # nothing cached
