"""The ``clusterformer`` model: fairseq's transformer with neural clustering self-attention.

Only the self-attention of encoder and decoder layers is swapped; cross-attention, embeddings,
FFNs and everything else are fairseq's. Encoder layers pass their updated centroids on to the next
layer; decoder layers use their own learned centroids (so decoding stays causal and incremental
decoding exact, see docs/attention.md). The forward's extra output carries the two clustering
losses, averaged over the clustering layers, for the criterion.
"""
import argparse
from dataclasses import dataclass, field
from typing import Optional

import torch

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import fsdp_wrap
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big,
)
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.utils import safe_getattr

from ..modules.cluster_attention import ClusterAttention, parse_num_clusters
from ..modules.fairseq_cluster_attention import ClusterCarrier, FairseqClusterAttention

ATTENTION_CHOICES = ChoiceEnum(["cluster", "full"])
SIMILARITY_CHOICES = ChoiceEnum(["cosine", "dot"])


# Names avoid the encoder_/decoder_ prefixes, which TransformerConfig reroutes to its sub-configs.
@dataclass
class ClusterformerConfig(FairseqDataclass):
    num_clusters: str = field(
        default="3",
        metadata={"help": "encoder clusters k per layer (the paper: 3 for MT), or 'auto' for "
                  "ceil(sqrt(L)) per sentence (the paper's setting for long texts)"},
    )
    causal_num_clusters: Optional[int] = field(
        default=None,
        metadata={"help": "decoder clusters per layer (default: --num-clusters; must be an integer, "
                  "since the decoder does not know the final length)"},
    )
    causal_window: int = field(
        default=64,
        metadata={"help": "decoder: each word attends to the most recent W words of its own cluster "
                  "(itself included). Fixed, so incremental decoding is exact; costs O(W) per word"},
    )
    causal_local_heads: str = field(
        default="half",
        metadata={"help": "decoder: how many of each layer's heads attend to the most recent W words "
                  "of any cluster (a sliding causal window) instead of the word's own cluster; the "
                  "other heads stay clustered. An integer, or 'half' (default: without local heads "
                  "the decoder loops at generation, docs/results.md); 0: all heads clustered"},
    )
    no_previous_block: bool = field(
        default=False,
        metadata={"help": "encoder: blocks attend only to themselves (w keys) instead of also to the "
                  "previous block of the sorted sequence (2w keys, the paper)"},
    )
    cluster_similarity: SIMILARITY_CHOICES = field(
        default="cosine",
        metadata={"help": "similarity in the clustering and sorting losses: cosine (bounded; default) "
                  "or dot (the paper's dot product, divided by d)"},
    )
    max_clusters: int = field(
        default=256,
        metadata={"help": "largest number of clusters; with --num-clusters auto, the number of "
                  "learned first-layer centroids (k is clipped to it)"},
    )
    self_attention_encoder: ATTENTION_CHOICES = field(
        default="cluster", metadata={"help": "encoder self-attention: cluster (ClusterFormer) or full"}
    )
    self_attention_decoder: ATTENTION_CHOICES = field(
        default="cluster", metadata={"help": "decoder self-attention: cluster (causal ClusterFormer) or full"}
    )


CLUSTER_DEFAULTS = ClusterformerConfig()


def _local_heads(cfg, num_heads: int) -> int:
    local = safe_getattr(cfg, "causal_local_heads", None)
    if local is None or str(local).strip().lower() == "half":
        return num_heads // 2
    try:
        local = int(local)
    except ValueError:
        raise ValueError(f"--causal-local-heads must be an integer or 'half', got {local!r}") from None
    if not 0 <= local <= num_heads:
        raise ValueError(f"--causal-local-heads must be in [0, {num_heads}] (the decoder heads), got {local}")
    return local


