"""The ``clusterformer`` model: fairseq's transformer with neural clustering self-attention.

Only the self-attention of encoder and decoder layers is swapped; cross-attention, embeddings,
FFNs and everything else are fairseq's. Encoder layers pass their updated centroids on to the next
layer; decoder layers use their own learned centroids (so decoding stays causal and incremental
decoding exact, see docs/attention.md). The forward's extra output carries the two clustering
losses, averaged over the clustering layers, for the criterion.

The paper's baselines are choices of the same model (``--self-attention-encoder/-decoder lsh|routing``,
docs/baselines.md): on the encoder side the published reformer-pytorch / routing-transformer
attentions (fairseq_clusterformer/baselines, imported only when chosen), on the decoder side the
causal ClusterAttention with their assignment rule (a router). Routing layers' commitment losses,
averaged over those layers, go to the criterion beside the clustering losses. Two more
baselines need only torch (baselines/sparse.py, baselines/linformer.py): ``sparse`` (the Sparse
Transformer's fixed pattern, both sides) and ``linformer`` (encoder only: no causal form exists).
"""

import argparse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.utils import safe_getattr
from torch import Tensor

from ..modules.cluster_attention import COMPILE_MODES, ClusterAttention, parse_num_clusters
from ..modules.fairseq_cluster_attention import FairseqClusterAttention

# "linformer" is an encoder choice only; the decoder refuses it at build time, saying why.
ATTENTION_CHOICES = ChoiceEnum(["cluster", "full", "lsh", "routing", "sparse", "linformer"])
SIMILARITY_CHOICES = ChoiceEnum(["cosine", "dot"])
COMPILE_MODE_CHOICES = ChoiceEnum(list(COMPILE_MODES))
CLUSTER_IMPLS = ("fast", "flex")  # ClusterAttention's impl; "reference" (the O(N^2) oracle) is for tests
CLUSTER_IMPL_CHOICES = ChoiceEnum(list(CLUSTER_IMPLS))


