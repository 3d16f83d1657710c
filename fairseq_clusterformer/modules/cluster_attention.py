"""Neural clustering attention (ClusterFormer, Wang et al., ACL 2022): the layer.

This package imports only torch: ``from fairseq_clusterformer.modules import ClusterAttention``
works in any PyTorch project, with or without fairseq installed. Tensors are batch-first here
(B x N x d); the fairseq adapter (fairseq_cluster_attention.py) turns fairseq's time-first calls
into these.

Encoder variant (``causal=False``), per sequence b with L_b real words and k_b clusters:

    U   = X (C W_C)^T / sqrt(d)                 (N x k)  similarity of words and centroids
    C'  = softmax_words(U)^T X                  (k x d)  updated centroids, padding excluded
    a_j = argmax_i U_ji                                  cluster of word j
    sort words stably by (a_j, j); cut the sorted sequence into k_b blocks of w_b = ceil(L_b/k_b)
    block i attends to itself and block i-1 (2 w_b keys); un-sort the result
    clustering loss = mean_j -sim(x_j, c'_{a_j});  sorting loss = mean_i -sim(c'_i, c'_{i+1})

Block size and boundaries come from each sequence's own length, so a sentence's output does not
depend on what it is batched with or on how much left/right padding surrounds it.

Causal variant (``causal=True``, the decoder; this project's design, the paper does not say how
its decoder works): C is a learned parameter of the layer (it depends on no token), and each
word attends to the most recent ``window`` words of its own cluster, itself included. With
``local_heads`` = h > 0, the first h heads instead attend to the ``window`` most recent words
of any cluster. Nothing after position t reaches t, and incremental.py decodes one word at a
time with the same result at O(window d) per step. docs/attention.md has the derivation.

Two implementations of the same forward, chosen with ``impl``:
    "fast"       (default) gathers the words into a block layout once and runs block attention
                 through the custom autograd Functions of kernels.py (memory and speed); a
                 sequence of at most ``dense_max_len`` positions (64) instead gets one attention
                 call under a dense N x N mask of the same blocks (fewer, larger operations);
    "reference"  reference.py: plain autograd and dense masks, the readable statement of the
                 algorithm (O(N^2) memory). Tests compare the two on values and gradients.
"""

import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import incremental, kernels

SIMILARITIES = ("cosine", "dot")
IMPLEMENTATIONS = ("fast", "reference")
# Sequences up to this length take the dense-mask path of the fast implementation (see
# ClusterAttention's dense_max_len): measured by python -m scripts.benchmark_attention
# --impl cluster,cluster-blocks,... (docs/benchmarks.md, "Short sequences").
DENSE_MAX_LEN = 64


class ClusterInfo(NamedTuple):
    """What one clustering layer hands to the next layer and to the criterion."""

    centroids: Optional[Tensor]  # B x K x d updated centroids C' (None for the causal variant)
    clustering_loss: Tensor  # scalar: mean over real words of -sim(x_j, c'_{a_j})
    sorting_loss: Tensor  # scalar: mean over adjacent centroid pairs of -sim(c'_i, c'_{i+1})
    assignments: Tensor  # B x N long cluster index per word (-1 at padding)
    # A router's own loss (the routing baseline's k-means commitment loss; None otherwise). Layers
    # with a router have no centroids, so their clustering_loss and sorting_loss are None.
    commitment_loss: Optional[Tensor] = None


class Words(NamedTuple):
    """Padding information of one forward, computed once."""

    pad: Optional[Tensor]  # B x N bool, True at padding; None when the batch has no padding
    validf: Optional[Tensor]  # 1 at real words, 0 at padding, in the input dtype (None without padding)
    lengths: Tensor  # B long: L_b
    n_words: Tensor  # scalar (input dtype): real words in the batch, at least 1


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


def sort_by_cluster(assign: Tensor, num_clusters: int) -> Tuple[Tensor, Tensor]:
    """Stable sort of each sequence's words by (cluster, position), padding (assignment -1) last.

    assign: B x N. Returns ``sorted_idx`` (B x N: the original position of the word at each
    sorted position) and ``undo_sort`` (B x N: the sorted position of each original word), so
    ``x.gather(1, sorted_idx)`` sorts and ``y.gather(1, undo_sort)`` un-sorts.
    """
    B, N = assign.shape
    pos = torch.arange(N, device=assign.device).expand(B, N)
    cluster = assign.remainder(num_clusters + 1)  # -1 (padding) -> K: after every cluster
    key = torch.add(pos, cluster, alpha=N)  # unique, so any sort is stable
    sorted_idx = torch.argsort(key, dim=1)
    undo_sort = torch.empty_like(sorted_idx).scatter_(1, sorted_idx, pos)
    return sorted_idx, undo_sort


