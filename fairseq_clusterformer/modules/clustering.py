"""Neural clustering (ClusterFormer, Wang et al., ACL 2022, section 3) in plain torch.

Every step of the method is a function here, in the order the paper gives them, on batch-first
tensors with padding (B sequences of N positions, sequence b has L_b real words):

    U  = X (C W_C)^T / sqrt(d)                  word_centroid_scores      B x N x K
    a_j = argmax_i U_ji                         assign_to_clusters        B x N  (-1 at padding)
    C' = softmax_words(U)^T X                   update_centroids          B x K x d
    clustering loss = mean_j -sim(x_j, c'_a_j)  clustering_loss           scalar
    sorting loss = mean_i -sim(c'_i, c'_i+1)    sorting_loss              scalar
    stable sort by (a_j, j)                     sorted_word_idx / undo_sorted_word_idx
    blocks of w_b = ceil(L_b / k_b) sorted words, each seeing itself and the block before
                                                sorted_block_visibility (or block_visibility
                                                in the original word order)

ClusterAttention's reference path (``impl="reference"``) is these functions and dense masked
attention, nothing else; its fast path computes the same with the fused kernels of kernels.py.
``causal_visibility`` states the decoder's rule (this project's design, docs/attention.md).

Choices the paper leaves open, made here (docs/attention.md): the 1/sqrt(d) scale of U; the
similarity in the losses, cosine (default) or the dot product divided by d; the sorting loss
averaged over the sequences that have a pair; padding never counts.
"""

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .constants import arange, filled

COSINE_EPS = 1e-6  # cosine similarity: a.b / max(|a| |b|, eps)
SIMILARITIES = ("cosine", "dot")


class Words(NamedTuple):
    """Padding information of one forward, computed once (``words_of``)."""

    pad: Optional[Tensor]  # B x N bool, True at padding; None when the batch has no padding
    validf: Optional[Tensor]  # 1 at real words, 0 at padding, in the input dtype (None without padding)
    lengths: Tensor  # B long: L_b
    n_words: Tensor  # scalar (loss_dtype of the input): real words in the batch, at least 1


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses are summed and returned in: float32 for half-precision input (a
    float16 sum over more than 65,504 words would overflow, and the loss would silently read 0),
    else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def words_of(x: Tensor, key_padding_mask: Optional[Tensor], assume_padding: bool = False) -> Words:
    """The padding information of x (B x N x d) under key_padding_mask (B x N, True at padding).

    A mask without any padding is dropped (the batch then skips all masking), at the cost of one
    host sync. ``assume_padding``: the caller has checked that the mask holds padding (fairseq's
    encoder and decoder pass a mask only then), so the check and its sync are skipped; were it
    wrong, the masking would change nothing but the time."""
    B, N, _ = x.shape
    pad = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, N):
            raise ValueError(f"key_padding_mask must be B x N = {(B, N)}, got {tuple(key_padding_mask.shape)}")
        pad = key_padding_mask.to(torch.bool)
        if not assume_padding and not bool(pad.any()):
            pad = None
    if pad is None:  # sizes known on the host: no reductions, and tensors made once per size
        lengths = filled((B,), N, torch.long, x.device)
        return Words(None, None, lengths, filled((), B * N, loss_dtype(x.dtype), x.device))
    valid = ~pad
    lengths = valid.sum(1)
    return Words(pad, valid.to(x.dtype), lengths, lengths.sum().clamp(min=1).to(loss_dtype(x.dtype)))


def cluster_counts(lengths: Tensor, num_clusters: Union[int, str], max_clusters: int) -> Tuple[Tensor, int]:
    """k_b per sequence (B long) and K = max k_b, the width of the centroid tensors.
    ``num_clusters="auto"``: k_b = ceil(sqrt(L_b)), clipped to [1, max_clusters]."""
    if num_clusters == "auto":
        k = torch.ceil(torch.sqrt(lengths.to(torch.float64))).long().clamp(1, max_clusters)
        return k, int(k.max())
    return filled(lengths.shape, num_clusters, torch.long, lengths.device), num_clusters


def block_sizes(lengths: Tensor, k_b: Tensor) -> Tensor:
    """w_b = ceil(L_b / k_b) (at least 1): each sequence is cut into k_b blocks of its own length."""
    return torch.div(lengths + k_b - 1, k_b, rounding_mode="floor").clamp(min=1)