# Names avoid the encoder_/decoder_ prefixes, which TransformerConfig reroutes to its sub-configs.
@dataclass
class ClusterformerConfig(FairseqDataclass):
    num_clusters: str = field(
        default="3",
        metadata={
            "help": "encoder clusters k per layer (the paper: 3 for MT), or 'auto' for "
            "ceil(sqrt(L)) per sentence (the paper's setting for long texts)"
        },
    )
    causal_num_clusters: Optional[int] = field(
        default=None,
        metadata={
            "help": "decoder clusters per layer (default: --num-clusters; must be an integer, "
            "since the decoder does not know the final length)"
        },
    )
    causal_window: int = field(
        default=64,
        metadata={
            "help": "decoder: each word attends to the most recent W words of its own cluster "
            "(itself included). Fixed, so incremental decoding is exact; costs O(W) per word"
        },
    )
    causal_local_heads: str = field(
        default="half",
        metadata={
            "help": "decoder: how many of each layer's heads attend to the most recent W words "
            "of any cluster (a sliding causal window) instead of the word's own cluster; the "
            "other heads stay clustered. An integer, or 'half' (default: without local heads "
            "the decoder loops at generation, docs/results.md); 0: all heads clustered"
        },
    )
    local_heads: str = field(
        default="0",
        metadata={
            "help": "encoder: how many of each clustering layer's heads (the first ones) attend "
            "to the same blocks cut from the words in their own order instead of in cluster "
            "order, the local-head budget of --self-attention-encoder routing. An integer, or "
            "'half'; 0 (default): every head clustered, as in the paper"
        },
    )
    no_previous_block: bool = field(
        default=False,
        metadata={
            "help": "encoder: blocks attend only to themselves (w keys) instead of also to the "
            "previous block of the sorted sequence (2w keys, the paper)"
        },
    )
    cluster_similarity: SIMILARITY_CHOICES = field(
        default="cosine",
        metadata={
            "help": "similarity in the clustering and sorting losses: cosine (bounded; default) "
            "or dot (the paper's dot product, divided by d)"
        },
    )
    max_clusters: int = field(
        default=256,
        metadata={
            "help": "largest number of clusters; with --num-clusters auto, the number of "
            "learned first-layer centroids (k is clipped to it)"
        },
    )
    self_attention_encoder: ATTENTION_CHOICES = field(
        default="cluster",
        metadata={
            "help": "encoder self-attention: cluster (ClusterFormer), full, lsh (Reformer's LSH attention, "
            "reformer-pytorch), routing (Routing Transformer, routing-transformer), sparse (Sparse "
            "Transformer's fixed pattern, blocks of ceil(L/k) words) or linformer (keys and values "
            "projected to --linformer-k rows); lsh and routing need the baselines extra (pip install -e "
            ".[baselines]); all but linformer size their buckets/windows/blocks from k (docs/baselines.md)"
        },
    )
    self_attention_decoder: ATTENTION_CHOICES = field(
        default="cluster",
        metadata={
            "help": "decoder self-attention: cluster (causal ClusterFormer), full, lsh (the causal "
            "clustering decoder with LSH buckets of fixed random rotations), routing (with the "
            "nearest EMA k-means mean) or sparse (Sparse Transformer's causal fixed pattern, blocks "
            "of --causal-window words); cluster, lsh, routing and sparse decode exactly with their own "
            "caches (docs/baselines.md). linformer is refused: no causal Linformer exists"
        },
    )
    lsh_n_hashes: int = field(
        default=8,
        metadata={
            "help": "encoder lsh: hashing rounds (the package's default 8; each round costs one more "
            "attention pass). The lsh decoder hashes once"
        },
    )
    routing_local_heads: str = field(
        default="half",
        metadata={
            "help": "encoder routing: how many heads are local (windowed) heads; the rest are routed "
            "(k-means) heads. An integer below the head count, or 'half' (default). The routing "
            "decoder's split is --causal-local-heads"
        },
    )
    cluster_compile: bool = field(
        default=False,
        metadata={
            "help": "run the clustering layers' fast path through torch.compile (dynamic shapes): the "
            "same outputs in far fewer kernel launches, for GPUs, where sentence-length inputs are "
            "launch-bound; the first batches compile (docs/benchmarks.md, GPU section)"
        },
    )
    cluster_compile_mode: COMPILE_MODE_CHOICES = field(
        default="default",
        metadata={
            "help": "torch.compile's mode for --cluster-compile: reduce-overhead (and max-autotune) also "
            "replay each compiled step as a CUDA graph, recorded once per input shape: bucket the lengths "
            "(--required-seq-len-multiple) so that few shapes are recorded"
        },
    )
    cluster_impl: CLUSTER_IMPL_CHOICES = field(
        default="fast",
        metadata={
            "help": "the clustering layers' implementation: fast (the block layout, any device) or flex "
            "(the same function with every head's block attention as one FlexAttention call; trains on "
            "CUDA only, no --attention-dropout; unmeasured on a GPU so far: docs/benchmarks.md)"
        },
    )
    linformer_k: int = field(
        default=32,
        metadata={
            "help": "encoder linformer: k, the rows that keys and values are projected to along the "
            "sequence (learned E, F of --max-source-positions x k per layer). A sentence of L > k "
            "words is compressed L/k-fold (docs/baselines.md)"
        },
    )


CLUSTER_DEFAULTS = ClusterformerConfig()
ROUTING_EMA_DECAY = 0.999  # the package's kmeans_ema_decay