def block_visibility(undo_sort: Tensor, w_b: Tensor, previous_block: bool) -> Tensor:
    """Encoder: which words each word sees, B x N (queries) x N (keys). Word j is in block
    undo_sort_j // w_b of its sequence's sorted words and sees its own block and (with
    previous_block) the block before. The reference path and the fast path's short-sequence
    branch both use it; padding is left to the caller."""
    block = torch.div(undo_sort, w_b[:, None], rounding_mode="floor")  # B x N
    visible = block[:, None, :] == block[:, :, None]
    if previous_block:
        visible |= block[:, None, :] == block[:, :, None] - 1  # key in the block before
    return visible


class ClusterAttention(nn.Module):
    """Multi-head neural clustering attention.

    Args:
        embed_dim: model dimension d.
        num_heads: attention heads; d must be divisible by it.
        num_clusters: k, or ``"auto"`` for k_b = ceil(sqrt(L_b)) per sequence (encoder only).
        causal: the decoder variant (see the module docstring).
        window: causal only: how many most-recent words of its own cluster a word sees (itself
            included). Fixed by configuration, so incremental decoding is exact.
        local_heads: causal only: how many heads (the first ones) attend to the ``window`` most
            recent words of any cluster instead of the word's own cluster (0: all heads clustered).
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
        impl: ``"fast"`` (default) or ``"reference"`` (see the module docstring).
        dense_max_len: the fast path computes sequences of at most this many positions (the
            decoder: also at most ``window``) with one dense N x N attention mask instead of the
            block layout: the same function, fewer and larger operations where N is small (the
            sort and the gathers cost more than they save there). 0 always uses the blocks.
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
        if local_heads and not causal:
            raise ValueError(
                "local_heads is for the causal (decoder) variant; the encoder's blocks already see their neighbours"
            )
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(dense_max_len, bool) or not isinstance(dense_max_len, int) or dense_max_len < 0:
            raise ValueError(f"dense_max_len must be a non-negative integer, got {dense_max_len!r}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
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
            f"local_heads={self.local_heads if self.causal else None}, "
            f"previous_block={self.previous_block if not self.causal else None}, "
            f"similarity={self.similarity}, impl={self.impl}"
        ) + ("" if self.router is None else f", router={type(self.router).__name__}")

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        centroids: Optional[Tensor] = None,
    ) -> Tuple[Tensor, ClusterInfo]:
        """Full-sequence forward.

        Args:
            x: B x N x d word states.
            key_padding_mask: B x N bool, True at padding (left or right); None for no padding.
            centroids: B x K x d centroids from the previous layer (encoder layers after the
                first). None uses the learned parameter.

        Returns:
            (B x N x d output, ClusterInfo). Padding positions are zero before ``out_proj``.
        """
        if x.dim() != 3 or x.size(-1) != self.embed_dim:
            raise ValueError(f"expected x of shape B x N x {self.embed_dim}, got {tuple(x.shape)}")
        if x.size(0) == 0 or x.size(1) == 0:
            raise ValueError(f"x must hold at least one sequence of at least one word, got shape {tuple(x.shape)}")
        B, N, d = x.shape
        pad = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, N):
                raise ValueError(f"key_padding_mask must be B x N = {(B, N)}, got {tuple(key_padding_mask.shape)}")
            pad = key_padding_mask.to(torch.bool)
            # A batch without padding skips all masking. (One host sync per layer, cheaper than
            # masking every step of a padding-free batch.)
            pad = pad if bool(pad.any()) else None
        valid = None if pad is None else ~pad
        lengths = torch.full((B,), N, device=x.device) if pad is None else valid.sum(1)  # L_b
        n_words = lengths.sum().clamp(min=1).to(x.dtype)
        words = Words(pad, None if pad is None else valid.to(x.dtype), lengths, n_words)
        if self.impl == "reference":
            from .reference import reference_forward

            return reference_forward(self, x, words, centroids)
        if self.causal:
            return self._forward_causal(x, words)
        return self._forward_encoder(x, words, centroids)

    # ------------------------------------------------------------------------------------------
    # shared pieces (both implementations use these, so they define the same function)
    def cluster_counts(self, lengths: Tensor) -> Tuple[Tensor, int]:
        """k_b per sequence (B long) and K = max k_b, the width of the centroid tensors."""
        if self.num_clusters == "auto":
            k = torch.ceil(torch.sqrt(lengths.to(torch.float64))).long().clamp(1, self.max_clusters)
            return k, int(k.max())
        return torch.full_like(lengths, self.num_clusters), self.num_clusters

    def layer_centroids(self, x: Tensor, words: Words, centroids: Optional[Tensor], K: Optional[int] = None) -> Tensor:
        """The centroids this layer clusters with, B x K x d: the given ones (the previous
        layer's C'), else the learned parameter. K: from cluster_counts, if already known."""
        B, _, d = x.shape
        if self.causal:
            return self.centroids.to(x.dtype).unsqueeze(0).expand(B, -1, -1)
        if K is None:
            _, K = self.cluster_counts(words.lengths)
        if centroids is None:
            if self.centroids is None:
                raise ValueError("this layer has no learned centroids: pass the previous layer's centroids")
            return self.centroids[:K].to(x.dtype).unsqueeze(0).expand(B, K, d)
        if centroids.dim() != 3 or centroids.size(0) not in (1, B) or centroids.shape[1:] != (K, d):
            raise ValueError(f"centroids must be B x {K} x {d}, got {tuple(centroids.shape)}")
        return centroids.expand(B, K, d)

    def sorting_pair_weights(self, k_b: Tensor, K: int, dtype) -> Tensor:
        """B x K-1 weights that turn the pair similarities into the sorting loss: the mean over
        pairs (i, i+1) with i + 1 < k_b, averaged over the sequences that have pairs."""
        clusters = torch.arange(K, device=k_b.device)[None, :] < k_b[:, None]  # B x K
        pair_ok = clusters[:, 1:].to(dtype)  # B x K-1
        n_pairs = pair_ok.sum(1, keepdim=True)
        has_pairs = (n_pairs > 0).to(dtype)
        return pair_ok * (has_pairs / (n_pairs.clamp(min=1) * has_pairs.sum().clamp(min=1)))

    @torch.no_grad()
    def assign_per_word(self, x: Tensor) -> Tensor:
        """Causal variant: argmax_i (c_i W_C) . x_t for each word, ... x d -> ... long.

        Defined as the argmax of an elementwise product summed over d, in the input dtype: every
        word gets the same floating-point result whether it comes in a full sequence or alone in
        a decoding step (a batched matmul may block the reduction differently by shape and flip
        a near-tie). Materialising that product for all words costs N x K x d, so the argmax is
        taken from a float64 matmul instead wherever its top two scores are further apart than
        the rounding error of either computation can bridge (then both argmaxes agree), and the
        elementwise product is computed only for the remaining near-ties: the same result as
        computing it everywhere.

        With a router, its ``directions`` take the place of C W_C (the same exact argmax).
        """
        cw = self._assignment_directions(x.dtype)  # K x d
        if cw.size(0) == 1:
            return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        d = x.size(-1)
        words = x.reshape(-1, d)
        top = torch.matmul(words.double(), cw.double().t()).topk(2, dim=-1)  # rows x 2
        # Both sums of d products are within gamma_d * sum_i |x_i c_i| <= (d + 2) eps |x| |c| of the
        # exact dot product (any summation order; the float64 one far closer).
        norms = words.double().norm(dim=-1) * cw.double().norm(dim=-1).max()
        bound = 2 * (d + 2) * torch.finfo(x.dtype).eps * norms
        assign = top.indices[:, 0]
        near = (top.values[:, 0] - top.values[:, 1] <= bound).nonzero()[:, 0]
        assign[near] = (words[near].unsqueeze(-2) * cw).sum(-1).argmax(-1)
        return assign.view(x.shape[:-1])

    @torch.no_grad()
    def assign_step(self, x: Tensor) -> Tensor:
        """assign_per_word for the few words of one decoding step, B x d -> B: the elementwise
        product that defines the assignment, computed for every word (B x K x d is small here),
        without the float64 screen that spares a full sequence from materialising it."""
        return (x.unsqueeze(-2) * self._assignment_directions(x.dtype)).sum(-1).argmax(-1)

    def _assignment_directions(self, dtype) -> Tensor:
        """The K x d rows a decoder word's assignment is the argmax against: the router's
        directions, or C W_C. C W_C is computed once per parameter state (a decoding run calls
        this at every step of every layer): the cache key holds each parameter's storage and
        version counter, which every in-place update (an optimizer step, load_state_dict) and
        every replacement changes."""
        if self.router is not None:
            return self.router.directions(dtype)
        params = (self.centroids, self.centroid_proj.weight)
        key = (dtype, *((p.data_ptr(), p._version) for p in params))
        cached = getattr(self, "_directions_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.centroid_proj(self.centroids.to(dtype)))
            self._directions_cache = cached
        return cached[1]

    def _cluster(self, x: Tensor, words: Words, centroids: Tensor, k_b: Tensor, assign=None):
        """Assignments (B x N, -1 at padding), C' (B x K x d) and both losses, through the fused
        kernels.ClusteringFunction. ``assign``: the causal variant's per-word assignments."""
        K = centroids.size(1)
        cluster_pad = None
        if self.num_clusters == "auto":  # clusters beyond k_b take no words
            cluster_pad = torch.arange(K, device=x.device)[None, :] >= k_b[:, None]
        return kernels.cluster_words(
            x,
            self.centroid_proj(centroids),
            pad=words.pad,
            validf=words.validf,
            n_words=words.n_words,
            cluster_pad=cluster_pad,
            pair_weight=self.sorting_pair_weights(k_b, K, x.dtype),
            assign=assign,
            cosine=self.similarity == "cosine",
        )

    # ------------------------------------------------------------------------------------------
    # encoder variant
    def _forward_encoder(self, x: Tensor, words: Words, centroids: Optional[Tensor]):
        B, N, d = x.shape
        lengths = words.lengths
        k_b, K = self.cluster_counts(lengths)  # (with "auto", K = max k_b is a host sync: once)
        centroids = self.layer_centroids(x, words, centroids, K)
        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(x, words, centroids, k_b)
        sorted_idx, undo_sort = sort_by_cluster(assign, K)
        info = ClusterInfo(new_centroids, clustering_loss, sorting_loss, assign)
        w_b = torch.div(lengths + k_b - 1, k_b, rounding_mode="floor").clamp(min=1)  # ceil(L_b / k_b)
        paired = self.previous_block and K > 1
        if N <= self.dense_max_len:
            visible = block_visibility(undo_sort, w_b, paired)  # B x N x N
            return self._attend_dense(x, words, visible[:, None]), info

        # Block layout: sequence b's sorted word r goes to block r // w_b, slot r % w_b; blocks
        # are W = max w_b wide (slots beyond w_b stay empty). Without padding every sequence has
        # the same layout: the index tensors below are computed once (leading dimension 1).
        # W = max w_b; with a fixed k, ceil(N / k) is that (or more, if every sequence is padded
        # at the end: then the extra slots stay empty) without a host sync.
        W = -(-N // self.num_clusters) if self.num_clusters != "auto" else int(w_b.max())
        per_seq = w_b if words.pad is not None else w_b[:1]
        seq_len = lengths if words.pad is not None else lengths[:1]
        block = torch.arange(K, device=x.device)[None, :, None]
        slot = torch.arange(W, device=x.device)[None, None, :]
        sorted_pos = block * per_seq[:, None, None] + slot  # B|1 x K x W: sorted position held by each slot
        slot_real = (slot < per_seq[:, None, None]) & (sorted_pos < seq_len[:, None, None])  # B|1 x K x W
        block_word = sorted_idx.gather(1, sorted_pos.clamp(max=N - 1).view(-1, K * W).expand(B, K * W))
        block_word = block_word.view(B, K, W)  # original position held by each slot

        key_ok = slot_real
        if paired:
            # Keys of block i: block i-1 (none for block 0: blocks do not wrap around), then block i.
            key_ok = torch.cat([F.pad(slot_real, (0, 0, 1, -1)), slot_real], dim=2)  # B|1 x K x 2W
        # Word j sits at row (r_j // w_b) W + r_j % w_b = r_j + (r_j // w_b)(W - w_b) of its
        # sequence's K x W layout, where r_j = undo_sort_j is its sorted position.
        word_row = undo_sort
        if words.pad is not None:
            word_row = torch.addcmul(
                undo_sort, torch.div(undo_sort, w_b[:, None], rounding_mode="floor"), W - w_b[:, None]
            )
        out = self._attend_in_blocks(x, words, block_word, word_row, key_ok[:, :, None, :], slot_real, paired)
        return out, info

    # ------------------------------------------------------------------------------------------
    # causal (decoder) variant
    def _forward_causal(self, x: Tensor, words: Words):
        B = x.size(0)
        commitment_loss = None
        if self.router is not None:
            # The router's directions are fixed within a forward: word t's group depends on x_t alone.
            assign, clustering_loss, sorting_loss, commitment_loss = self.route(x, words)
        else:
            k_b = torch.full((B,), self.num_clusters, dtype=torch.long, device=x.device)
            # The centroids are a parameter: the assignment of word t depends on x_t alone. C' (which
            # sees all words) only feeds the losses, never the attention, so causality holds.
            assign, _, clustering_loss, sorting_loss = self._cluster(
                x, words, self.layer_centroids(x, words, None), k_b, assign=self.assign_per_word(x)
            )
        H, Hl = self.num_heads, self.local_heads
        info = ClusterInfo(None, clustering_loss, sorting_loss, assign, commitment_loss)
        N = x.size(1)
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
            return self._attend_dense(x, words, visible), info
        out = None  # the clustered heads' and the local heads' shares of out_proj's output, summed
        if Hl < H:
            out = self._causal_band_attention(x, words, assign, self.num_clusters, (Hl, H))
        if Hl > 0:
            # Local heads: the same band with every real word in one cluster (padding -1).
            everyone = assign.clamp(max=0)
            local = self._causal_band_attention(x, words, everyone, 1, (0, Hl))
            out = local if out is None else local + out
        return out, info

    def route(self, x: Tensor, words: Words):
        """With a router: (assignments, -1 at padding; None; None; the router's loss or None)."""
        assign = self.assign_per_word(x)
        if words.pad is not None:
            assign = assign.masked_fill(words.pad, -1)
        return assign, None, None, self.router.losses(x, words.pad, assign)

    def _causal_band_attention(self, x: Tensor, words: Words, assign: Tensor, K: int, heads: Tuple[int, int]):
        """Heads [heads[0], heads[1]) of the causal variant: each word attends to the most recent
        ``window`` words of its cluster under ``assign`` (B x N, -1 at padding), itself included.
        Returns their share of out_proj's output, B x N x d."""
        B, N, _ = x.shape
        w = self.window
        sorted_idx, undo_sort = sort_by_cluster(assign, K)

        # Sorted order puts each cluster's words together, in position order. A word at sorted
        # position r sees sorted positions (r - w, r] of its own cluster: its w most recent
        # cluster mates. Blocks of w sorted words; block j's queries need only blocks j-1 and j.
        # A sequence no longer than w is one block of N words that needs no previous block.
        b = min(w, N)  # block size
        paired = N > w
        n_blocks = -(-N // b)
        P = n_blocks * b
        block_word = F.pad(sorted_idx, (0, P - N)).view(B, n_blocks, b)
        sorted_cluster = F.pad(assign.gather(1, sorted_idx), (0, P - N), value=-1).view(B, n_blocks, b)  # -1: none

        prev_cluster = F.pad(sorted_cluster, (0, 0, 1, -1), value=-1)  # block j-1 (none before block 0)
        key_cluster = torch.cat([prev_cluster, sorted_cluster], dim=2) if paired else sorted_cluster  # B x nb x n_keys

        q_slot = torch.arange(b, device=x.device)[:, None]  # query slot within its block
        k_slot = torch.arange(key_cluster.size(2), device=x.device)[None, :] - (b if paired else 0)  # same frame
        band = (k_slot <= q_slot) & (k_slot > q_slot - w)  # b x n_keys: sorted distance in [0, w)
        same = key_cluster[:, :, None, :] == sorted_cluster[:, :, :, None]  # B x nb x b x n_keys
        return self._attend_in_blocks(
            x,
            words,
            block_word,
            undo_sort,
            band & same,
            sorted_cluster >= 0,
            paired,
            None if heads == (0, self.num_heads) else heads,
        )

    # ------------------------------------------------------------------------------------------
    def _attend_dense(self, x: Tensor, words: Words, visible: Tensor) -> Tensor:
        """Attention under a dense mask, out_proj applied: the short-sequence path.

        x: B x N x d; visible: B x H|1 x N (queries) x N (keys), True where a query may see a
        key (padding keys are masked here; padding queries see every key, so that their
        discarded rows stay finite). Returns B x N x d, zero at padding before out_proj: the
        same as _attend_in_blocks, with one fused q|k|v projection and one attention call.
        """
        B, N, d = x.shape
        H, hd = self.num_heads, self.head_dim
        if words.pad is not None:
            visible = (visible & ~words.pad[:, None, None, :]) | words.pad[:, None, :, None]
        biases = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        qkv = F.linear(
            x,
            torch.cat([p.weight for p in (self.q_proj, self.k_proj, self.v_proj)]),
            None if biases[0] is None else torch.cat(biases),
        )  # B x N x 3d
        q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # each B x H x N x hd
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, N, d)
        if words.pad is not None:
            out = out.masked_fill(words.pad[:, :, None], 0.0)
        return self.out_proj(out)

    def _attend_in_blocks(
        self,
        x: Tensor,
        words: Words,
        block_word: Tensor,
        word_row: Tensor,
        key_ok: Tensor,
        slot_real: Tensor,
        paired: bool,
        heads: Optional[Tuple[int, int]] = None,
    ) -> Tensor:
        """Attention inside blocks of the sorted sequence, back in the original order, out_proj applied.

        x: B x N x d; block_word: B x M x W original position held by each block slot (in range
        everywhere); word_row: B x N the slot (index into M W) of each real word (anything at
        padding); key_ok: B x M x W x n_keys (or broadcastable) which keys each query may see
        (n_keys = 2W with ``paired``: block i sees block i-1 then itself; W otherwise);
        slot_real: B x M x W slots holding a real word (the others see every key, so that their
        discarded rows stay finite). Returns B x N x d: out_proj of the attention output, which
        is zero at padding.

        The words are gathered into block order once and projected by one fused q|k|v matmul;
        the [previous, own] keys and values of every block are overlapping views of that result,
        so nothing is computed twice. Both row gathers (into block order and back) are one-to-one
        on the real words, so their backward passes are gathers too, each fused with the
        projection next to it (kernels.GatherProject, kernels.ScatterProject).

        heads: (first, end) computes only those heads: their rows of the q/k/v projections and
        their columns of out_proj (whose bias is added only by the part holding head 0), so the
        parts of a layer whose heads attend differently add up to the whole layer's output.
        """
        B, N, d = x.shape
        M, W = block_word.shape[1:]
        hd = self.head_dim
        h0, h1 = heads if heads is not None else (0, self.num_heads)
        H, cols = h1 - h0, slice(h0 * hd, h1 * hd)
        seq_start = torch.arange(B, device=x.device)[:, None]
        word_pad = None if words.pad is None else words.pad.view(-1)
        layout_empty = ~slot_real  # B|1 x M x W
        filler = W if paired else 0  # W rows in front: the "previous block" of the first block (masked)
        # Rows of the flattened (B N) x d input that make the layout (filler rows read word 0).
        layout_word = block_word.new_zeros(filler + B * M * W)
        torch.add(block_word.view(B, M * W), seq_start, alpha=N, out=layout_word[filler:].view(B, M * W))
        layout_row = torch.add(word_row, seq_start, alpha=M * W).view(-1)  # layout row of each word
        layout_row = layout_row if word_pad is None else layout_row.masked_fill_(word_pad, 0)
        biases = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        qkv = kernels.GatherProject.apply(
            x.reshape(B * N, d),
            layout_word,
            layout_row + filler,
            word_pad,
            torch.cat([p.weight[cols] for p in (self.q_proj, self.k_proj, self.v_proj)]),
            None if biases[0] is None else torch.cat([b[cols] for b in biases]),
        )  # layout rows x 3 H hd
        n_keys = 2 * W if paired else W
        allowed = (key_ok | layout_empty[..., None]).expand(B, M, W, n_keys).reshape(B * M, 1, W, n_keys)
        dropout_p = self.dropout if self.training else 0.0
        out = kernels.block_attention(qkv, allowed, W, H, hd, paired, dropout_p)  # (B M W) x H hd
        out_weight = self.out_proj.weight if heads is None else self.out_proj.weight[:, cols]
        out = kernels.ScatterProject.apply(
            out,
            layout_row,
            word_pad,
            layout_word[filler:],
            layout_empty.expand(B, M, W).reshape(-1),
            out_weight,
            self.out_proj.bias if h0 == 0 else None,
        )
        return out.view(B, N, d)

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