def similarity(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """sim(a, b) over the last dimension: cosine a.b / max(|a| |b|, eps), or (``dot``) a.b / d."""
    dot = (a * b).sum(-1)
    if kind == "cosine":
        return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=COSINE_EPS)
    return dot / a.size(-1)


def word_centroid_scores(x: Tensor, projected_centroids: Tensor) -> Tensor:
    """U = X (C W_C)^T / sqrt(d): x B x N x d, projected_centroids (C W_C) B x K x d -> B x N x K."""
    return x @ projected_centroids.transpose(1, 2) / math.sqrt(x.size(-1))


def assign_to_clusters(scores: Tensor, k_b: Tensor, pad: Optional[Tensor]) -> Tensor:
    """a_j = argmax over the k_b clusters of sequence b of U_j: B x N long, -1 at padding."""
    K = scores.size(-1)
    beyond_k = torch.arange(K, device=scores.device) >= k_b[:, None]  # B x K: clusters sequence b lacks
    assign = scores.masked_fill(beyond_k[:, None, :], torch.finfo(scores.dtype).min).argmax(-1)
    return assign if pad is None else assign.masked_fill(pad, -1)


def update_centroids(scores: Tensor, x: Tensor, pad: Optional[Tensor]) -> Tensor:
    """C' = softmax over the real words of U, times X: B x K x d."""
    if pad is not None:  # a finite fill: a fully padded sequence softmaxes to uniform, not NaN
        scores = scores.masked_fill(pad[:, :, None], torch.finfo(scores.dtype).min)
    return scores.softmax(dim=1).transpose(1, 2) @ x


def clustering_loss(x: Tensor, new_centroids: Tensor, assign: Tensor, words: Words, kind: str) -> Tensor:
    """Mean over real words of -sim(x_j, c'_{a_j})."""
    B, N, d = x.shape
    own = new_centroids.gather(1, assign.clamp(min=0)[:, :, None].expand(B, N, d))  # B x N x d
    sim = similarity(x, own, kind)
    if words.pad is not None:
        sim = sim.masked_fill(words.pad, 0.0)
    return -sim.sum(dtype=words.n_words.dtype) / words.n_words


def sorting_pair_weights(k_b: Tensor, K: int, dtype, fixed_k: bool = False, negated: bool = False) -> Tensor:
    """B x K-1 weights that turn the pair similarities into the sorting loss: the mean over
    pairs (i, i+1) with i + 1 < k_b, averaged over the sequences that have pairs.
    ``fixed_k`` (every k_b is K): the same weights, 1 / ((K-1) B) everywhere, as one 1 x K-1
    tensor (it broadcasts over the batch), made once per size. ``negated``: minus the weights
    (the sorting loss is minus the weighted sum)."""
    if fixed_k:
        return filled((1, K - 1), (-1.0 if negated else 1.0) / max(1, (K - 1) * k_b.size(0)), dtype, k_b.device)
    clusters = torch.arange(K, device=k_b.device)[None, :] < k_b[:, None]  # B x K
    pair_ok = clusters[:, 1:].to(dtype)  # B x K-1
    n_pairs = pair_ok.sum(1, keepdim=True)
    has_pairs = (n_pairs > 0).to(dtype)
    n_seqs = has_pairs.sum().clamp(min=1)
    return pair_ok * (has_pairs / (n_pairs.clamp(min=1) * (n_seqs.neg_() if negated else n_seqs)))


def sorting_loss(new_centroids: Tensor, k_b: Tensor, kind: str) -> Tensor:
    """Mean over adjacent centroid pairs of -sim(c'_i, c'_{i+1}) (see sorting_pair_weights)."""
    pair_sim = similarity(new_centroids[:, :-1], new_centroids[:, 1:], kind)  # B x K-1
    return -(pair_sim * sorting_pair_weights(k_b, new_centroids.size(1), loss_dtype(pair_sim.dtype))).sum()