def lsh_buckets(k: int) -> int:
    """LSH buckets for ClusterFormer's k: hashing by argmax over [xR; -xR] gives an even count,
    so k rounds up to the next even number (k = 3: 4 buckets)."""
    return 2 * -(-k // 2)


def _local_heads(cfg, num_heads: int, name: str = "causal_local_heads", missing: str = "half") -> int:
    local = safe_getattr(cfg, name, None)
    local = missing if local is None else local
    flag = "--" + name.replace("_", "-")
    if str(local).strip().lower() == "half":
        return num_heads // 2
    try:
        local = int(local)
    except ValueError:
        raise ValueError(f"{flag} must be an integer or 'half', got {local!r}") from None
    if not 0 <= local <= num_heads:
        raise ValueError(f"{flag} must be in [0, {num_heads}] (the heads), got {local}")
    return local


def build_cluster_attention(
    cfg, embed_dim: int, num_heads: int, causal: bool, takes_carried_centroids: bool = False, router: str = "cluster"
) -> FairseqClusterAttention:
    """``router``: the decoder's assignment rule: ``cluster`` (learned centroids), ``lsh`` or
    ``routing`` (baselines/routers.py; the rest of the causal layer is the same)."""
    num_clusters = _num_clusters(cfg, causal)
    if safe_getattr(cfg, "cross_self_attention", False):
        raise ValueError("--cross-self-attention is not supported with clustering self-attention")
    router_module = None
    if router != "cluster":
        from ..baselines.routers import LSHRouter, RoutingRouter

        if router == "lsh":
            num_clusters = lsh_buckets(num_clusters)
            router_module = LSHRouter(embed_dim, num_clusters)
        else:
            router_module = RoutingRouter(embed_dim, num_clusters, ROUTING_EMA_DECAY)
    attention = ClusterAttention(
        embed_dim,
        num_heads,
        num_clusters,
        causal=causal,
        window=safe_getattr(cfg, "causal_window", CLUSTER_DEFAULTS.causal_window),
        # The encoder's option is newer than the decoder's: a model without it has none.
        local_heads=_local_heads(cfg, num_heads) if causal else _local_heads(cfg, num_heads, "local_heads", "0"),
        learned_centroids=not takes_carried_centroids,
        previous_block=not safe_getattr(cfg, "no_previous_block", False),
        max_clusters=safe_getattr(cfg, "max_clusters", CLUSTER_DEFAULTS.max_clusters),
        similarity=str(safe_getattr(cfg, "cluster_similarity", CLUSTER_DEFAULTS.cluster_similarity)),
        dropout=cfg.attention_dropout,
        router=router_module,
        impl=_impl_setting(cfg),
        compile=_compile_setting(cfg),
    )
    return FairseqClusterAttention(attention)


def _impl_setting(cfg) -> str:
    impl = str(safe_getattr(cfg, "cluster_impl", CLUSTER_DEFAULTS.cluster_impl) or "fast")
    if impl not in CLUSTER_IMPLS:
        raise ValueError(f"--cluster-impl must be one of {', '.join(CLUSTER_IMPLS)}, got {impl!r}")
    return impl


def _compile_setting(cfg):
    """ClusterAttention's compile argument from --cluster-compile and --cluster-compile-mode."""
    if not safe_getattr(cfg, "cluster_compile", False):
        return False
    mode = str(safe_getattr(cfg, "cluster_compile_mode", "default") or "default")
    if mode not in COMPILE_MODES:
        raise ValueError(f"--cluster-compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return True if mode == "default" else mode


def _num_clusters(cfg, causal: bool):
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
    return num_clusters


def build_baseline_encoder_attention(cfg, embed_dim: int, num_heads: int, kind: str):
    """The published LSH or routing attention for an encoder layer (baselines/, docs/baselines.md)."""
    k = _num_clusters(cfg, causal=False)
    if k == "auto":
        raise ValueError(f"--self-attention-encoder {kind} needs an integer --num-clusters (not 'auto')")
    try:
        from ..baselines.fairseq_adapters import FairseqBaselineAttention

        if kind == "lsh":
            from ..baselines.lsh import LSHEncoderAttention

            n_hashes = int(safe_getattr(cfg, "lsh_n_hashes", CLUSTER_DEFAULTS.lsh_n_hashes))
            if n_hashes < 1:
                raise ValueError(f"--lsh-n-hashes must be >= 1, got {n_hashes}")
            attention = LSHEncoderAttention(embed_dim, num_heads, lsh_buckets(k), n_hashes, cfg.attention_dropout)
        else:
            from ..baselines.routing import RoutingEncoderAttention

            local = _local_heads(cfg, num_heads, "routing_local_heads")
            if local >= num_heads:
                raise ValueError(f"--routing-local-heads must leave a routed head (< {num_heads}), got {local}")
            attention = RoutingEncoderAttention(
                embed_dim, num_heads, k, local, cfg.attention_dropout, ROUTING_EMA_DECAY
            )
    except ImportError as e:
        raise ImportError(
            f"--self-attention-encoder {kind} needs the baselines extra: pip install -e .[baselines] ({e})"
        ) from e
    return FairseqBaselineAttention(attention)


LINFORMER_DECODER_REFUSED = (
    "--self-attention-decoder linformer is refused: a causal Linformer does not exist. Linformer "
    "projects the keys and values along the whole sequence (E K, F V, each row a mixture of all "
    "positions), so every projected row mixes future words into a word's attention, and masking "
    "cannot undo a mixture. Use linformer on the encoder side only, with another decoder "
    "(--self-attention-decoder full, sparse, cluster, lsh or routing)"
)


def build_torch_baseline_attention(cfg, embed_dim: int, num_heads: int, kind: str, causal: bool):
    """``sparse`` (both sides) or ``linformer`` (encoder only) self-attention, behind fairseq's
    attention interface (baselines/sparse.py, baselines/linformer.py; torch only)."""
    from ..baselines.sparse import FairseqSelfAttention, SparseAttention

    if safe_getattr(cfg, "cross_self_attention", False):
        raise ValueError(f"--cross-self-attention is not supported with {kind} self-attention")
    if kind == "linformer":
        if causal:
            raise ValueError(LINFORMER_DECODER_REFUSED)
        from ..baselines.linformer import LinformerAttention

        k = int(safe_getattr(cfg, "linformer_k", CLUSTER_DEFAULTS.linformer_k))
        if k < 1:
            raise ValueError(f"--linformer-k must be >= 1, got {k}")
        max_positions = safe_getattr(cfg, "max_source_positions", None)
        if not max_positions or int(max_positions) < 1:
            raise ValueError(f"linformer needs a positive --max-source-positions (its E, F rows), got {max_positions}")
        attention = LinformerAttention(embed_dim, num_heads, k, int(max_positions), cfg.attention_dropout)
    elif causal:  # a fixed block length, so that incremental decoding is exact
        window = int(safe_getattr(cfg, "causal_window", CLUSTER_DEFAULTS.causal_window))
        if window < 1:
            raise ValueError(f"--causal-window (the sparse decoder's block length) must be >= 1, got {window}")
        attention = SparseAttention(embed_dim, num_heads, causal=True, block_len=window, dropout=cfg.attention_dropout)
    else:  # blocks of ceil(L / k) per sentence; k = 'auto': ceil(sqrt(L))
        k = _num_clusters(cfg, causal=False)
        attention = SparseAttention(embed_dim, num_heads, num_blocks=k, dropout=cfg.attention_dropout)
    return FairseqSelfAttention(attention)


class ClusterformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer whose self-attention clusters; centroids in, centroids out.

    ``forward(x, encoder_padding_mask, attn_mask=None, centroids=None)`` returns
    ``(x, centroids', clustering_loss, sorting_loss, commitment_loss)``: all tensors or None (the
    losses a layer's attention does not have), so fairseq's activation checkpointing recomputes
    the layer from the same centroids. With ``lsh``/``routing`` the self-attention is a
    baselines.FairseqBaselineAttention (no centroids; routing has a commitment loss). With
    ``sparse``/``linformer`` it is a baselines.sparse.FairseqSelfAttention, which fairseq's own
    layer code calls (the four extra outputs are None).
    """

    def __init__(self, cfg, takes_carried_centroids: bool, return_fc=False):
        self.takes_carried_centroids = takes_carried_centroids
        super().__init__(cfg, return_fc)
        if return_fc:
            raise ValueError("return_fc is not supported by the clusterformer encoder")

    def build_self_attention(self, embed_dim, cfg):
        kind = str(safe_getattr(cfg, "self_attention_encoder", "cluster"))
        if kind == "full":
            return super().build_self_attention(embed_dim, cfg)
        if kind in ("lsh", "routing"):
            return build_baseline_encoder_attention(cfg, embed_dim, cfg.encoder.attention_heads, kind)
        if kind in ("sparse", "linformer"):  # fairseq's own layer code calls them (no ``attend``)
            return build_torch_baseline_attention(cfg, embed_dim, cfg.encoder.attention_heads, kind, causal=False)
        return build_cluster_attention(
            cfg,
            embed_dim,
            cfg.encoder.attention_heads,
            causal=False,
            takes_carried_centroids=self.takes_carried_centroids,
        )

    def forward(
        self,
        x,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
        centroids: Optional[Tensor] = None,
    ):
        if not hasattr(self.self_attn, "attend"):  # fairseq's MultiheadAttention
            return super().forward(x, encoder_padding_mask, attn_mask), None, None, None, None
        if attn_mask is not None:
            raise ValueError("clustering and baseline self-attention take no attn_mask")
        # fairseq's TransformerEncoderLayerBase.forward, with the self-attention call made
        # explicit so that centroids go in and the layer's ClusterInfo comes out.
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, info = self.self_attn.attend(x, encoder_padding_mask, centroids)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.activation_fn(self.fc1(x))
        x = self.activation_dropout_module(x)
        x = self.fc2(x)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, info.centroids, info.clustering_loss, info.sorting_loss, info.commitment_loss


class ClusterformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer whose self-attention clusters (with its own learned centroids).

    Returns fairseq's ``(x, attn, self_attn_state)`` plus the layer's clustering, sorting and
    commitment losses (None in incremental decoding and where the attention has no such loss),
    as outputs of the layer call, so that they keep their gradients under activation
    checkpointing. ``lsh`` and ``routing`` are the same causal clustering attention with another
    assignment rule (baselines/routers.py).
    """

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        kind = str(safe_getattr(cfg, "self_attention_decoder", "cluster"))
        if kind == "full":
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        if add_bias_kv or add_zero_attn:
            raise ValueError(f"add_bias_kv/add_zero_attn are not supported with {kind} self-attention")
        if kind in ("sparse", "linformer"):
            return build_torch_baseline_attention(cfg, embed_dim, cfg.decoder.attention_heads, kind, causal=True)
        return build_cluster_attention(cfg, embed_dim, cfg.decoder.attention_heads, causal=True, router=kind)

    def forward(self, *args, **kwargs):
        x, attn, self_attn_state = super().forward(*args, **kwargs)
        info = self.self_attn.take_info() if isinstance(self.self_attn, FairseqClusterAttention) else None
        if info is None:
            return x, attn, self_attn_state, None, None, None
        return x, attn, self_attn_state, info.clustering_loss, info.sorting_loss, info.commitment_loss


class ClusterformerEncoder(TransformerEncoderBase):
    """Layer i clusters with the centroids that layer i-1 updated (layer 0: its learned ones).

    Besides fairseq's keys, the encoder output holds ``clustering_losses`` and
    ``sorting_losses`` (one scalar per clustering layer, for the criterion) and
    ``cluster_assignments`` (B x T per layer, for inspection).
    """

    # The layout of the clusterformer parts of the state dict, stamped as
    # "<name>.clusterformer_version". 1: checkpoints from before the stamp (the same layout).
    STATE_VERSION = 2

    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        super().__init__(cfg, dictionary, embed_tokens, return_fc)
        self.register_buffer("clusterformer_version", torch.tensor([float(self.STATE_VERSION)]))

    def upgrade_state_dict_named(self, state_dict, name):
        """fairseq's upgrades, then ours, by the stamped version (1 when there is none): the
        layers after the first take the previous layer's centroids and own no centroid
        parameter, so a stray one (saved by code that built the attention with its own
        centroids and dropped them later) is removed; then the stamp is set."""
        state_dict = super().upgrade_state_dict_named(state_dict, name)
        key = f"{name}.clusterformer_version" if name else "clusterformer_version"
        version = int(state_dict[key].item()) if key in state_dict else 1
        if version > self.STATE_VERSION:
            raise ValueError(
                f"{key} is {version}: the checkpoint was saved by a newer fairseq-clusterformer "
                f"(this one reads versions up to {self.STATE_VERSION}); upgrade the plugin"
            )
        if version < 2:
            prefix = f"{name}.layers." if name else "layers."
            for stale in [
                k for k in state_dict if k.startswith(prefix) and k.endswith(".self_attn.attention.centroids")
            ]:
                if int(stale[len(prefix) :].split(".")[0]) > 0:
                    del state_dict[stale]
        state_dict[key] = torch.tensor([float(self.STATE_VERSION)])
        return state_dict

    def build_encoder_layer(self, cfg):
        # Called once per layer, in order, by TransformerEncoderBase.__init__.
        self._built_layers = getattr(self, "_built_layers", 0) + 1
        layer = ClusterformerEncoderLayer(cfg, takes_carried_centroids=self._built_layers > 1)
        return _wrap_layer(layer, cfg)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
    ):
        # fairseq's TransformerEncoderBase.forward_scriptable, with centroids passed from layer
        # to layer and each layer's losses collected.
        encoder_padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = bool(encoder_padding_mask.any())
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        if has_pads:
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        encoder_states = [x] if return_all_hiddens else []
        centroids = None
        clustering_losses, sorting_losses, commitment_losses = [], [], []
        for layer in self.layers:
            x, centroids, clustering_loss, sorting_loss, commitment_loss = layer(
                x, encoder_padding_mask=encoder_padding_mask if has_pads else None, centroids=centroids
            )
            if clustering_loss is not None:
                clustering_losses.append(clustering_loss)
                sorting_losses.append(sorting_loss)
            if commitment_loss is not None:
                commitment_losses.append(commitment_loss)
            if return_all_hiddens:
                encoder_states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [encoder_padding_mask],  # B x T
            "encoder_embedding": [encoder_embedding],  # B x T x C
            "encoder_states": encoder_states,  # List[T x B x C]
            "fc_results": [],
            "src_tokens": [],
            "src_lengths": [src_lengths],
            "clustering_losses": clustering_losses,
            "sorting_losses": sorting_losses,
            "commitment_losses": commitment_losses,
        }


class ClusterformerDecoder(TransformerDecoderBase):
    """fairseq's decoder; its extra output also holds ``clustering_losses`` and
    ``sorting_losses`` (one scalar per clustering layer; empty in incremental decoding)."""

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return _wrap_layer(ClusterformerDecoderLayer(cfg, no_encoder_attn), cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out: Optional[Dict[str, List[Tensor]]],
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        # fairseq's TransformerDecoderBase.extract_features_scriptable, collecting each layer's
        # clustering losses (returned by the layer call).
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc = encoder_out["encoder_out"][0] if encoder_out is not None and encoder_out["encoder_out"] else None
        padding_mask = None
        if encoder_out is not None and encoder_out["encoder_padding_mask"]:
            padding_mask = encoder_out["encoder_padding_mask"][0]

        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        self_attn_padding_mask = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)

        attn = None
        inner_states = [x]
        clustering_losses, sorting_losses, commitment_losses = [], [], []
        for idx, layer in enumerate(self.layers):
            self_attn_mask = None
            if incremental_state is None and not full_context_alignment:
                self_attn_mask = self.buffered_future_mask(x)
            x, layer_attn, _, clustering_loss, sorting_loss, commitment_loss = layer(
                x,
                enc,
                padding_mask,
                incremental_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=bool(idx == alignment_layer),
                need_head_weights=bool(idx == alignment_layer),
            )
            if clustering_loss is not None:
                clustering_losses.append(clustering_loss)
                sorting_losses.append(sorting_loss)
            if commitment_loss is not None:
                commitment_losses.append(commitment_loss)
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)
        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average probabilities over heads
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {
            "attn": [attn],
            "inner_states": inner_states,
            "clustering_losses": clustering_losses,
            "sorting_losses": sorting_losses,
            "commitment_losses": commitment_losses,
        }


