"""The reference path: neural clustering attention in plain autograd (``impl="reference"``).

The same function as the fast path of cluster_attention.py, written to be read: every step of
the algorithm is one or two tensor operations, and attention is dense multi-head attention
under a mask that says which words each word may see. That costs B H N^2 memory, so use it to
read, check and debug the algorithm, not to train on long inputs. Tests compare it with the
fast path on values and gradients (tests/test_reference_parity.py).

tests/reference_cluster_attention.py is a third, independent statement: a float64 oracle with
Python loops over sentences, heads and queries, sharing no code with this package.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .cluster_attention import ClusterInfo, Words, block_visibility, sort_by_cluster
from .kernels import COSINE_EPS


def similarity(attn, a: Tensor, b: Tensor) -> Tensor:
    """sim(a, b) over the last dimension: cosine a.b / max(|a| |b|, eps), or a.b / d."""
    dot = (a * b).sum(-1)
    if attn.similarity == "cosine":
        return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=COSINE_EPS)
    return dot / a.size(-1)


def reference_forward(attn, x: Tensor, words: Words, centroids):
    B, N, d = x.shape
    pad = words.pad if words.pad is not None else torch.zeros(B, N, dtype=torch.bool, device=x.device)
    real = ~pad
    k_b, K = attn.cluster_counts(words.lengths)
    fill = torch.finfo(x.dtype).min  # finite: a fully padded sequence softmaxes to uniform, not NaN

    commitment_loss = None
    if attn.router is not None:
        # A router (the LSH and routing baselines) assigns each word by itself; no centroids.
        assign, clustering_loss, sorting_loss, commitment_loss = attn.route(x, words)
        new_centroids = None
    else:
        # 1. Similarity of words and centroids, U = X (C W_C)^T / sqrt(d): B x N x K.
        C = attn.layer_centroids(x, words, centroids)  # B x K x d
        U = x @ attn.centroid_proj(C).transpose(1, 2) / math.sqrt(d)

        # 2. Each word goes to its most similar centroid (the decoder: per word, see assign_per_word).
        if attn.causal:
            assign = attn.assign_per_word(x)
        else:
            beyond_k = torch.arange(K, device=x.device) >= k_b[:, None]  # B x K: clusters sequence b lacks
            assign = U.masked_fill(beyond_k[:, None, :], fill).argmax(-1)
        assign = assign.masked_fill(pad, -1)  # B x N

        # 3. Updated centroids C' = softmax over the real words of U, times X: B x K x d.
        new_centroids = U.masked_fill(pad[:, :, None], fill).softmax(dim=1).transpose(1, 2) @ x

        # 4. Clustering loss: mean over real words of -sim(x_j, c'_{a_j}); sorting loss: mean over
        #    adjacent pairs (i, i+1 < k_b) of -sim(c'_i, c'_{i+1}), averaged over sequences with pairs.
        own = new_centroids.gather(1, assign.clamp(min=0)[:, :, None].expand(B, N, d))  # B x N x d
        clustering_loss = -(similarity(attn, x, own) * real).sum() / words.n_words
        pair_sim = similarity(attn, new_centroids[:, :-1], new_centroids[:, 1:])  # B x K-1
        sorting_loss = -(pair_sim * attn.sorting_pair_weights(k_b, K, x.dtype)).sum()

    # 5. Which words each word may see: B x H x N (queries) x N (keys).
    visible = _causal_visibility(attn, assign) if attn.causal else _block_visibility(attn, assign, words, k_b, K)
    visible = visible & real[:, None, None, :]
    visible = visible | pad[:, None, :, None]  # padding queries see everything (finite, discarded)

    # 6. Multi-head attention under that mask; padding rows zeroed; output projection.
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = (p(x).view(B, N, H, hd).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    dropout_p = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)  # B x H x N x hd
    out = out.transpose(1, 2).reshape(B, N, d).masked_fill(pad[:, :, None], 0.0)
    out = attn.out_proj(out)
    info = ClusterInfo(None if attn.causal else new_centroids, clustering_loss, sorting_loss, assign, commitment_loss)
    return out, info


def _block_visibility(attn, assign: Tensor, words: Words, k_b: Tensor, K: int) -> Tensor:
    """Encoder: sort words by (cluster, position), cut sequence b's sorted words into blocks of
    w_b = ceil(L_b / k_b); a word sees the words of its own block and (with previous_block) of
    the block before. Returns B x 1 x N x N."""
    _, undo_sort = sort_by_cluster(assign, K)  # B x N: sorted position of each word
    w_b = torch.div(words.lengths + k_b - 1, k_b, rounding_mode="floor").clamp(min=1)
    return block_visibility(undo_sort, w_b, attn.previous_block and K > 1)[:, None]


def _causal_visibility(attn, assign: Tensor) -> Tensor:
    """Decoder: a clustered head at position t sees the last ``window`` words of t's cluster up
    to t; a local head (the first ``local_heads``) the last ``window`` real words up to t.
    Returns B x H x N x N."""
    B, N = assign.shape
    w = attn.window
    pos = torch.arange(N, device=assign.device)
    not_future = pos[None, :] <= pos[:, None]  # N x N: key position <= query position

    def last_w(member: Tensor) -> Tensor:
        """member: B x N x N, True where key s is in query t's group. The group's last w up to t."""
        order = member.cumsum(-1)  # B x N x N: rank of each key in the group, counting from the left
        count = (member & not_future).sum(-1, keepdim=True)  # group members up to t
        return member & not_future & (count - order < w)

    real = assign >= 0
    same_cluster = (assign[:, :, None] == assign[:, None, :]) & real[:, None, :]
    clustered = last_w(same_cluster)
    recent = last_w(real[:, None, :].expand(B, N, N))
    is_local = torch.arange(attn.num_heads, device=assign.device) < attn.local_heads  # H
    return torch.where(is_local[None, :, None, None], recent[:, None], clustered[:, None])
