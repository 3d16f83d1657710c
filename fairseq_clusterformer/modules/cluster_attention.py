"""Neural clustering attention (ClusterFormer, Wang et al., ACL 2022), vectorised and exact.

This file imports only torch: copy it to use neural clustering attention in any PyTorch model.
Tensors are batch-first here (B x N x d); the fairseq adapter (fairseq_cluster_attention.py) turns
fairseq's time-first calls into these.

Encoder variant (``causal=False``), per sequence b with L_b real tokens and k_b clusters:

    U   = (C W_C) X^T / sqrt(d)                 (k x N)  similarity of centroids and words
    C'  = softmax_words(U) X                    (k x d)  updated centroids, padding excluded
    a_j = argmax_i U_ij                                  cluster of word j
    sort words stably by (a_j, j); cut the sorted sequence into k_b blocks of w_b = ceil(L_b/k_b)
    block i attends to itself and block i-1 (2 w_b keys); un-sort the result
    clustering loss = mean_j -sim(x_j, c'_{a_j});  sorting loss = mean_i -sim(c'_i, c'_{i+1})

Block size and boundaries come from each sequence's own length, and each sequence's sorted tokens
are laid out in its own k_b blocks, so a sentence's output does not depend on what it is batched
with or on how much left/right padding surrounds it.

Causal variant (``causal=True``, the decoder): C is a learned parameter of the layer (it depends
on no token), words are sorted by (cluster, position), and each word attends to the most recent
``window`` words of its own cluster up to and including itself. In sorted order that is a band of
width ``window`` inside the word's cluster, computed blockwise with 2*window keys per query block.
Nothing after position t reaches t, and decoding one token at a time with a per-cluster ring
buffer of the last ``window`` keys/values gives the same result as the full forward at O(window*d)
per step, without knowing the final length. docs/attention.md has the derivation and costs.
"""
import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIMILARITIES = ("cosine", "dot")
_COSINE_EPS = 1e-6  # cosine similarity: a.b / max(|a| |b|, eps)


class ClusterInfo(NamedTuple):
    """What one clustering layer hands to the next layer and to the criterion."""

    centroids: Optional[Tensor]  # B x K x d updated centroids C' (None for the causal variant)
    clustering_loss: Tensor  # scalar: mean over real words of -sim(x_j, c'_{a_j})
    sorting_loss: Tensor  # scalar: mean over adjacent centroid pairs of -sim(c'_i, c'_{i+1})
    assignments: Tensor  # B x N long cluster index per word (-1 at padding)


def _check_positive_int(name, value, allow_auto=False):
    if allow_auto and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer{' or auto' if allow_auto else ''}, got {value!r}")
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