def build_cluster_attention(cfg, embed_dim: int, num_heads: int, causal: bool) -> FairseqClusterAttention:
    num_clusters = parse_num_clusters(str(safe_getattr(cfg, "num_clusters", CLUSTER_DEFAULTS.num_clusters)))
    if causal:
        causal_k = safe_getattr(cfg, "causal_num_clusters", None)
        if causal_k is None:
            if num_clusters == "auto":
                raise ValueError(
                    "--num-clusters auto applies to the encoder only: give the decoder an integer "
                    "with --causal-num-clusters"
                )
            causal_k = num_clusters
        num_clusters = parse_num_clusters(causal_k)
    if safe_getattr(cfg, "cross_self_attention", False):
        raise ValueError("--cross-self-attention is not supported with clustering self-attention")
    attention = ClusterAttention(
        embed_dim,
        num_heads,
        num_clusters,
        causal=causal,
        window=safe_getattr(cfg, "causal_window", CLUSTER_DEFAULTS.causal_window),
        local_heads=_local_heads(cfg, num_heads) if causal else 0,
        previous_block=not safe_getattr(cfg, "no_previous_block", False),
        max_clusters=safe_getattr(cfg, "max_clusters", CLUSTER_DEFAULTS.max_clusters),
        similarity=str(safe_getattr(cfg, "cluster_similarity", CLUSTER_DEFAULTS.cluster_similarity)),
        dropout=cfg.attention_dropout,
    )
    return FairseqClusterAttention(attention)


class ClusterformerEncoderLayer(TransformerEncoderLayerBase):
    def build_self_attention(self, embed_dim, cfg):
        if safe_getattr(cfg, "self_attention_encoder", "cluster") == "full":
            return super().build_self_attention(embed_dim, cfg)
        return build_cluster_attention(cfg, embed_dim, cfg.encoder.attention_heads, causal=False)


class ClusterformerDecoderLayer(TransformerDecoderLayerBase):
    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        if safe_getattr(cfg, "self_attention_decoder", "cluster") == "full":
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv/add_zero_attn are not supported with clustering self-attention")
        return build_cluster_attention(cfg, embed_dim, cfg.decoder.attention_heads, causal=True)


def _cluster_attentions(layers):
    return [m for layer in layers for m in layer.modules() if isinstance(m, FairseqClusterAttention)]


class ClusterformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        super().__init__(cfg, dictionary, embed_tokens, return_fc)
        self.cluster_carrier = ClusterCarrier()
        for i, attn in enumerate(_cluster_attentions(self.layers)):
            attn.bind(self.cluster_carrier, takes_carried_centroids=i > 0)

    def build_encoder_layer(self, cfg):
        return _wrap_layer(ClusterformerEncoderLayer(cfg, return_fc=self.return_fc), cfg)

    def forward(self, src_tokens, src_lengths: Optional[torch.Tensor] = None, return_all_hiddens: bool = False,
                token_embeddings: Optional[torch.Tensor] = None):
        self.cluster_carrier.reset()
        return super().forward(src_tokens, src_lengths, return_all_hiddens, token_embeddings)


class ClusterformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self.cluster_carrier = ClusterCarrier()
        for attn in _cluster_attentions(self.layers):
            attn.bind(self.cluster_carrier, takes_carried_centroids=False)

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return _wrap_layer(ClusterformerDecoderLayer(cfg, no_encoder_attn), cfg)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False,
                full_context_alignment=False, alignment_layer=None, alignment_heads=None, src_lengths=None,
                return_all_hiddens=False):
        self.cluster_carrier.reset()
        return super().forward(
            prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state,
            features_only=features_only, full_context_alignment=full_context_alignment,
            alignment_layer=alignment_layer, alignment_heads=alignment_heads, src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
        )


def _wrap_layer(layer, cfg):
    """fsdp_wrap as fairseq's build_*_layer do. Activation checkpointing is refused: recomputing a
    layer in the backward pass would read the carrier's centroids as they are *then* (the last
    layer's), silently giving wrong gradients."""
    if cfg.checkpoint_activations or safe_getattr(cfg, "offload_activations", False):
        raise ValueError(
            "--checkpoint-activations/--offload-activations are not supported by the clusterformer "
            "model (centroids flow between layers outside the checkpointed call)"
        )
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap)


