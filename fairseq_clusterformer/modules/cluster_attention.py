"""Neural clustering attention (ClusterFormer, Wang et al., ACL 2022): the layer.

Torch only: ``from fairseq_clusterformer.modules import ClusterAttention`` works with or without
fairseq. Tensors are batch-first (B x N x d); fairseq_cluster_attention.py adapts fairseq's
time-first calls. clustering.py states each step of the method as a plain torch function.

Encoder (``causal=False``), per sequence b with L_b real words and k_b clusters: cluster the
words (U, a_j, C', both losses), sort them stably by (a_j, j), cut the sorted sequence into k_b
blocks of w_b = ceil(L_b / k_b), let block i attend to itself and block i-1, un-sort. Sizes come
from each sequence's own length, so outputs do not depend on the batch or the padding. With
``local_heads`` = h > 0 (this project's option), the first h heads use the same blocks cut from
the words in their own order.

Decoder (``causal=True``; this project's design, the paper does not say how its decoder
works): learned centroids that depend on no token; each word attends to the most recent
``window`` words of its own cluster (the first ``local_heads`` heads: of any cluster), itself
included. incremental.py decodes one word at a time with the same result (docs/attention.md).

Two implementations of one forward, side by side in the code (``impl``): "reference" is
clustering.py's functions and dense masked attention (O(N^2) memory), to read and to check
against; "fast" (default) is the fused clustering kernel and block attention on a gathered
block layout (kernels.py), or one dense-mask call for sequences of at most ``dense_max_len``;
"flex" is "fast" with the block attention of every head as one FlexAttention call (flex.py:
for CUDA, where torch compiles it; the CPU runs it forward only, for tests).
"""

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import clustering, flex, incremental, kernels
from .clustering import SIMILARITIES, block_visibility, sort_by_cluster  # noqa: F401  (public names)
from .constants import arange, filled, sized_constant

IMPLEMENTATIONS = ("fast", "flex", "reference")
# Sequences up to this length take the dense-mask path of the fast implementation (see
# ClusterAttention's dense_max_len): measured by python -m scripts.benchmark_attention
# --impl cluster,cluster-blocks,... (docs/benchmarks.md, "Short sequences").
DENSE_MAX_LEN = 64
# ClusterAttention._fast_path's compiled functions, by (name, mode): one per process, shared by
# every layer (torch.compile guards on what differs between layers and recompiles where it must).
_COMPILED: Dict[Tuple[str, str], Callable] = {}
# torch.compile's modes (compile=True is "default"); "reduce-overhead" and "max-autotune" also
# replay the compiled step as CUDA graphs on a GPU (one recording per distinct input shape).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKEND = "inductor"  # torch.compile's backend (the CPU tests also use "aot_eager")