def _wrap_layer(layer, cfg):
    """Activation checkpointing and fsdp_wrap, as fairseq's build_*_layer do."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # When checkpointing, fairseq does not wrap small layers with FSDP (as its own build_*_layer).
    min_params_to_wrap = cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


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
            TransformerConfig.from_namespace(args),
            tgt_dict,
            embed_tokens,
            no_encoder_attn=safe_getattr(args, "no_cross_attention", False),
        )

    def forward(
        self,
        src_tokens,
        src_lengths,
        prev_output_tokens,
        return_all_hiddens: bool = True,
        features_only: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """fairseq's forward; the extra output also holds ``clustering_loss`` and
        ``sorting_loss``, each the mean over all clustering layers (None without any), and
        ``commitment_loss``, the mean over the routing layers (None without any)."""
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths, return_all_hiddens=return_all_hiddens)
        x, extra = self.decoder(
            prev_output_tokens,
            encoder_out=encoder_out,
            features_only=features_only,
            alignment_layer=alignment_layer,
            alignment_heads=alignment_heads,
            src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
        )
        clustering = encoder_out["clustering_losses"] + extra["clustering_losses"]
        sorting = encoder_out["sorting_losses"] + extra["sorting_losses"]
        extra["clustering_loss"] = torch.stack(clustering).mean() if clustering else None
        extra["sorting_loss"] = torch.stack(sorting).mean() if sorting else None
        commitment = encoder_out["commitment_losses"] + extra["commitment_losses"]
        extra["commitment_loss"] = torch.stack(commitment).mean() if commitment else None
        return x, extra


def _set_cluster_defaults(args):
    if isinstance(args, argparse.Namespace) and "causal_local_heads" not in vars(args):
        # fairseq-train always records this option ("half" unless given), so its absence means a
        # checkpoint saved before the option existed, whose decoder had no local heads. (The arch
        # functions run on a loaded checkpoint's args before build_model does.)
        args.causal_local_heads = "0"
    for name in (
        "num_clusters",
        "causal_num_clusters",
        "causal_window",
        "causal_local_heads",
        "local_heads",
        "no_previous_block",
        "cluster_similarity",
        "max_clusters",
        "self_attention_encoder",
        "self_attention_decoder",
        "lsh_n_hashes",
        "routing_local_heads",
        "linformer_k",
        "cluster_compile",
        "cluster_compile_mode",
        "cluster_impl",
    ):
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