@register_model("clusterformer")
class ClusterformerModel(TransformerModel):
    """Transformer with ClusterFormer neural clustering self-attention (Wang et al., ACL 2022)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, ClusterformerConfig(), delete_default=True, with_prefix="")
        # Recorded in every new model's args, so that its absence marks a checkpoint from before
        # the option existed (see _set_cluster_defaults).
        parser.set_defaults(causal_local_heads=CLUSTER_DEFAULTS.causal_local_heads)

    @classmethod
    def build_model(cls, args, task):
        clusterformer_base(args)  # defaults for models built without a named clusterformer arch
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        from fairseq.models.transformer import TransformerConfig

        return ClusterformerEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        from fairseq.models.transformer import TransformerConfig

        return ClusterformerDecoder(
            TransformerConfig.from_namespace(args), tgt_dict, embed_tokens,
            no_encoder_attn=safe_getattr(args, "no_cross_attention", False),
        )

    def forward(self, src_tokens, src_lengths, prev_output_tokens, return_all_hiddens: bool = True,
                features_only: bool = False, alignment_layer: Optional[int] = None,
                alignment_heads: Optional[int] = None):
        decoder_out = super().forward(
            src_tokens, src_lengths, prev_output_tokens, return_all_hiddens=return_all_hiddens,
            features_only=features_only, alignment_layer=alignment_layer, alignment_heads=alignment_heads,
        )
        clustering, sorting = self.get_cluster_losses()
        decoder_out[1]["clustering_loss"] = clustering
        decoder_out[1]["sorting_loss"] = sorting
        return decoder_out

    def get_cluster_losses(self):
        """Both losses of the last forward, each averaged over the clustering layers (None if the
        model has no clustering layer)."""
        carriers = (self.encoder.cluster_carrier, self.decoder.cluster_carrier)
        clustering = [loss for c in carriers for loss in c.clustering_losses]
        sorting = [loss for c in carriers for loss in c.sorting_losses]
        if not clustering:
            return None, None
        return torch.stack(clustering).mean(), torch.stack(sorting).mean()


def _set_cluster_defaults(args):
    if isinstance(args, argparse.Namespace) and "causal_local_heads" not in vars(args):
        # fairseq-train always records this option ("half" unless given), so its absence means a
        # checkpoint saved before the option existed, whose decoder had no local heads. (The arch
        # functions run on a loaded checkpoint's args before build_model does.)
        args.causal_local_heads = "0"
    for name in ("num_clusters", "causal_num_clusters", "causal_window", "causal_local_heads", "no_previous_block",
                 "cluster_similarity", "max_clusters", "self_attention_encoder", "self_attention_decoder"):
        if safe_getattr(args, name, None) is None and getattr(CLUSTER_DEFAULTS, name) is not None:
            setattr(args, name, getattr(CLUSTER_DEFAULTS, name))


@register_model_architecture("clusterformer", "clusterformer")
def clusterformer_base(args):
    _set_cluster_defaults(args)
    transformer_wmt_en_de(args)


@register_model_architecture("clusterformer", "clusterformer_iwslt")
def clusterformer_iwslt(args):
    """The paper's IWSLT14 setting: 6+6 layers, d 512, 8 heads, FFN 1024, k = 3."""
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 8)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 8)
    _set_cluster_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("clusterformer", "clusterformer_wmt_en_de")
def clusterformer_wmt_en_de(args):
    """Transformer base (6+6, d 512, 8 heads, FFN 2048), k = 3."""
    _set_cluster_defaults(args)
    transformer_wmt_en_de(args)


@register_model_architecture("clusterformer", "clusterformer_wmt_en_de_big")
def clusterformer_wmt_en_de_big(args):
    """Transformer big (d 1024, 16 heads, FFN 4096), k = 3."""
    _set_cluster_defaults(args)
    transformer_wmt_en_de_big(args)