class ClusterInfo(NamedTuple):
    """What one clustering layer hands to the next layer and to the criterion."""

    centroids: Optional[Tensor]  # B x K x d updated centroids C' (None for the causal variant)
    clustering_loss: Tensor  # scalar: mean over real words of -sim(x_j, c'_{a_j})
    sorting_loss: Tensor  # scalar: mean over adjacent centroid pairs of -sim(c'_i, c'_{i+1})
    assignments: Tensor  # B x N long cluster index per word (-1 at padding)
    # A router's own loss (the routing baseline's k-means commitment loss; None otherwise). Layers
    # with a router have no centroids, so their clustering_loss and sorting_loss are None.
    commitment_loss: Optional[Tensor] = None


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def parse_num_clusters(value: Union[int, str]) -> Union[int, str]:
    """'3' -> 3, 'auto' -> 'auto'; anything else is a ValueError naming the option."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"num_clusters must be a positive integer or 'auto', got {value!r}") from None
    return _check_positive_int("num_clusters", value)


class ClusterAttention(nn.Module):
    """Multi-head neural clustering attention.

    Args:
        embed_dim: model dimension d.
        num_heads: attention heads; d must be divisible by it.
        num_clusters: k, or ``"auto"`` for k_b = ceil(sqrt(L_b)) per sequence (encoder only).
        causal: the decoder variant (see the module docstring).
        window: causal only: how many most-recent words of its own cluster a word sees (itself
            included). Fixed by configuration, so incremental decoding is exact.
        local_heads: how many heads (the first ones) ignore the clusters: in the decoder they
            attend to the ``window`` most recent words of any cluster; in the encoder to the
            same blocks cut from the words in their own order (0: every head clustered).
        previous_block: encoder only: blocks also attend to the previous block (the paper's
            2w keys). False gives w keys per block.
        max_clusters: how many learned centroids exist for ``num_clusters="auto"`` (k_b is
            clipped to it), and the largest k accepted.
        learned_centroids: own a learned k x d centroid parameter (first encoder layer, every
            causal layer). Without it, ``forward`` must be given the previous layer's centroids.
        similarity: the similarity used by the two losses: ``cosine`` (default; bounded, so the
            losses cannot grow by inflating norms) or ``dot`` (the paper's plain dot product,
            divided by d).
        dropout: attention-probability dropout.
        bias: biases on the q/k/v/out projections (as fairseq's MultiheadAttention).
        impl: ``"fast"`` (default), ``"flex"`` or ``"reference"`` (see the module docstring).
            ``"flex"`` trains on CUDA only and has no attention dropout.
        dense_max_len: the fast path computes sequences of at most this many positions (the
            decoder: also at most ``window``) with one dense N x N attention mask instead of the
            block layout: the same function, fewer and larger operations where N is small (the
            sort and the gathers cost more than they save there). 0 always uses the blocks.
        compile: run the fast path's clustering and block attention through ``torch.compile``
            (dynamic shapes; one compiled graph per padding case, shared by every layer): the
            same function in far fewer kernel launches, for GPUs, where short sequences are
            launch-bound (docs/benchmarks.md). False, True (torch.compile's default mode) or a
            mode of COMPILE_MODES: "reduce-overhead" also replays each compiled step as a CUDA
            graph on a GPU, recorded once per distinct input shape (bucket the lengths, e.g.
            fairseq's --required-seq-len-multiple, so that few are recorded). The host-side
            steps (the padding check, the decoder's near-tie screen) stay eager. The first calls
            compile (tens of seconds).
        router: causal only: the assignment rule, replacing the learned centroids (the LSH and
            routing baselines, fairseq_clusterformer/baselines/routers.py). A module with
            ``num_groups`` (= num_clusters), ``directions(dtype)`` (K x d: a word goes to the
            argmax of its dot products with these rows, a function of the word alone) and
            ``losses(x, pad, assign)`` (its loss or None). Everything else of the causal variant
            (window, local heads, fast and reference paths, the decoding cache) is unchanged.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_clusters: Union[int, str] = 3,
        *,
        causal: bool = False,
        window: int = 64,
        local_heads: int = 0,
        previous_block: bool = True,
        max_clusters: int = 256,
        learned_centroids: bool = True,
        similarity: str = "cosine",
        dropout: float = 0.0,
        bias: bool = True,
        impl: str = "fast",
        router: Optional[nn.Module] = None,
        dense_max_len: int = DENSE_MAX_LEN,
        compile: Union[bool, str] = False,
    ):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_clusters = parse_num_clusters(num_clusters)
        _check_positive_int("max_clusters", max_clusters)
        if num_clusters != "auto" and num_clusters > max_clusters:
            raise ValueError(
                f"num_clusters ({num_clusters}) is larger than max_clusters ({max_clusters}); "
                f"raise max_clusters if you really want that many clusters"
            )
        if causal:
            if num_clusters == "auto":
                raise ValueError(
                    "num_clusters='auto' needs the sequence length, which a causal decoder does not "
                    "know at inference; give the decoder an integer number of clusters"
                )
            _check_positive_int("window", window)
            if not learned_centroids:
                raise ValueError(
                    "the causal variant needs learned_centroids=True (its centroids may not depend on tokens)"
                )
        if isinstance(local_heads, bool) or not isinstance(local_heads, int) or not 0 <= local_heads <= num_heads:
            raise ValueError(f"local_heads must be an integer in [0, num_heads={num_heads}], got {local_heads!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(dense_max_len, bool) or not isinstance(dense_max_len, int) or dense_max_len < 0:
            raise ValueError(f"dense_max_len must be a non-negative integer, got {dense_max_len!r}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        if impl == "flex":
            flex.check_available()
            if dropout > 0:
                raise ValueError(
                    f"impl='flex' has no attention dropout (FlexAttention does not implement it), "
                    f"got dropout={dropout}: set it to 0 or use impl='fast'"
                )
        if router is not None:
            if not causal:
                raise ValueError("a router replaces the causal variant's centroids; the encoder variant takes none")
            if router.num_groups != num_clusters:
                raise ValueError(f"the router has {router.num_groups} groups, num_clusters is {num_clusters}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_clusters = num_clusters
        self.causal = causal
        self.window = window
        self.local_heads = local_heads
        self.previous_block = previous_block
        self.max_clusters = max_clusters
        self.similarity = similarity
        self.dropout = dropout
        self.impl = impl
        self.dense_max_len = dense_max_len
        self.compile = compile  # sets compile_mode (None: eager)

        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if router is None:
            self.centroid_proj = nn.Linear(embed_dim, embed_dim, bias=False)  # W_C
            n_centroids = max_clusters if num_clusters == "auto" else num_clusters
            self.centroids = nn.Parameter(torch.empty(n_centroids, embed_dim)) if learned_centroids else None
        else:  # the router assigns the words: no centroids (an unused parameter would break DDP)
            self.centroid_proj = self.centroids = None
        self.router = router
        self.reset_parameters()

    @property
    def compile(self) -> bool:
        """Whether the fast path runs compiled (``compile_mode`` says how)."""
        return self.compile_mode is not None

    @compile.setter
    def compile(self, value: Union[bool, str]):
        if not isinstance(value, bool) and value not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {value!r}")
        if value and self.impl == "reference":
            raise ValueError("compile applies to the fast implementations; impl='reference' is the eager oracle")
        self.compile_mode = ("default" if value is True else value) if value else None

    def reset_parameters(self):
        # As fairseq's MultiheadAttention (self-attention with q/k/v of equal size).
        gain = 1 / math.sqrt(2)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.centroid_proj is not None:
            nn.init.xavier_uniform_(self.centroid_proj.weight)
        if self.centroids is not None:
            # Random initialisation (the paper), at the scale of layer-normalised word states.
            nn.init.normal_(self.centroids, mean=0.0, std=1.0)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}, "
            f"causal={self.causal}, window={self.window if self.causal else None}, "
            f"local_heads={self.local_heads}, previous_block={self.previous_block if not self.causal else None}, "
            f"similarity={self.similarity}, impl={self.impl}"
            + ("" if self.compile_mode is None else f", compile={self.compile_mode!r}")
        ) + ("" if self.router is None else f", router={type(self.router).__name__}")

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        centroids: Optional[Tensor] = None,
        *,
        assume_padding: bool = False,
    ) -> Tuple[Tensor, ClusterInfo]:
        """Full-sequence forward: x B x N x d; key_padding_mask B x N bool, True at padding (left
        or right), or None; centroids: B x K x d, the previous encoder layer's C' (None: the
        learned parameter); assume_padding: the caller knows that the mask holds padding, so the
        layer does not check (a host sync; see clustering.words_of). Returns (B x N x d output,
        ClusterInfo); padding rows are zero before ``out_proj``."""
        if x.dim() != 3 or x.size(-1) != self.embed_dim:
            raise ValueError(f"expected x of shape B x N x {self.embed_dim}, got {tuple(x.shape)}")
        if x.size(0) == 0 or x.size(1) == 0:
            raise ValueError(f"x must hold at least one sequence of at least one word, got shape {tuple(x.shape)}")
        if self.impl == "flex":
            flex.check_device(self, x)
        words = clustering.words_of(x, key_padding_mask, assume_padding)
        if self.compile_mode:
            # fairseq hands in a transposed time-first tensor, whose strides change with the batch
            # size: compiled graphs are guarded on strides, so each batch size would recompile.
            x = x.contiguous()
        if self.causal:
            return self._forward_causal(x, words)

        B, N, d = x.shape
        k_b, K = clustering.cluster_counts(words.lengths, self.num_clusters, self.max_clusters)
        layer_centroids = self.layer_centroids(x, centroids, K)
        if self.compile_mode:  # the learned centroids come as 1 x K x d, carried ones B x K x d: one layout
            layer_centroids = layer_centroids.expand(B, K, d).contiguous()
        if self.impl != "reference":
            # Fast: the same clusters and blocks through the fused kernels (short sequences: one
            # dense-mask call), compiled if asked.
            out, assign, new_centroids, clustering_loss, sorting_loss = self._fast_path("_fast_encoder")(
                self, x, words, layer_centroids, k_b, K
            )
            return out, ClusterInfo(new_centroids, clustering_loss, sorting_loss, assign)
        # The method as the paper states it: sort, attend within blocks, un-sort (O(N^2) memory).
        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(x, words, layer_centroids, k_b)
        info = ClusterInfo(new_centroids, clustering_loss, sorting_loss, assign)
        w_b = clustering.block_sizes(words.lengths, k_b)  # B: ceil(L_b / k_b)
        paired = self.previous_block and K > 1
        H, Hl = self.num_heads, self.local_heads
        sorted_idx = clustering.sorted_word_idx(assign, K)  # B x N, padding last
        x_sorted = x.gather(1, sorted_idx[:, :, None].expand(B, N, d))
        visible = clustering.sorted_block_visibility(words.lengths, w_b, N, paired)[:, None]  # B x 1 x N x N
        if Hl:  # local heads: the same blocks over the words in their own order
            in_order = _rank_in_sentence(assign).gather(1, sorted_idx)  # B x N, in the sorted frame
            local = clustering.block_visibility(in_order, w_b, paired)[:, None]
            visible = torch.where(torch.arange(H, device=x.device)[:, None, None] < Hl, local, visible)
        sorted_pad = torch.arange(N, device=x.device)[None, :] >= words.lengths[:, None]
        out_sorted = self._attend_dense(x_sorted, sorted_pad if words.pad is not None else None, visible)
        undo = clustering.undo_sorted_word_idx(sorted_idx)
        return out_sorted.gather(1, undo[:, :, None].expand(B, N, d)), info

    def _fast_path(self, name: str):
        """ClusterAttention.<name>, compiled (shared by every layer) when ``compile`` is set.
        The compiled function must be given a contiguous x (see forward)."""
        mode = self.compile_mode
        if mode is None:
            return getattr(ClusterAttention, name)
        if (name, mode) not in _COMPILED:
            options = None
            if COMPILE_BACKEND == "inductor":
                # The mode's options (torch.compile takes a mode or options, not both), and: CUDA
                # compiles to Triton; on the CPU, inductor's vectorised C++ for these graphs does
                # not build (torch 2.13: mismatched mask vector types), scalar C++ does. CUDA
                # graphs apply to CUDA tensors only (inductor skips them on the CPU).
                from torch._inductor import list_mode_options

                options = {**list_mode_options(mode), "cpp.simdlen": 1}
            fn = torch.compile(getattr(ClusterAttention, name), dynamic=True, backend=COMPILE_BACKEND, options=options)
            # Floats (the dropout rate, the cosine's eps) as constants: dynamic=True would make each
            # float the function reads a symbolic input, and the first one an operation needs as a
            # number (sdpa's dropout_p) restarts the whole trace, which doubles the first compile.
            _COMPILED[name, mode] = torch._dynamo.config.patch(specialize_float=True)(fn)
        return _COMPILED[name, mode]

    def _fast_encoder(self, x: Tensor, words: clustering.Words, layer_centroids: Tensor, k_b: Tensor, K: int):
        """The encoder's fast path: (output, assignments, C', clustering loss, sorting loss)."""
        N = x.size(1)
        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(x, words, layer_centroids, k_b)
        paired = self.previous_block and K > 1
        H, Hl = self.num_heads, self.local_heads
        if N > self.dense_max_len and words.pad is None and self.num_clusters != "auto":
            w_b = -(-N // K)  # every sequence has N words and K clusters: one block size, known on the host
        else:
            w_b = clustering.block_sizes(words.lengths, k_b)  # B: ceil(L_b / k_b)
        if N <= self.dense_max_len:
            visible = block_visibility(sort_by_cluster(assign, K)[1], w_b, paired)[:, None]  # B x 1 x N x N
            if Hl:
                local = block_visibility(_rank_in_sentence(assign), w_b, paired)[:, None]
                visible = torch.where(torch.arange(H, device=x.device)[:, None, None] < Hl, local, visible)
            out = self._attend_dense(x, words.pad, visible)
        elif self.impl == "flex":
            if not isinstance(w_b, Tensor) and self.compile_mode:  # compiled: one graph for every block size
                w_b = clustering.block_sizes(words.lengths, k_b)
            orders = self._head_orders(assign, K, words.pad)
            out = flex.encoder_attention(self, x, words.pad, orders, words.lengths, w_b, paired)
        else:
            out = None
            for group_assign, in_order, heads in self._head_groups(assign):
                part = self._attend_sorted_blocks(x, words, group_assign, K, w_b, paired, heads, in_order)
                out = part if out is None else out + part
        return out, assign, new_centroids, clustering_loss, sorting_loss

    # ------------------------------------------------------------------------------------------
    def layer_centroids(self, x: Tensor, centroids: Optional[Tensor], K: int) -> Tensor:
        """The centroids this layer clusters with, B x K x d or 1 x K x d (the same for every
        sequence; callers expand): the given ones (the previous layer's C'), else the learned
        parameter."""
        B, _, d = x.shape
        if centroids is None:
            if self.centroids is None:
                raise ValueError("this layer has no learned centroids: pass the previous layer's centroids")
            return self.centroids[:K].to(x.dtype).unsqueeze(0)
        if centroids.dim() != 3 or centroids.size(0) not in (1, B) or centroids.shape[1:] != (K, d):
            raise ValueError(f"centroids must be B x {K} x {d}, got {tuple(centroids.shape)}")
        return centroids

    def _cluster(self, x: Tensor, words: clustering.Words, centroids: Tensor, k_b: Tensor, assign=None):
        """(assignments B x N with -1 at padding, C' B x K x d, clustering loss, sorting loss).
        ``assign``: the causal variant's per-word assignments, instead of the argmax of U."""
        # C W_C: B x K x d (the learned centroids, 1 x K x d, are projected once for the batch)
        projected = self.centroid_proj(centroids).expand(x.size(0), -1, -1)
        if self.impl == "reference":
            return clustering.cluster_words(x, projected, words, k_b, self.similarity, assign)
        B, N, _ = x.shape
        K = centroids.size(1)
        cluster_pad = None
        if self.num_clusters == "auto":  # clusters beyond k_b take no words
            cluster_pad = arange(K, x.device)[None, :] >= k_b[:, None]
        dtype = clustering.loss_dtype(x.dtype)
        # The losses' weights: -1 / (real words) for each word's similarity, minus the pairs' means
        if words.pad is None:
            word_weight = filled((), -1.0 / (B * N), dtype, x.device)
        else:
            word_weight = words.n_words.reciprocal().neg_()
        return kernels.cluster_words(  # the same, with one fused backward
            x,
            projected,
            pad=words.pad,
            validf=words.validf,
            word_weight=word_weight,
            cluster_pad=cluster_pad,
            pair_weight=clustering.sorting_pair_weights(
                k_b, K, dtype, fixed_k=self.num_clusters != "auto", negated=True
            ),
            assign=assign,
            cosine=self.similarity == "cosine",
        )

    def _head_groups(self, assign: Tensor):
        """How the fast paths compute the heads: a list of (assignments G x B x N, in_order,
        heads), one attention call each, over heads [heads[0], heads[1]) (None: all) in G groups
        of equal size, group g's words ordered by assignments[g]. The local heads' order puts
        every real word in one cluster (padding -1; ``in_order``: no clustered group in the
        call). With as many local heads as clustered ones (the fairseq decoder's default, half)
        both groups go in one call on CUDA (kernels.HEAD_GROUPS_IN_ONE_CALL_ON_CPU says why not
        on the CPU); other splits take two."""
        H, Hl = self.num_heads, self.local_heads
        if Hl == 0:
            return [(assign[None], False, None)]
        local = assign.clamp(max=0)  # every real word in cluster 0, padding -1
        if Hl == H:
            return [(local[None], True, None)]
        if 2 * Hl == H and (assign.is_cuda or kernels.HEAD_GROUPS_IN_ONE_CALL_ON_CPU):
            return [(torch.stack([local, assign]), False, None)]
        return [(local[None], True, (0, Hl)), (assign[None], False, (Hl, H))]

    def _attend_sorted_blocks(self, x, words, assign, K, w_b, paired, heads, in_order=False):
        """Fast encoder attention of heads [heads[0], heads[1]) (None: all), in G equal groups,
        over the blocks of the words sorted by ``assign`` (G x B x N: group g's assignments);
        their share of out_proj's output, B x N x d.

        Block layout: sequence b's sorted word r goes to block r // w_b, slot r % w_b; blocks
        are W = max w_b wide (slots beyond w_b stay empty). Without padding every sequence has
        the same layout: the index tensors are computed once (leading dimension 1). ``w_b``: B
        block sizes, or one int when every sequence has N words and a fixed k (then the layout
        is the sorted positions in order, a few operations on host-known sizes). ``in_order``:
        ``assign`` puts every real word in one cluster (the local heads).
        """
        G, B, N = assign.shape
        lengths = words.lengths
        sorted_idx, undo_sort = _sorted_order(assign, K, words.pad, in_order)
        if not isinstance(w_b, Tensor):  # an int (a SymInt under torch.compile)
            W = w_b
            slot_pos, slot_real, key_ok = _fixed_block_layout(K, W, N, paired, x.device)
        else:
            # W = max w_b; with a fixed k, ceil(N / k) is that (or more, if every sequence is
            # padded at the end: then the extra slots stay empty) without a host sync.
            W = -(-N // self.num_clusters) if self.num_clusters != "auto" else int(w_b.max())
            per_seq = w_b if words.pad is not None else w_b[:1]
            seq_len = lengths if words.pad is not None else lengths[:1]
            block = arange(K, x.device)[None, :, None]
            slot = arange(W, x.device)[None, None, :]
            sorted_pos = block * per_seq[:, None, None] + slot  # B|1 x K x W: sorted position held by each slot
            slot_real = (slot < per_seq[:, None, None]) & (sorted_pos < seq_len[:, None, None])  # B|1 x K x W
            slot_pos = sorted_pos.clamp(max=N - 1).view(1, -1, K * W)  # in range everywhere
            # Keys of block i: block i-1 (none for block 0: blocks do not wrap around), then block i.
            key_ok = _with_previous_block(slot_real, False) if paired else slot_real  # B|1 x K x 2W|W
        # the original position held by each slot
        block_word = sorted_idx.gather(2, slot_pos.expand(G, B, K * W)).view(G, B, K, W)
        # Word j sits at row (r_j // w_b) W + r_j % w_b = r_j + (r_j // w_b)(W - w_b) of its
        # sequence's K x W layout, where r_j = undo_sort_j is its sorted position.
        word_row = undo_sort  # G x B x N
        if words.pad is not None:
            word_row = torch.addcmul(
                undo_sort, torch.div(undo_sort, w_b[:, None], rounding_mode="floor"), W - w_b[:, None]
            )
        return kernels.attend_in_blocks(
            self, x, words.pad, block_word, word_row, key_ok[None, :, :, None, :], slot_real[None], paired, heads
        )

    # ------------------------------------------------------------------------------------------
    # causal (decoder) variant
    def _forward_causal(self, x: Tensor, words: clustering.Words):
        commitment_loss = None
        if self.router is not None:
            # The router's directions are fixed within a forward: word t's group depends on x_t alone.
            assign, clustering_loss, sorting_loss, commitment_loss = self.route(x, words)
        else:
            # The centroids are a parameter: the assignment of word t depends on x_t alone (the
            # host-side near-tie screen, eager). C' (which sees all words) only feeds the losses,
            # never the attention, so causality holds.
            assign = incremental.assign_per_word(self, x)
        if self.compile_mode:  # a strided view of the screen's top-2 indices: one layout for the graph
            assign = assign.contiguous()
        if self.router is None:
            if self.impl != "reference":  # the losses and the attention, compiled together if asked
                out, assign, clustering_loss, sorting_loss = self._fast_path("_fast_causal")(self, x, words, assign)
                return out, ClusterInfo(None, clustering_loss, sorting_loss, assign)
            assign, clustering_loss, sorting_loss = self._causal_losses(x, words, assign)
        info = ClusterInfo(None, clustering_loss, sorting_loss, assign, commitment_loss)
        if self.impl == "reference":
            visible = clustering.causal_visibility(assign, self.window, self.num_heads, self.local_heads)
            return self._attend_dense(x, words.pad, visible), info  # visible: B x H x N x N
        return self._fast_path("_fast_causal_attention")(self, x, words, assign), info

    def _causal_losses(self, x: Tensor, words: clustering.Words, assign: Tensor):
        """The causal variant's clustering under its per-word assignments: (assignments with -1
        at padding, clustering loss, sorting loss); C' is not used."""
        k_b = filled((x.size(0),), self.num_clusters, torch.long, x.device)
        centroids = self.layer_centroids(x, None, self.num_clusters)
        assign, _, clustering_loss, sorting_loss = self._cluster(x, words, centroids, k_b, assign=assign)
        return assign, clustering_loss, sorting_loss

    def _fast_causal(self, x: Tensor, words: clustering.Words, assign: Tensor):
        """The causal variant's fast path under the screened assignments: (output, assignments
        with -1 at padding, clustering loss, sorting loss)."""
        assign, clustering_loss, sorting_loss = self._causal_losses(x, words, assign)
        return self._fast_causal_attention(x, words, assign), assign, clustering_loss, sorting_loss

    def _fast_causal_attention(self, x: Tensor, words: clustering.Words, assign: Tensor) -> Tensor:
        """The causal variant's fast attention under the assignments (B x N, -1 at padding)."""
        N = x.size(1)
        H, Hl = self.num_heads, self.local_heads
        if N <= min(self.window, self.dense_max_len):
            # No word has more than `window` words before it: a clustered head sees every earlier
            # word of its own cluster, a local head every earlier word (padding keys are masked
            # in _attend_dense).
            pos = torch.arange(N, device=x.device)
            not_future = pos[None, :] <= pos[:, None]  # N x N: key position <= query position
            visible = (assign[:, :, None] == assign[:, None, :]) & not_future  # B x N x N
            if Hl:
                is_local = torch.arange(H, device=x.device)[None, :, None, None] < Hl
                visible = torch.where(is_local, not_future, visible[:, None])  # B x H x N x N
            else:
                visible = visible[:, None]
            return self._attend_dense(x, words.pad, visible)
        if self.impl == "flex":
            return flex.causal_attention(self, x, words.pad, self._head_orders(assign, self.num_clusters, words.pad))
        out = None  # the shares of out_proj's output of the head groups' calls, summed
        for group_assign, in_order, heads in self._head_groups(assign):
            part = self._causal_band_attention(x, words, group_assign, self.num_clusters, heads, in_order)
            out = part if out is None else out + part
        return out

    def _head_orders(self, assign: Tensor, K: int, pad: Optional[Tensor]) -> flex.HeadOrders:
        """impl="flex": the words' order for each head: the local heads' (every real word in one
        cluster) and the clustered heads' (by cluster, then position), padding last in both; the
        decoder also needs each sorted position's cluster."""
        H, Hl = self.num_heads, self.local_heads
        # (assignments, in word order): the local heads' group first, as head_group numbers them
        groups = ([(assign.clamp(max=0), True)] if Hl else []) + ([(assign, False)] if Hl < H else [])
        sorted_idx, undo_sort, sorted_cluster = [], [], []
        for group_assign, in_order in groups:  # one or two groups
            idx, undo = _sorted_order(group_assign, K, pad, in_order)
            sorted_idx.append(idx)
            undo_sort.append(undo)
            if self.causal:
                sorted_cluster.append(group_assign.gather(1, idx))
        if len(groups) == 1:  # B x 1 x N views
            clusters = sorted_cluster[0][:, None] if self.causal else None
            return flex.HeadOrders(sorted_idx[0][:, None], undo_sort[0][:, None], clusters, None)
        head_group = (torch.arange(H, device=assign.device) >= Hl).long()
        clusters = torch.stack(sorted_cluster, 1) if self.causal else None
        return flex.HeadOrders(torch.stack(sorted_idx, 1), torch.stack(undo_sort, 1), clusters, head_group)

    def route(self, x: Tensor, words: clustering.Words):
        """With a router: (assignments, -1 at padding; None; None; the router's loss or None)."""
        assign = incremental.assign_per_word(self, x)
        if words.pad is not None:
            assign = assign.masked_fill(words.pad, -1)
        return assign, None, None, self.router.losses(x, words.pad, assign)

    def _causal_band_attention(
        self,
        x: Tensor,
        words: clustering.Words,
        assign: Tensor,
        K: int,
        heads: Optional[Tuple[int, int]],
        in_order=False,
    ):
        """Heads [heads[0], heads[1]) (None: all) of the causal variant, in G equal groups: each
        word attends to the most recent ``window`` words of its cluster under its group's
        assignments (``assign``: G x B x N, -1 at padding), itself included. ``in_order``:
        ``assign`` puts every real word in one cluster (the local heads). Returns their share of
        out_proj's output, B x N x d."""
        G, B, N = assign.shape
        w = self.window
        sorted_idx, undo_sort = _sorted_order(assign, K, words.pad, in_order)

        # Sorted order puts each cluster's words together, in position order. A word at sorted
        # position r sees sorted positions (r - w, r] of its own cluster: its w most recent
        # cluster mates. Blocks of w sorted words; block j's queries need only blocks j-1 and j.
        # A sequence no longer than w is one block of N words that needs no previous block.
        b = min(w, N)  # block size
        paired = N > w
        n_blocks = -(-N // b)
        P = n_blocks * b
        block_word = F.pad(sorted_idx, (0, P - N)).view(G, B, n_blocks, b)
        sorted_cluster = F.pad(assign.gather(2, sorted_idx), (0, P - N), value=-1).view(G, B, n_blocks, b)  # -1: none

        key_cluster = _with_previous_block(sorted_cluster, -1) if paired else sorted_cluster  # G x B x nb x n_keys
        band = _causal_band(b, paired, w, x.device)  # b x n_keys: sorted distance in [0, w)
        same = key_cluster[..., None, :] == sorted_cluster[..., :, None]  # G x B x nb x b x n_keys
        return kernels.attend_in_blocks(
            self,
            x,
            words.pad,
            block_word,
            undo_sort,
            band & same,
            sorted_cluster >= 0,
            paired,
            heads,
        )

    # ------------------------------------------------------------------------------------------
    def fused_qkv(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The q, k and v projections stacked (3d x d weight, 3d bias or None): one matmul."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
        return torch.cat([p.weight for p in projs]), bias

    def _attend_dense(self, x: Tensor, pad: Optional[Tensor], visible: Tensor) -> Tensor:
        """Attention under a dense mask, out_proj applied: the reference path and the fast
        path's short sequences.

        x: B x N x d; pad: B x N (True at padding) or None; visible: B x H|1 x N (queries) x N
        (keys), True where a query may see a key (padding keys are masked here; padding queries
        see every key, so that their discarded rows stay finite). Returns B x N x d, zero at
        padding before out_proj, with one fused q|k|v projection and one attention call.
        """
        B, N, d = x.shape
        H, hd = self.num_heads, self.head_dim
        if pad is not None:
            visible = (visible & ~pad[:, None, None, :]) | pad[:, None, :, None]
        qkv = F.linear(x, *self.fused_qkv())  # B x N x 3d
        q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # each B x H x N x hd
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=kernels.additive_mask(visible, q.dtype), dropout_p=dropout_p
        )
        out = out.transpose(1, 2).reshape(B, N, d)
        if pad is not None:
            out = out.masked_fill(pad[:, :, None], 0.0)
        return self.out_proj(out)

    # ------------------------------------------------------------------------------------------
    # incremental decoding (incremental.py)
    def init_state(self, batch_size: int, device=None, dtype=None, mode: str = "ring") -> Dict[str, Tensor]:
        """An empty decoding cache (batch on dim 0): ``mode="ring"`` or ``"auto"`` (incremental.py)."""
        return incremental.init_state(self, batch_size, device, dtype, mode)

    def step(
        self, x: Tensor, state: Optional[Dict[str, Tensor]] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Decode one position, B x 1 x d (or B x d); returns (output, new state). Exactly the
        full causal forward's output at that position (incremental.step)."""
        return incremental.step(self, x, state, key_padding_mask)

    @staticmethod
    def reorder_state(state: Dict[str, Tensor], new_order: Tensor) -> Dict[str, Tensor]:
        """Beam search: select/reorder the batch entries of a decoding state."""
        return incremental.reorder_state(state, new_order)


def _sorted_order(assign: Tensor, K: int, pad: Optional[Tensor], in_order: bool) -> Tuple[Tensor, Tensor]:
    """clustering.sort_by_cluster(assign, K) over the last dimension of ``assign`` (... x N: one
    sort for every leading index). ``in_order`` (every real word in one cluster) without
    padding: the words keep their own order, so both permutations are the identity (no sort)."""
    N = assign.size(-1)
    if in_order and pad is None:
        identity = arange(N, assign.device).expand_as(assign)
        return identity, identity
    sorted_idx, undo = clustering.sort_by_cluster(assign.reshape(-1, N), K)
    return sorted_idx.view(assign.shape), undo.view(assign.shape)


def _with_previous_block(blocks: Tensor, fill) -> Tensor:
    """... x M x W -> ... x M x 2W: each block preceded by the block before it (``fill`` before
    the first block), as overlapping views of one padded copy (compiled: concatenated, since
    unfold's sizes would specialise the graph to one block size)."""
    if torch.compiler.is_compiling():
        return torch.cat([F.pad(blocks, (0, 0, 1, -1), value=fill), blocks], dim=-1)
    M, W = blocks.shape[-2:]
    padded = F.pad(blocks.reshape(*blocks.shape[:-2], M * W), (W, 0), value=fill)  # ... x (M + 1) W
    return padded.unfold(-1, 2 * W, W)


def _fixed_block_layout(K: int, W: int, N: int, paired: bool, device) -> Tuple[Tensor, Tensor, Tensor]:
    """The encoder's block layout when every sequence has N words and one block size W: (the
    sorted position held by each slot, in range: 1 x 1 x K W; the slots that hold a word: 1 x K
    x W; the keys each block may see: 1 x K x 2W with ``paired``, else the slots). Sizes alone:
    made once per size and device outside torch.compile (see _causal_band)."""

    def make():
        sorted_pos = torch.arange(K * W, device=device).view(1, K, W)
        slot_real = sorted_pos < N
        key_ok = _with_previous_block(slot_real, False) if paired else slot_real
        return sorted_pos.clamp(max=N - 1).view(1, 1, K * W), slot_real, key_ok

    return sized_constant(("encoder layout", K, W, N, paired, device), make)


def _causal_band(b: int, paired: bool, window: int, device) -> Tensor:
    """b x n_keys bool: which keys of a query's [previous block, own block] (its own block alone
    without ``paired``) lie 0 to window - 1 sorted positions before it, the query slot's own
    frame. It depends on the sizes alone: made once per size and device (constants.sized_constant)
    outside torch.compile, where it fuses into the graph instead."""

    def make():
        q_slot = torch.arange(b, device=device)[:, None]  # query slot within its block
        k_slot = torch.arange(2 * b if paired else b, device=device)[None, :] - (b if paired else 0)  # same frame
        return (k_slot <= q_slot) & (k_slot > q_slot - window)

    return sized_constant(("causal band", b, paired, window, device), make)


def _rank_in_sentence(assign: Tensor) -> Tensor:
    """B x N: each real word's position counted from its sentence's first real word (padding
    last), i.e. its sorted position when every word is in one cluster: the word order that the
    encoder's local heads cut into blocks, whatever padding surrounds the sentence."""
    return clustering.undo_sorted_word_idx(clustering.sorted_word_idx(assign.clamp(max=0), 1))