class _PairedBlocks(torch.autograd.Function):
    """Queries, and the keys/values of [previous block, own block], as views of one q|k|v tensor.

    qkv: (W + M W) x 3d: W filler rows, then M blocks of W rows. Returns q (M x W x H x hd) and
    k, v (M x 2W x H x hd), where block m's keys are rows [m W, m W + 2W): the block before it (the
    filler rows for m = 0) and its own. k and v are overlapping strided views, so each key and
    value is stored once; the backward adds both halves of their gradients back onto the rows.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, W: int, H: int, hd: int):
        rows, width = qkv.shape
        d = width // 3
        M = rows // W - 1
        ctx.dims = (M, W, H, hd)
        q = qkv[W:, :d].view(M, W, H, hd)
        pair = lambda offset: qkv.as_strided(  # noqa: E731
            (M, 2 * W, H, hd), (W * width, width, hd, 1), qkv.storage_offset() + offset
        )
        return q, pair(d), pair(2 * d)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        M, W, H, hd = ctx.dims
        grad = grad_q.new_empty(M + 1, W, 3, H, hd)
        grad[0, :, 0].zero_()
        grad[1:, :, 0].copy_(grad_q)
        gk, gv = grad[:, :, 1], grad[:, :, 2]  # (M + 1) x W x H x hd each
        gk[:M].copy_(grad_k[:, :W])  # rows as the previous block of block m + 1
        gv[:M].copy_(grad_v[:, :W])
        gk[M].zero_()
        gv[M].zero_()
        gk[1:].add_(grad_k[:, W:])  # rows as their own block
        gv[1:].add_(grad_v[:, W:])
        return grad.view((M + 1) * W, 3 * H * hd), None, None, None


class ClusterAttention(nn.Module):
    """Multi-head neural clustering attention.

    Args:
        embed_dim: model dimension d.
        num_heads: attention heads; d must be divisible by it.
        num_clusters: k, or ``"auto"`` for k_b = ceil(sqrt(L_b)) per sequence (encoder only).
        causal: the decoder variant (see the module docstring).
        window: causal only: how many most-recent words of its own cluster a word sees (itself
            included). Fixed by configuration, so incremental decoding is exact.
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
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_clusters: Union[int, str] = 3,
        *,
        causal: bool = False,
        window: int = 64,
        previous_block: bool = True,
        max_clusters: int = 256,
        learned_centroids: bool = True,
        similarity: str = "cosine",
        dropout: float = 0.0,
        bias: bool = True,
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
                raise ValueError("the causal variant needs learned_centroids=True (its centroids may not depend on tokens)")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_clusters = num_clusters
        self.causal = causal
        self.window = window
        self.previous_block = previous_block
        self.max_clusters = max_clusters
        self.similarity = similarity
        self.dropout = dropout

        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.centroid_proj = nn.Linear(embed_dim, embed_dim, bias=False)  # W_C
        n_centroids = max_clusters if num_clusters == "auto" else num_clusters
        self.centroids = nn.Parameter(torch.empty(n_centroids, embed_dim)) if learned_centroids else None
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
        nn.init.xavier_uniform_(self.centroid_proj.weight)
        if self.centroids is not None:
            # Random initialisation (the paper), at the scale of layer-normalised word states.
            nn.init.normal_(self.centroids, mean=0.0, std=1.0)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}, "
            f"causal={self.causal}, window={self.window if self.causal else None}, "
            f"previous_block={self.previous_block if not self.causal else None}, similarity={self.similarity}"
        )

    # ------------------------------------------------------------------------------------------
    # shared pieces
    def _sim(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise similarity used by both losses (last dim is d)."""
        if self.similarity == "cosine":
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            return (a * b).sum(-1) / norms.clamp(min=_COSINE_EPS)
        return (a * b).sum(-1) / a.size(-1)

    def _cluster(self, x: Tensor, valid: Tensor, centroids: Tensor, n_clusters: Tensor, assign=None):
        """Assign words to clusters and update the centroids.

        x: B x N x d, valid: B x N bool, centroids: B x K x d, n_clusters: B (k_b <= K).
        assign: precomputed B x N assignments (the causal variant computes them per word).
        Returns assignments (B x N, -1 at padding), C' (B x K x d), clustering and sorting losses.
        """
        B, N, d = x.shape
        K = centroids.size(1)
        scores = torch.matmul(self.centroid_proj(centroids), x.transpose(1, 2)) / math.sqrt(d)  # U: B x K x N
        cluster_ok = torch.arange(K, device=x.device)[None, :] < n_clusters[:, None]  # B x K
        # Finite fill values: safe in fp16/bf16, and an all-padding row softmaxes to uniform, not NaN.
        fill = torch.finfo(scores.dtype).min
        if assign is None:
            with torch.no_grad():
                assign = scores.masked_fill(~cluster_ok[:, :, None], fill).argmax(dim=1)  # B x N
        assign = assign.masked_fill(~valid, -1)
        weights = torch.softmax(scores.masked_fill(~valid[:, None, :], fill), dim=-1)  # B x K x N
        new_centroids = torch.matmul(weights, x)  # C': B x K x d

        # Clustering loss: each real word against its own updated centroid. Its dot product is
        # read off the B x N x K products (one small matmul) instead of gathering a B x N x d copy
        # of the centroids; the cosine divides by the two norms, as _sim does.
        own_index = assign.clamp(min=0)[:, :, None]  # B x N x 1
        dots = torch.matmul(x, new_centroids.transpose(1, 2)).gather(2, own_index)[:, :, 0]  # B x N
        if self.similarity == "cosine":
            c_norm = torch.linalg.vector_norm(new_centroids, dim=-1)  # B x K
            own_norm = c_norm.gather(1, own_index[:, :, 0])
            word_sim = dots / (torch.linalg.vector_norm(x, dim=-1) * own_norm).clamp(min=_COSINE_EPS)
        else:
            word_sim = dots / d
        n_words = valid.sum().clamp(min=1)
        clustering_loss = -(word_sim * valid).sum() / n_words
        # Sorting loss: adjacent centroid pairs (i, i+1), i + 1 < k_b, averaged per sequence.
        if K > 1:
            pair_ok = (torch.arange(1, K, device=x.device)[None, :] < n_clusters[:, None]).to(x.dtype)  # B x K-1
            pair_sim = self._sim(new_centroids[:, :-1], new_centroids[:, 1:])  # B x K-1
            per_seq = -(pair_sim * pair_ok).sum(1) / pair_ok.sum(1).clamp(min=1)
            has_pairs = (pair_ok.sum(1) > 0).to(x.dtype)
            sorting_loss = (per_seq * has_pairs).sum() / has_pairs.sum().clamp(min=1)
        else:
            sorting_loss = x.new_zeros(())
        return assign, new_centroids, clustering_loss, sorting_loss

    @staticmethod
    def _sort(assign: Tensor, valid: Tensor, n_clusters_total: int) -> Tuple[Tensor, Tensor]:
        """Stable sort by (cluster, position), padding last. Returns perm (sorted -> original
        position) and rank (original position -> sorted index), both B x N."""
        B, N = assign.shape
        pos = torch.arange(N, device=assign.device)[None, :].expand(B, N)
        key = torch.where(valid, assign, torch.full_like(assign, n_clusters_total)) * N + pos  # unique keys
        perm = torch.argsort(key, dim=1, stable=True)
        rank = torch.empty_like(perm).scatter_(1, perm, pos.contiguous())
        return perm, rank

    def _block_attention(self, x: Tensor, src: Tensor, key_ok: Tensor, query_ok: Tensor, paired: bool) -> Tensor:
        """Attention inside blocks of the sorted sequence; returns the output in block layout.

        x: B x N x d; src: B x M x W original position held by each block slot; key_ok:
        B x M x W x n_keys which keys each query may see (n_keys = 2W with ``paired``: block i
        sees block i-1 then itself; W otherwise); query_ok: B x M x W real query slots (the others
        see every key, so that their discarded rows stay finite). Returns (B M W) x d.

        The words are gathered into block order once and projected by one fused q|k|v matmul;
        the [previous, own] keys and values of every block are overlapping views of that result
        (_PairedBlocks), so nothing is copied twice.
        """
        B, N, d = x.shape
        M, W = src.shape[1:]
        H, hd = self.num_heads, self.head_dim
        index = (src + torch.arange(B, device=x.device)[:, None, None] * N).view(-1)
        if paired:  # W filler rows in front: the "previous block" of the first block (masked)
            index = torch.cat([index.new_zeros(W), index])
        xs = x.reshape(B * N, d).index_select(0, index)
        biases = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        qkv = F.linear(
            xs,
            torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
            None if biases[0] is None else torch.cat(biases),
        )  # rows x 3d
        if paired:
            q, k, v = _PairedBlocks.apply(qkv, W, H, hd)  # (B M) x W|2W x H x hd
        else:
            q, k, v = qkv.view(B * M, W, 3, H, hd).unbind(2)
        n_keys = k.size(1)
        mask = key_ok | ~query_ok[..., None]  # B x M x W x n_keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask.view(B * M, 1, W, n_keys),
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B M) x H x W x hd, laid out as (B M) x W x H x hd like the queries
        return out.transpose(1, 2).reshape(B * M * W, d)

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
        B, N, d = x.shape
        if key_padding_mask is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        else:
            if key_padding_mask.shape != (B, N):
                raise ValueError(f"key_padding_mask must be B x N = {(B, N)}, got {tuple(key_padding_mask.shape)}")
            valid = ~key_padding_mask.to(torch.bool)
        if self.causal:
            return self._forward_causal(x, valid)
        return self._forward_blocks(x, valid, centroids)

    def _cluster_counts(self, lengths: Tensor) -> Tuple[Tensor, int]:
        if self.num_clusters == "auto":
            k = torch.ceil(torch.sqrt(lengths.to(torch.float64))).long().clamp(1, self.max_clusters)
            return k, int(k.max())
        return torch.full_like(lengths, self.num_clusters), self.num_clusters

    def _forward_blocks(self, x: Tensor, valid: Tensor, centroids: Optional[Tensor]):
        B, N, d = x.shape
        H, hd = self.num_heads, self.head_dim
        lengths = valid.sum(1)  # L_b
        k_b, K = self._cluster_counts(lengths)
        if centroids is None:
            if self.centroids is None:
                raise ValueError("this layer has no learned centroids: pass the previous layer's centroids")
            centroids = self.centroids[:K].to(x.dtype).unsqueeze(0).expand(B, K, d)
        elif centroids.dim() != 3 or centroids.size(0) not in (1, B) or centroids.shape[1:] != (K, d):
            raise ValueError(f"centroids must be B x {K} x {d}, got {tuple(centroids.shape)}")
        else:
            centroids = centroids.expand(B, K, d)

        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(x, valid, centroids, k_b)
        perm, rank = self._sort(assign, valid, K)

        # Block layout: sequence b's sorted word r goes to block r // w_b, slot r % w_b.
        w_b = torch.div(lengths + k_b - 1, k_b, rounding_mode="floor").clamp(min=1)  # ceil(L_b / k_b)
        W = int(w_b.max())
        blk = torch.arange(K, device=x.device)[None, :, None]
        slot = torch.arange(W, device=x.device)[None, None, :]
        sorted_index = blk * w_b[:, None, None] + slot  # B x K x W: sorted rank held by each slot
        slot_ok = (slot < w_b[:, None, None]) & (sorted_index < lengths[:, None, None])  # B x K x W
        src = perm.gather(1, sorted_index.clamp(max=N - 1).view(B, K * W)).view(B, K, W)  # original positions

        paired = self.previous_block and K > 1
        key_ok = slot_ok
        if paired:
            # Keys of block i: block i-1 (none for block 0: blocks do not wrap around), then block i.
            key_ok = torch.cat([F.pad(slot_ok, (0, 0, 1, -1)), slot_ok], dim=2)  # B x K x 2W
        out = self._block_attention(x, src, key_ok[:, :, None, :], slot_ok, paired)  # (B K W) x d

        # Un-sort: original position j reads slot (rank_j // w_b) * W + rank_j % w_b.
        flat = torch.div(rank, w_b[:, None], rounding_mode="floor") * W + rank % w_b[:, None]  # B x N
        flat = torch.where(valid, flat, torch.zeros_like(flat)) + torch.arange(B, device=x.device)[:, None] * (K * W)
        out = out.index_select(0, flat.view(-1)).view(B, N, d).masked_fill_(~valid[:, :, None], 0.0)
        out = self.out_proj(out)
        return out, ClusterInfo(new_centroids, clustering_loss, sorting_loss, assign)

    # ------------------------------------------------------------------------------------------
    # causal (decoder) variant
    def _decoder_centroids(self, B: int, dtype) -> Tensor:
        return self.centroids.to(dtype).unsqueeze(0).expand(B, -1, -1)

    @torch.no_grad()
    def _assign_per_word(self, x: Tensor) -> Tensor:
        """argmax_i (c_i W_C) . x_t for each word, ... x d -> ... long.

        Computed as an elementwise product and a sum over d, which gives every word the same
        floating-point result whether it comes in a full sequence or alone in a decoding step (a
        batched matmul may block the reduction differently by shape and flip a near-tie).
        """
        cw = self.centroid_proj(self.centroids.to(x.dtype))  # K x d
        return (x.unsqueeze(-2) * cw).sum(-1).argmax(-1)

    def _forward_causal(self, x: Tensor, valid: Tensor):
        B, N, d = x.shape
        H, hd, w, K = self.num_heads, self.head_dim, self.window, self.num_clusters
        k_b = torch.full((B,), K, dtype=torch.long, device=x.device)
        # The centroids are a parameter: assignments of word t depend on x_t alone. C' (which sees
        # all words) only feeds the losses, never the forward path, so causality holds.
        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(
            x, valid, self._decoder_centroids(B, x.dtype), k_b, assign=self._assign_per_word(x)
        )
        perm, rank = self._sort(assign, valid, K)

        # Sorted order puts each cluster's words together, in position order. A word at sorted
        # index r sees sorted indices (r - w, r] of its own cluster: its w most recent cluster
        # mates. Blocks of w sorted words; block j's queries need only blocks j-1 and j.
        n_blocks = -(-N // w)
        P = n_blocks * w
        pad = P - N
        perm_p = F.pad(perm, (0, pad))
        sorted_assign = assign.gather(1, perm).masked_fill(~valid.gather(1, perm), -1)
        sorted_assign = F.pad(sorted_assign, (0, pad), value=-1)  # B x P (-1: padding)

        s_cluster = sorted_assign.view(B, n_blocks, w)
        key_cluster = torch.cat([F.pad(s_cluster, (0, 0, 1, -1), value=-1), s_cluster], dim=2)  # B x nb x 2w

        qi = torch.arange(w, device=x.device)[:, None]  # query slot within block
        ki = torch.arange(2 * w, device=x.device)[None, :] - w  # key offset, same frame
        band = (ki <= qi) & (ki > qi - w)  # w x 2w: sorted distance in [0, w)
        same = key_cluster[:, :, None, :] == s_cluster[:, :, :, None]  # B x nb x w x 2w
        out = self._block_attention(x, perm_p.view(B, n_blocks, w), band & same, s_cluster >= 0, paired=True)
        # Un-sort: position j reads sorted slot rank[j]; padding positions are zeroed.
        flat = rank + torch.arange(B, device=x.device)[:, None] * P
        out = out.index_select(0, flat.view(-1)).view(B, N, d).masked_fill_(~valid[:, :, None], 0.0)
        out = self.out_proj(out)
        return out, ClusterInfo(None, clustering_loss, sorting_loss, assign)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Dict[str, Tensor]:
        """An empty per-cluster cache for incremental decoding (batch on dim 0)."""
        K, w, H, hd = self.num_clusters, self.window, self.num_heads, self.head_dim
        p = self.q_proj.weight
        device = device or p.device
        dtype = dtype or p.dtype
        return {
            "cluster_key": torch.zeros(batch_size, K, w, H, hd, device=device, dtype=dtype),
            "cluster_value": torch.zeros(batch_size, K, w, H, hd, device=device, dtype=dtype),
            "cluster_count": torch.zeros(batch_size, K, dtype=torch.long, device=device),
        }

    def step(
        self, x: Tensor, state: Optional[Dict[str, Tensor]] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Decode one position (causal variant): x is B x 1 x d (or B x d).

        The state holds, per sequence and cluster, a ring buffer of the last ``window`` keys and
        values and the number of words seen; the cost is O(window * d) whatever the prefix length.
        A padding step (``key_padding_mask`` True) leaves the state unchanged and outputs zero
        before ``out_proj``. Returns (B x 1 x d output, new state); the state tensors are updated
        in place.
        """
        if not self.causal:
            raise RuntimeError("step() is for the causal variant; the encoder variant sees the whole sequence")
        squeeze = x.dim() == 2
        if squeeze:
            x = x[:, None]
        if x.dim() != 3 or x.size(1) != 1 or x.size(-1) != self.embed_dim:
            raise ValueError(f"step() takes one position, B x 1 x {self.embed_dim}; got {tuple(x.shape)}")
        B, _, d = x.shape
        H, hd, w = self.num_heads, self.head_dim, self.window
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        real = torch.ones(B, dtype=torch.bool, device=x.device)
        if key_padding_mask is not None:
            real = ~key_padding_mask.reshape(B).to(torch.bool)

        x0 = x[:, 0]  # B x d
        cluster = self._assign_per_word(x0)  # B
        q, k, v = (proj(x0).view(B, H, hd) for proj in (self.q_proj, self.k_proj, self.v_proj))

        keys, values, count = state["cluster_key"], state["cluster_value"], state["cluster_count"]
        batch = torch.arange(B, device=x.device)
        seen = count[batch, cluster]  # B: words of this cluster so far
        slot = seen % w
        # Write this word's key/value into its cluster's ring buffer (padding steps write nothing).
        old_k, old_v = keys[batch, cluster, slot], values[batch, cluster, slot]
        keys[batch, cluster, slot] = torch.where(real[:, None, None], k, old_k)
        values[batch, cluster, slot] = torch.where(real[:, None, None], v, old_v)
        count[batch, cluster] = seen + real.long()

        ck, cv = keys[batch, cluster], values[batch, cluster]  # B x w x H x hd
        filled = torch.arange(w, device=x.device)[None, :] < count[batch, cluster].clamp(max=w)[:, None]  # B x w
        filled = filled | ~real[:, None]  # a padding step's (discarded) row stays finite
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # B x H x 1 x hd
            ck.transpose(1, 2),
            cv.transpose(1, 2),
            attn_mask=filled[:, None, None, :],
        )  # B x H x 1 x hd
        out = out.reshape(B, 1, d) * real[:, None, None].to(out.dtype)
        out = self.out_proj(out)
        return (out[:, 0] if squeeze else out), state

    @staticmethod
    def reorder_state(state: Dict[str, Tensor], new_order: Tensor) -> Dict[str, Tensor]:
        """Beam search: select/reorder the batch entries of a decoding state."""
        return {name: t.index_select(0, new_order) for name, t in state.items()}