def cluster_words(x: Tensor, projected_centroids: Tensor, words: Words, k_b: Tensor, kind: str, assign=None):
    """The whole clustering step: (a B x N, C' B x K x d, clustering loss, sorting loss).
    ``assign``: given assignments (the decoder's per-word ones) instead of the argmax of U."""
    scores = word_centroid_scores(x, projected_centroids)
    if assign is None:
        assign = assign_to_clusters(scores, k_b, words.pad)
    elif words.pad is not None:
        assign = assign.masked_fill(words.pad, -1)
    new_centroids = update_centroids(scores, x, words.pad)
    return (
        assign,
        new_centroids,
        clustering_loss(x, new_centroids, assign, words, kind),
        sorting_loss(new_centroids, k_b, kind),
    )


def sorted_word_idx(assign: Tensor, num_clusters: int) -> Tensor:
    """Stable sort of each sequence's words by (cluster, position), padding (assignment -1) last.
    assign: B x N -> B x N, the original position of the word at each sorted position, so
    ``x.gather(1, idx)`` sorts (for B x N x d, expand idx over d)."""
    B, N = assign.shape
    pos = arange(N, assign.device).expand(B, N)
    cluster = assign.remainder(num_clusters + 1)  # -1 (padding) -> K: after every cluster
    return torch.argsort(torch.add(pos, cluster, alpha=N), dim=1)  # unique keys: any sort is stable


def undo_sorted_word_idx(sorted_idx: Tensor) -> Tensor:
    """The inverse permutation: B x N, the sorted position of each original word, so
    ``y_sorted.gather(1, undo)`` puts the words back in their original order."""
    pos = arange(sorted_idx.size(1), sorted_idx.device).expand_as(sorted_idx)
    return torch.empty_like(sorted_idx).scatter_(1, sorted_idx, pos)


def sort_by_cluster(assign: Tensor, num_clusters: int) -> Tuple[Tensor, Tensor]:
    """(sorted_word_idx, undo_sorted_word_idx) of assign (B x N)."""
    sorted_idx = sorted_word_idx(assign, num_clusters)
    return sorted_idx, undo_sorted_word_idx(sorted_idx)


def sorted_block_visibility(lengths: Tensor, w_b: Tensor, N: int, previous_block: bool) -> Tensor:
    """Encoder, in sorted order: sorted word r of sequence b is in block r // w_b and sees its
    own block and (with previous_block) the block before; the L_b real words come first and
    padding is never seen. B x N (queries) x N (keys)."""
    r = torch.arange(N, device=lengths.device)
    visible = block_visibility(r.expand(lengths.size(0), N), w_b, previous_block)  # sorted position = rank
    return visible & (r[None, None, :] < lengths[:, None, None])


def block_visibility(undo_sort: Tensor, w_b: Tensor, previous_block: bool) -> Tensor:
    """Encoder, in the original word order: word j is in block undo_sort_j // w_b; the same
    rule as sorted_block_visibility, B x N x N (padding is left to the caller)."""
    block = torch.div(undo_sort, w_b[:, None], rounding_mode="floor")  # B x N
    visible = block[:, None, :] == block[:, :, None]
    if previous_block:
        visible |= block[:, None, :] == block[:, :, None] - 1
    return visible


def causal_visibility(assign: Tensor, window: int, num_heads: int, local_heads: int) -> Tensor:
    """Decoder (this project's design): a clustered head at position t sees the last ``window``
    words of t's cluster up to t; a local head (the first ``local_heads``) the last ``window``
    real words up to t. assign: B x N (-1 at padding). Returns B x H x N x N."""
    B, N = assign.shape
    pos = torch.arange(N, device=assign.device)
    not_future = pos[None, :] <= pos[:, None]  # N x N: key position <= query position

    def last_w(member: Tensor) -> Tensor:
        """member: B x N x N, True where key s is in query t's group. The group's last w up to t."""
        order = member.cumsum(-1)  # rank of each key in the group, counting from the left
        count = (member & not_future).sum(-1, keepdim=True)  # group members up to t
        return member & not_future & (count - order < window)

    real = assign >= 0
    clustered = last_w((assign[:, :, None] == assign[:, None, :]) & real[:, None, :])
    recent = last_w(real[:, None, :].expand(B, N, N))
    is_local = torch.arange(num_heads, device=assign.device) < local_heads  # H
    return torch.where(is_local[None, :, None, None], recent[:, None], clustered[:, None])
