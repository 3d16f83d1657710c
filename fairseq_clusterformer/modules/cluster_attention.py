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
per step, without knowing the final length. With ``local_heads`` = h > 0, the first h heads
instead attend to the ``window`` most recent words whatever their cluster (a sliding causal
window, as the local heads of the Routing Transformer): every word then sees its own recent
context, and the other heads its cluster. docs/attention.md has the derivation and costs.
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


class _Words(NamedTuple):
    """Padding information of one forward, computed once."""

    pad: Optional[Tensor]  # B x N bool, True at padding; None when the batch has no padding
    validf: Optional[Tensor]  # 1 at real words, 0 at padding, in the input dtype (None without padding)
    lengths: Tensor  # B long: L_b
    n_words: Tensor  # scalar (input dtype): real words in the batch, at least 1


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


# The two row permutations around block attention (words -> block slots -> words) are one-to-one
# on the rows that matter: every word is in exactly one block slot, and every other row (padding
# words, filler rows, empty block slots, a real word repeated into an empty slot) has exactly zero
# gradient (masked keys whose query outputs are never read). Their backward passes are therefore
# gathers (``grad[inverse]``, zeroed where ``inverse_pad`` is True), not autograd's zero-fill plus
# index_add, with the same values. Each one is fused with the projection next to it, so that the
# permuted copy of the words (or of the attention output) is a temporary, not a saved activation.
# ``None`` for a mask means that nothing needs zeroing (a batch without padding).


def _gather_rows(t: Tensor, index: Tensor, zero: Optional[Tensor]) -> Tensor:
    """t[index], with the rows where ``zero`` is True set to 0 (index must be in range everywhere)."""
    rows = t.index_select(0, index)
    return rows if zero is None else rows.masked_fill_(zero[:, None], 0.0)


class _GatherProject(torch.autograd.Function):
    """Words in block order, projected by the stacked q|k|v weight.

    x: (B N) x d words; index: rows of x making the block layout (with ``paired``, W filler rows
    first; see _block_attention); inverse / inverse_pad: the block-layout row of each word (see
    above). Returns the layout rows x 3d projection. Its backward receives the gradient in the
    same rows x 3d form (_FlashBlockAttention and _PairedViews write it so): one matmul for the
    input gradient and one for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, inverse_pad, weight, bias):
        ctx.save_for_backward(x, index, inverse, inverse_pad, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.index_select(0, index), weight, bias)  # rows x 3d (the gathered words are freed)

    @staticmethod
    def backward(ctx, grad_qkv: Tensor):
        x, index, inverse, inverse_pad, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _gather_rows(torch.mm(grad_qkv, weight), inverse, inverse_pad)
        if ctx.needs_input_grad[4]:
            grad_weight = torch.mm(grad_qkv.t(), x.index_select(0, index))  # recomputed: cheaper than keeping it
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad_qkv.sum(0)
        return grad_x, None, None, None, grad_weight, grad_bias


def _find_flash_cpu_ops():
    """torch's CPU flash-attention forward and backward ops, if this torch has them with masks."""
    try:
        ops = (
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
        )
        if all("attn_mask" in str(op.default._schema) for op in ops):
            return ops
    except (AttributeError, RuntimeError):
        pass
    return None


_FLASH_CPU_OPS = _find_flash_cpu_ops()
# False: always compute block attention with F.scaled_dot_product_attention (and its autograd).
# The tests run both paths.
USE_FLASH_CPU_KERNEL = True
# The flash path's backward runs over chunks of blocks of about this many bytes of q|k|v
# gradient (at most _MAX_BACKWARD_CHUNKS chunks): only one chunk's kernel output is alive beside
# the rows x 3d gradient. Small chunks also keep the allocator's heap from growing: measured at
# N = 2048, batch 20, d 512 (424 MB of block gradients), the peak resident memory of a training
# step was 774 / 782 / 820 / 925 MiB with chunks of 1 / 4 / 16 / 64 MiB
# (scripts/profile_attention.py --memory --batch 20 --backward-chunk-mib C).
_BACKWARD_CHUNK_BYTES = 4 << 20
_MAX_BACKWARD_CHUNKS = 256


def _qkv_views(qkv: Tensor, W: int, H: int, hd: int, paired: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """q (M x W x H x hd) and k, v (M x n_keys x H x hd) as views of the rows x 3d projection.

    With ``paired``, the first W rows are filler and block m's keys are rows [m W, m W + 2W): the
    block before it (the filler for m = 0) and its own, as overlapping strided views, so each key
    and value is computed and stored once.
    """
    rows, width = qkv.shape
    d = width // 3
    filler = W if paired else 0
    M = (rows - filler) // W
    q = qkv[filler:, :d].view(M, W, H, hd)
    if not paired:
        return q, qkv[:, d : 2 * d].view(M, W, H, hd), qkv[:, 2 * d :].view(M, W, H, hd)
    pair = lambda offset: qkv.as_strided(  # noqa: E731
        (M, 2 * W, H, hd), (W * width, width, hd, 1), qkv.storage_offset() + offset
    )
    return q, pair(d), pair(2 * d)


def _additive_mask(allowed: Tensor, dtype) -> Tensor:
    """bool mask (True: may attend) -> 0 / -inf in ``dtype``, the form the flash kernel takes."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _new_qkv_grad(qkv: Tensor, W: int, paired: bool) -> Tensor:
    """An uninitialised gradient for qkv, but for the filler rows, which only _add_block_grads
    adds to (the previous-block keys of block 0, all masked), and which are zeroed here."""
    grad = torch.empty_like(qkv)
    if paired:
        grad[:W].zero_()
    return grad


def _add_block_grads(grad_qkv: Tensor, first: int, gq: Tensor, gk: Tensor, gv: Tensor, W: int, paired: bool):
    """Writes the q, k, v gradients of query blocks [first, first + c) into grad_qkv (rows x 3d,
    from _new_qkv_grad; call it for consecutive chunks of blocks in order).

    gq: c x W x H x hd; gk, gv: c x n_keys x H x hd. A paired query block m's keys are layout
    blocks m (its previous block) and m + 1 (its own): the own halves are copied to layout blocks
    [first + 1, first + c], then the previous halves added to [first, first + c). Every layout
    block is so written once and then added to once (layout block 0: only added to), so the
    overlapping keys are summed without a 2x-sized copy, and without zeroing the gradient first.
    """
    c = gq.size(0)
    d = grad_qkv.size(1) // 3
    layout = grad_qkv.view(-1, W, 3, d)  # layout blocks x W x {q, k, v} x d
    own = first + 1 if paired else first  # layout block of the first query block
    layout[own : own + c, :, 0].copy_(gq.reshape(c, W, d))
    for part, g in ((1, gk), (2, gv)):
        g = g.reshape(c, -1, d)
        layout[own : own + c, :, part].copy_(g[:, -W:])
        if paired:
            layout[first : first + c, :, part].add_(g[:, :W])  # not +=, whose setitem copies the view onto itself


class _PairedViews(torch.autograd.Function):
    """q, k, v as views of the rows x 3d projection (_qkv_views), for F.scaled_dot_product_attention.

    Its backward folds the gradients of the overlapping key/value views (each M x 2W, twice the
    size of k and v) into one rows x 3d gradient. Used where _FlashBlockAttention is not: on CUDA,
    with attention dropout, or with a torch that lacks the CPU flash op.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, W: int, H: int, hd: int, paired: bool):
        ctx.dims = (W, paired)
        ctx.save_for_backward(qkv)
        return _qkv_views(qkv, W, H, hd, paired)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        W, paired = ctx.dims
        grad_qkv = _new_qkv_grad(ctx.saved_tensors[0], W, paired)
        _add_block_grads(grad_qkv, 0, grad_q, grad_k, grad_v, W, paired)
        return grad_qkv, None, None, None, None


class _FlashBlockAttention(torch.autograd.Function):
    """Attention of every block's queries to its keys on the rows x 3d q|k|v projection, with
    torch's CPU flash-attention kernels and a backward that runs in chunks of blocks.

    qkv: rows x 3d (see _qkv_views); allowed: M x 1 x W x n_keys bool, True where a query may see
    a key. Returns the attention output, (M W) x (H hd), rows in block-slot order.

    Why: with paired keys, k and v are overlapping views, and F.scaled_dot_product_attention's
    autograd returns their gradients as separate M x 2W tensors, twice the size of k and v, all
    at once; beside qkv, the saved output and the incoming gradient, that made the attention
    backward the layer's memory peak (about 11 B N d floats, against about 9 for full attention
    with sdpa). Here the backward runs the same flash backward kernel on chunks of blocks and
    adds each chunk's gradients straight into one rows x 3d gradient: the same arithmetic, and
    one chunk of extra memory instead of two copies of k and v.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, allowed: Tensor, W: int, H: int, hd: int, paired: bool):
        q, k, v = (t.transpose(1, 2) for t in _qkv_views(qkv, W, H, hd, paired))  # M x H x W|n_keys x hd
        out, lse = _FLASH_CPU_OPS[0](q, k, v, 0.0, False, attn_mask=_additive_mask(allowed, qkv.dtype))
        ctx.dims = (W, H, hd, paired)
        ctx.save_for_backward(qkv, allowed, out, lse)
        # out: M x H x W x hd, laid out as M x W x H x hd like the queries, so this is a view.
        return out.transpose(1, 2).reshape(-1, H * hd)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        W, H, hd, paired = ctx.dims
        qkv, allowed, out, lse = ctx.saved_tensors
        q, k, v = (t.transpose(1, 2) for t in _qkv_views(qkv, W, H, hd, paired))
        grad_out = grad_out.reshape(-1, W, H, hd).transpose(1, 2)  # M x H x W x hd
        grad_qkv = _new_qkv_grad(qkv, W, paired)
        M = q.size(0)
        block_bytes = (q.size(2) + 2 * k.size(2)) * H * hd * qkv.element_size()  # one block's gradients
        n_chunks = min(_MAX_BACKWARD_CHUNKS, max(1, (M * block_bytes) // _BACKWARD_CHUNK_BYTES))
        size = -(-M // n_chunks)
        # A loop over memory-sized chunks (each one kernel call over many blocks), not over blocks.
        for first in range(0, M, size):
            c = slice(first, first + size)
            gq, gk, gv = _FLASH_CPU_OPS[1](
                grad_out[c], q[c], k[c], v[c], out[c], lse[c], 0.0, False,
                attn_mask=_additive_mask(allowed[c], qkv.dtype),
            )  # M_c x H x W|n_keys x hd
            _add_block_grads(grad_qkv, first, gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2), W, paired)
        return grad_qkv, None, None, None, None, None


def _block_sdpa(qkv: Tensor, allowed: Tensor, W: int, H: int, hd: int, paired: bool, dropout_p: float) -> Tensor:
    """Block attention on the rows x 3d projection -> (M W) x (H hd), rows in block-slot order."""
    if USE_FLASH_CPU_KERNEL and _FLASH_CPU_OPS is not None and qkv.device.type == "cpu" and dropout_p == 0.0:
        return _FlashBlockAttention.apply(qkv, allowed, W, H, hd, paired)
    q, k, v = _PairedViews.apply(qkv, W, H, hd, paired)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, dropout_p=dropout_p
    )  # M x H x W x hd, laid out as M x W x H x hd like the queries
    return out.transpose(1, 2).reshape(-1, H * hd)


class _ScatterProject(torch.autograd.Function):
    """Attention output back in word order (zero at padding), then the output projection.

    out: (M W) x d in block layout; slot / slot_pad: the layout row of each word (in range
    everywhere) and where it is padding; inverse / inverse_pad: the word held by each layout
    row (see above). The backward brings the output gradient into block order once and computes
    both the input and the weight gradient there, so no word-order copy of the attention output
    is kept for the backward.
    """

    @staticmethod
    def forward(ctx, out, slot, slot_pad, inverse, inverse_pad, weight, bias):
        ctx.save_for_backward(out, inverse, inverse_pad, weight)
        ctx.has_bias = bias is not None
        return F.linear(_gather_rows(out, slot, slot_pad), weight, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        out, inverse, inverse_pad, weight = ctx.saved_tensors
        grad_blocks = _gather_rows(grad_y, inverse, inverse_pad)  # (M W) x d
        grad_out = torch.mm(grad_blocks, weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad_blocks.t().mm(out) if ctx.needs_input_grad[5] else None
        grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[6] else None
        return grad_out, None, None, None, None, grad_weight, grad_bias


class _Clustering(torch.autograd.Function):
    """Assignments, updated centroids C' and both losses, with one fused backward.

    Forward (per sequence; U is kept as N x K):
        U = X (C W_C)^T / sqrt(d);  a_j = argmax over real clusters of U_j (unless given)
        P = softmax over real words of U;  C' = P^T X
        clustering loss = -mean over real words of sim(x_j, c'_{a_j})
        sorting loss = sum over adjacent pairs of pair_weight * -sim(c'_i, c'_{i+1})
    with sim(a, b) = a.b / max(|a| |b|, eps) (cosine) or a.b / d (dot). Autograd would write four
    N x d gradients of X (through U, C', the dot products and the norms) and add them up, with
    a few dozen small operations around them; this backward writes one, with a single matmul
    over the three N x K factors stacked ([P, dU, S] @ [dC', C W_C, C']) plus the norm term in
    place. tests/test_cluster_attention.py checks it against a float64 reference and gradcheck.

    pad: B x N True at padding, or None (no padding); validf: pad as 0/1 weights (None with
    pad); n_words: number of real words (scalar); cluster_pad: B x K True for clusters beyond
    k_b, or None (all real); pair_weight: B x K-1 weights of the pair similarities.
    """

    @staticmethod
    def forward(ctx, x, cw, pad, validf, n_words, cluster_pad, pair_weight, assign, cosine):
        B, N, d = x.shape
        K = cw.size(1)
        scale = 1.0 / math.sqrt(d)
        scores = torch.baddbmm(x.new_zeros(()).expand(B, N, K), x, cw.transpose(1, 2), beta=0, alpha=scale)  # U
        # Finite fill values: safe in fp16/bf16, and an all-padding row softmaxes to uniform, not NaN.
        fill = torch.finfo(scores.dtype).min
        if assign is None:
            assign = (scores if cluster_pad is None else scores.masked_fill(cluster_pad[:, None, :], fill)).argmax(2)
        own = assign  # B x N, in range everywhere
        probs = torch.softmax(scores if pad is None else scores.masked_fill_(pad[:, :, None], fill), dim=1)
        cents = torch.bmm(probs.transpose(1, 2), x)  # C': B x K x d
        dots = torch.bmm(x, cents.transpose(1, 2)).gather(2, own[:, :, None])[:, :, 0]  # B x N
        pair_dots = (cents[:, :-1] * cents[:, 1:]).sum(-1)  # B x K-1
        none = x.new_empty(0)
        if cosine:
            x_norm = torch.linalg.vector_norm(x, dim=-1)  # B x N
            c_norm = torch.linalg.vector_norm(cents, dim=-1)  # B x K
            own_norm = c_norm.gather(1, own)
            denom = x_norm * own_norm
            inv = denom.clamp(min=_COSINE_EPS).reciprocal_() if pad is None else validf / denom.clamp(min=_COSINE_EPS)
            word_sim = dots * inv  # zero at padding
            pair_denom = c_norm[:, :-1] * c_norm[:, 1:]
            pair_sim = pair_dots / pair_denom.clamp(min=_COSINE_EPS)
            extra = (inv, word_sim, denom, x_norm, own_norm, c_norm, pair_sim, pair_denom)
        else:
            word_sim = dots / d if pad is None else dots * (validf / d)
            pair_sim = pair_dots / d
            extra = (none if pad is None else validf,)
        clustering_loss = -word_sim.sum() / n_words
        sorting_loss = -(pair_sim * pair_weight).sum()
        ctx.save_for_backward(x, cw, probs, cents, own, n_words, pair_weight, none if pad is None else pad, *extra)
        ctx.cosine, ctx.scale = cosine, scale
        ctx.mark_non_differentiable(assign)
        return (assign if pad is None else assign.masked_fill(pad, -1)), cents, clustering_loss, sorting_loss

    @staticmethod
    def backward(ctx, _grad_assign, grad_cents, grad_clustering, grad_sorting):
        x, cw, probs, cents, own, n_words, pair_weight, pad = ctx.saved_tensors[:8]
        B, N, d = x.shape
        K = cw.size(1)
        grad_c = torch.zeros_like(cents) if grad_cents is None else grad_cents.clone()
        g = grad_clustering / n_words  # d clustering_loss / d (sum of word similarities) is -g
        grad_pair_sim = pair_weight * -grad_sorting  # B x K-1
        coef = None
        if ctx.cosine:
            inv, word_sim, denom, x_norm, own_norm, c_norm, pair_sim, pair_denom = ctx.saved_tensors[8:]
            # sim = dot / max(den, eps): d/d dot = 1 / max(den, eps); d/d den = -sim / den where den >= eps.
            grad_dots = inv * -g
            grad_denom = (word_sim * inv * g).masked_fill_(denom < _COSINE_EPS, 0.0)
            pair_denom_c = pair_denom.clamp(min=_COSINE_EPS)
            grad_pair_dots = grad_pair_sim / pair_denom_c
            grad_pair_denom = (-grad_pair_sim * pair_sim / pair_denom_c) * (pair_denom >= _COSINE_EPS)
            grad_c_norm = torch.zeros_like(c_norm).scatter_add_(1, own, grad_denom * x_norm)  # B x K
            grad_c_norm[:, :-1] += grad_pair_denom * c_norm[:, 1:]
            grad_c_norm[:, 1:] += grad_pair_denom * c_norm[:, :-1]
            # d|v|/dv = v / |v| (0 at v = 0, as autograd's norm: there v = 0 and the term vanishes)
            grad_c.addcmul_(cents, (grad_c_norm / c_norm.clamp(min=torch.finfo(c_norm.dtype).tiny))[:, :, None])
            coef = grad_denom * own_norm / x_norm.clamp(min=torch.finfo(x_norm.dtype).tiny)  # B x N, times x
        else:
            validf = ctx.saved_tensors[8]
            grad_dots = (-g / d).expand(B, N) if validf.numel() == 0 else validf * (-g / d)
            grad_pair_dots = grad_pair_sim / d
        grad_c[:, :-1].addcmul_(cents[:, 1:], grad_pair_dots[:, :, None])
        grad_c[:, 1:].addcmul_(cents[:, :-1], grad_pair_dots[:, :, None])
        one_hot = torch.zeros_like(probs).scatter_(2, own[:, :, None], grad_dots[:, :, None])  # S: B x N x K
        grad_c.baddbmm_(one_hot.transpose(1, 2), x)  # through the word-centroid dot products
        grad_probs = torch.bmm(x, grad_c.transpose(1, 2))  # B x N x K
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(1, keepdim=True))
        # Padding scores were filled: no gradient (their probabilities are 0 unless a whole
        # sequence is padding).
        grad_scores.mul_(ctx.scale)
        if pad.numel():
            grad_scores.masked_fill_(pad[:, :, None], 0.0)
        grad_cw = torch.bmm(grad_scores.transpose(1, 2), x)  # B x K x d
        grad_x = torch.bmm(
            torch.cat([probs, grad_scores, one_hot], dim=2), torch.cat([grad_c, cw.expand(B, K, d), cents], dim=1)
        )
        if coef is not None:
            grad_x.addcmul_(x, coef[:, :, None])
        return grad_x, grad_cw, None, None, None, None, None, None, None


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
        if isinstance(local_heads, bool) or not isinstance(local_heads, int) or not 0 <= local_heads <= num_heads:
            raise ValueError(f"local_heads must be an integer in [0, num_heads={num_heads}], got {local_heads!r}")
        if local_heads and not causal:
            raise ValueError("local_heads is for the causal (decoder) variant; the encoder's blocks already see their neighbours")
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
        self.local_heads = local_heads
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
            f"local_heads={self.local_heads if self.causal else None}, "
            f"previous_block={self.previous_block if not self.causal else None}, similarity={self.similarity}"
        )

    # ------------------------------------------------------------------------------------------
    # shared pieces
    def _cluster(self, x: Tensor, words: "_Words", centroids: Tensor, n_clusters: Tensor, assign=None):
        """Assign words to clusters, update the centroids, compute both losses (_Clustering).

        x: B x N x d, centroids: B x K x d, n_clusters: B (k_b <= K). assign: precomputed B x N
        assignments (the causal variant computes them per word). Returns assignments (B x N,
        -1 at padding), C' (B x K x d), clustering and sorting losses.
        """
        K = centroids.size(1)
        # k_b < K only with num_clusters="auto": there, clusters beyond k_b take no words.
        clusters = torch.arange(K, device=x.device)[None, :] < n_clusters[:, None]  # B x K
        # Sorting loss: mean over pairs (i, i+1) with i + 1 < k_b, averaged over the sequences
        # that have pairs.
        pair_ok = clusters[:, 1:].to(x.dtype)  # B x K-1
        n_pairs = pair_ok.sum(1, keepdim=True)
        has_pairs = (n_pairs > 0).to(x.dtype)
        pair_weight = pair_ok * (has_pairs / (n_pairs.clamp(min=1) * has_pairs.sum().clamp(min=1)))
        return _Clustering.apply(
            x, self.centroid_proj(centroids), words.pad, words.validf, words.n_words,
            None if self.num_clusters != "auto" else ~clusters, pair_weight, assign, self.similarity == "cosine",
        )

    @staticmethod
    def _sort(assign: Tensor, n_clusters_total: int, has_pad: bool) -> Tuple[Tensor, Tensor]:
        """Sort by (cluster, position), padding (assignment -1) last. Returns perm (sorted ->
        original position) and rank (original position -> sorted index), both B x N."""
        B, N = assign.shape
        pos = torch.arange(N, device=assign.device).expand(B, N)
        cluster = assign.remainder(n_clusters_total + 1) if has_pad else assign  # -1 (padding) -> K
        key = torch.add(pos, cluster, alpha=N)  # unique keys
        perm = torch.argsort(key, dim=1)
        rank = torch.empty_like(perm).scatter_(1, perm, pos)
        return perm, rank

    def _block_attention(
        self,
        x: Tensor,
        words: "_Words",
        src: Tensor,
        slot: Tensor,
        key_ok: Tensor,
        query_ok: Tensor,
        paired: bool,
        heads: Optional[Tuple[int, int]] = None,
    ) -> Tensor:
        """Attention inside blocks of the sorted sequence, back in the original order, out_proj applied.

        x: B x N x d; src: B x M x W original position held by each block slot (in range
        everywhere); slot: B x N the block slot (index into M W) of each real word (anything at
        padding); key_ok: B x M x W x n_keys (or broadcastable) which keys each query may see
        (n_keys = 2W with ``paired``: block i sees block i-1 then itself; W otherwise);
        query_ok: B x M x W slots holding a real word (the others see every key, so that their
        discarded rows stay finite). Returns B x N x d: out_proj of the attention output, which
        is zero at padding.

        The words are gathered into block order once and projected by one fused q|k|v matmul;
        the [previous, own] keys and values of every block are overlapping views of that result,
        so nothing is copied twice. Both row gathers (into block order and back) are one-to-one
        on the real words, so their backward passes are gathers too; each is fused with the
        projection next to it (_GatherProject, _ScatterProject).

        heads: (first, end) computes only those heads: their rows of the q/k/v projections and
        their columns of out_proj (whose bias is added only by the part holding head 0), so the
        parts of a layer whose heads attend differently add up to the whole layer's output.
        """
        B, N, d = x.shape
        M, W = src.shape[1:]
        hd = self.head_dim
        h0, h1 = heads if heads is not None else (0, self.num_heads)
        H, cols = h1 - h0, slice(h0 * hd, h1 * hd)
        arange_b = torch.arange(B, device=x.device)[:, None]
        pad_rows = None if words.pad is None else words.pad.view(-1)
        slot_pad = ~query_ok  # B|1 x M x W
        filler = W if paired else 0  # W rows in front: the "previous block" of the first block (masked)
        index = src.new_zeros(filler + B * M * W)  # rows of x making the block layout
        src = torch.add(src.view(B, M * W), arange_b, alpha=N, out=index[filler:].view(B, M * W)).view(-1)
        slot = torch.add(slot, arange_b, alpha=M * W).view(-1)  # block row of each word
        slot = slot if pad_rows is None else slot.masked_fill_(pad_rows, 0)
        biases = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        qkv = _GatherProject.apply(
            x.reshape(B * N, d), index, slot + filler, pad_rows,
            torch.cat([p.weight[cols] for p in (self.q_proj, self.k_proj, self.v_proj)]),
            None if biases[0] is None else torch.cat([b[cols] for b in biases]),
        )  # layout rows x 3 H hd
        n_keys = 2 * W if paired else W
        allowed = (key_ok | slot_pad[..., None]).expand(B, M, W, n_keys).reshape(B * M, 1, W, n_keys)
        out = _block_sdpa(qkv, allowed, W, H, hd, paired, self.dropout if self.training else 0.0)  # (B M W) x H hd
        out_weight = self.out_proj.weight if heads is None else self.out_proj.weight[:, cols]
        out = _ScatterProject.apply(
            out, slot, pad_rows, src, slot_pad.expand(B, M, W).reshape(-1), out_weight, self.out_proj.bias if h0 == 0 else None
        )
        return out.view(B, N, d)

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
            pad = pad if bool(pad.any()) else None  # a batch without padding skips all masking
        valid = None if pad is None else ~pad
        lengths = torch.full((B,), N, device=x.device) if pad is None else valid.sum(1)  # L_b
        words = _Words(pad, None if pad is None else valid.to(x.dtype), lengths, lengths.sum().clamp(min=1).to(x.dtype))
        if self.causal:
            return self._forward_causal(x, words)
        return self._forward_blocks(x, words, centroids)

    def _cluster_counts(self, lengths: Tensor) -> Tuple[Tensor, int]:
        if self.num_clusters == "auto":
            k = torch.ceil(torch.sqrt(lengths.to(torch.float64))).long().clamp(1, self.max_clusters)
            return k, int(k.max())
        return torch.full_like(lengths, self.num_clusters), self.num_clusters

    def _forward_blocks(self, x: Tensor, words: "_Words", centroids: Optional[Tensor]):
        B, N, d = x.shape
        lengths = words.lengths
        k_b, K = self._cluster_counts(lengths)
        if centroids is None:
            if self.centroids is None:
                raise ValueError("this layer has no learned centroids: pass the previous layer's centroids")
            centroids = self.centroids[:K].to(x.dtype).unsqueeze(0).expand(B, K, d)
        elif centroids.dim() != 3 or centroids.size(0) not in (1, B) or centroids.shape[1:] != (K, d):
            raise ValueError(f"centroids must be B x {K} x {d}, got {tuple(centroids.shape)}")
        else:
            centroids = centroids.expand(B, K, d)

        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(x, words, centroids, k_b)
        perm, rank = self._sort(assign, K, words.pad is not None)

        # Block layout: sequence b's sorted word r goes to block r // w_b, slot r % w_b. Without
        # padding every sequence has the same layout: the index tensors below are computed once
        # (leading dimension 1) and broadcast.
        w_b = torch.div(lengths + k_b - 1, k_b, rounding_mode="floor").clamp(min=1)  # ceil(L_b / k_b)
        W = int(w_b.max())
        per_seq = (w_b if words.pad is not None else w_b[:1])[:, None, None]  # B (or 1) x 1 x 1
        blk = torch.arange(K, device=x.device)[None, :, None]
        slot = torch.arange(W, device=x.device)[None, None, :]
        sorted_index = blk * per_seq + slot  # B|1 x K x W: sorted rank held by each slot
        slot_ok = (slot < per_seq) & (sorted_index < (lengths if words.pad is not None else lengths[:1])[:, None, None])
        src = perm.gather(1, sorted_index.clamp(max=N - 1).view(-1, K * W).expand(B, K * W)).view(B, K, W)

        paired = self.previous_block and K > 1
        key_ok = slot_ok
        if paired:
            # Keys of block i: block i-1 (none for block 0: blocks do not wrap around), then block i.
            key_ok = torch.cat([F.pad(slot_ok, (0, 0, 1, -1)), slot_ok], dim=2)  # B|1 x K x 2W
        # Original position j sits in slot (rank_j // w_b) * W + rank_j % w_b = rank_j + (rank_j // w_b) (W - w_b).
        flat = rank if words.pad is None else torch.addcmul(
            rank, torch.div(rank, w_b[:, None], rounding_mode="floor"), W - w_b[:, None]
        )  # B x N
        out = self._block_attention(x, words, src, flat, key_ok[:, :, None, :], slot_ok, paired)
        return out, ClusterInfo(new_centroids, clustering_loss, sorting_loss, assign)

    # ------------------------------------------------------------------------------------------
    # causal (decoder) variant
    def _decoder_centroids(self, B: int, dtype) -> Tensor:
        return self.centroids.to(dtype).unsqueeze(0).expand(B, -1, -1)

    @torch.no_grad()
    def _assign_per_word(self, x: Tensor) -> Tensor:
        """argmax_i (c_i W_C) . x_t for each word, ... x d -> ... long.

        Defined as the argmax of an elementwise product summed over d, in the input dtype: every
        word gets the same floating-point result whether it comes in a full sequence or alone in
        a decoding step (a batched matmul may block the reduction differently by shape and flip
        a near-tie). Materialising that product for all words costs N x K x d, so the argmax is
        taken from a float64 matmul instead wherever its top two scores are further apart than
        the rounding error of either computation can bridge (then both argmaxes agree), and the
        elementwise product is computed only for the remaining near-ties: the same result as
        computing it everywhere.
        """
        cw = self.centroid_proj(self.centroids.to(x.dtype))  # K x d
        exact = lambda rows: (rows.unsqueeze(-2) * cw).sum(-1).argmax(-1)  # noqa: E731
        if cw.size(0) == 1:
            return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        d = x.size(-1)
        flat = x.reshape(-1, d)
        top = torch.matmul(flat.double(), cw.double().t()).topk(2, dim=-1)  # rows x 2
        # Both sums of d products are within gamma_d * sum_i |x_i c_i| <= (d + 2) eps |x| |c| of the
        # exact dot product (any summation order; the float64 one far closer).
        bound = 2 * (d + 2) * torch.finfo(x.dtype).eps * flat.double().norm(dim=-1) * cw.double().norm(dim=-1).max()
        assign = top.indices[:, 0]
        near = (top.values[:, 0] - top.values[:, 1] <= bound).nonzero()[:, 0]
        assign[near] = exact(flat[near])
        return assign.view(x.shape[:-1])

    def _forward_causal(self, x: Tensor, words: "_Words"):
        B, N, d = x.shape
        K = self.num_clusters
        k_b = torch.full((B,), K, dtype=torch.long, device=x.device)
        # The centroids are a parameter: assignments of word t depend on x_t alone. C' (which sees
        # all words) only feeds the losses, never the forward path, so causality holds.
        assign, new_centroids, clustering_loss, sorting_loss = self._cluster(
            x, words, self._decoder_centroids(B, x.dtype), k_b, assign=self._assign_per_word(x)
        )
        H, Hl = self.num_heads, self.local_heads
        out = None  # the clustered heads' and the local heads' shares of out_proj's output, summed
        if Hl < H:
            out = self._causal_band_attention(x, words, assign, K, (Hl, H))
        if Hl > 0:
            # Local heads: the same band with every real word in one cluster (padding -1).
            everyone = assign.clamp(max=0)
            local = self._causal_band_attention(x, words, everyone, 1, (0, Hl))
            out = local if out is None else local + out
        return out, ClusterInfo(None, clustering_loss, sorting_loss, assign)

    def _causal_band_attention(self, x: Tensor, words: "_Words", assign: Tensor, K: int, heads: Tuple[int, int]):
        """Heads [heads[0], heads[1]) of the causal variant: each word attends to the most recent
        ``window`` words of its cluster under ``assign`` (B x N, -1 at padding), itself included.
        Returns their share of out_proj's output, B x N x d."""
        B, N, _ = x.shape
        w = self.window
        perm, rank = self._sort(assign, K, words.pad is not None)

        # Sorted order puts each cluster's words together, in position order. A word at sorted
        # index r sees sorted indices (r - w, r] of its own cluster: its w most recent cluster
        # mates. Blocks of w sorted words; block j's queries need only blocks j-1 and j. A
        # sequence no longer than w is one block of N words that needs no previous block.
        b = min(w, N)  # block size
        paired = N > w
        n_blocks = -(-N // b)
        P = n_blocks * b
        perm_p = F.pad(perm, (0, P - N))
        sorted_assign = F.pad(assign.gather(1, perm), (0, P - N), value=-1)  # B x P (-1: padding)

        s_cluster = sorted_assign.view(B, n_blocks, b)
        prev_cluster = F.pad(s_cluster, (0, 0, 1, -1), value=-1)  # block j-1 (none before block 0)
        key_cluster = torch.cat([prev_cluster, s_cluster], dim=2) if paired else s_cluster  # B x nb x n_keys

        qi = torch.arange(b, device=x.device)[:, None]  # query slot within block
        ki = torch.arange(key_cluster.size(2), device=x.device)[None, :] - (b if paired else 0)  # same frame
        band = (ki <= qi) & (ki > qi - w)  # b x n_keys: sorted distance in [0, w)
        same = key_cluster[:, :, None, :] == s_cluster[:, :, :, None]  # B x nb x b x n_keys
        return self._block_attention(
            x, words, perm_p.view(B, n_blocks, b), rank, band & same, s_cluster >= 0, paired,
            None if heads == (0, self.num_heads) else heads,
        )

    def init_state(self, batch_size: int, device=None, dtype=None, mode: str = "ring") -> Dict[str, Tensor]:
        """An empty cache for incremental decoding (batch on dim 0).

        ``mode="ring"``: per sequence and cluster, a ring buffer of the last ``window`` keys and
        values (K x window slots from the first step on): O(window * d) per step whatever the
        length. ``mode="auto"``: first the keys, values and clusters of the whole prefix, as a
        standard decoder keeps them (O(t * d) per step), switched to the ring buffers once the
        prefix reaches K x window positions. Both give the same outputs; "auto" keeps far less
        while the output is short, which matters in beam search, where the whole cache is
        reordered at every step (fairseq's adapter uses it).
        """
        K, w, H, hd = self.num_clusters, self.window, self.num_heads, self.head_dim
        Hl = self.local_heads
        p = self.q_proj.weight
        device = device or p.device
        dtype = dtype or p.dtype
        if mode == "auto":
            return {
                "prefix_key": torch.zeros(batch_size, 0, H, hd, device=device, dtype=dtype),
                "prefix_value": torch.zeros(batch_size, 0, H, hd, device=device, dtype=dtype),
                "prefix_cluster": torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            }
        if mode != "ring":
            raise ValueError(f"mode must be 'ring' or 'auto', got {mode!r}")
        return {  # clustered heads (Hl..H-1): per cluster; local heads (0..Hl-1): one ring of any cluster
            "cluster_key": torch.zeros(batch_size, K, w, H - Hl, hd, device=device, dtype=dtype),
            "cluster_value": torch.zeros(batch_size, K, w, H - Hl, hd, device=device, dtype=dtype),
            "cluster_count": torch.zeros(batch_size, K, dtype=torch.long, device=device),
            "local_key": torch.zeros(batch_size, w, Hl, hd, device=device, dtype=dtype),
            "local_value": torch.zeros(batch_size, w, Hl, hd, device=device, dtype=dtype),
            "local_count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(
        self, x: Tensor, state: Optional[Dict[str, Tensor]] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Decode one position (causal variant): x is B x 1 x d (or B x d).

        The state (``init_state``; None starts a ring-buffer one) holds per sequence and cluster
        the last ``window`` keys and values and the number of words seen, or (``mode="auto"``)
        the whole prefix until it reaches K x window positions. A padding step
        (``key_padding_mask`` True) changes nothing that later steps see and outputs zero
        before ``out_proj``. Returns (B x 1 x d output, new state); ring buffers are updated in
        place.
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
        # Three matmuls, not one on concatenated weights: a step has few rows, and concatenating
        # the 3 d x d weights would copy more memory than the matmuls read.
        q, k, v = (p(x0).view(B, H, hd) for p in (self.q_proj, self.k_proj, self.v_proj))

        Hl = self.local_heads
        if "prefix_key" in state:
            # Whole prefix: a clustered head attends to the last w words of this word's cluster, a
            # local head to the last w real words; both include the word itself.
            keys = torch.cat([state["prefix_key"], k[:, None]], 1)  # B x t+1 x H x hd
            values = torch.cat([state["prefix_value"], v[:, None]], 1)
            clusters = torch.cat([state["prefix_cluster"], cluster.masked_fill(~real, -1)[:, None]], 1)  # -1: padding
            same = clusters == cluster[:, None]  # B x t+1
            visible = (same & (same.flip(1).cumsum(1).flip(1) <= w))[:, None, :]  # at most w from here on
            if Hl:
                seen = clusters >= 0
                recent = (seen & (seen.flip(1).cumsum(1).flip(1) <= w))[:, None, :]
                is_local = torch.arange(H, device=x.device)[None, :, None] < Hl
                visible = torch.where(is_local, recent, visible)  # B x H x t+1
            visible = visible | ~real[:, None, None]  # a padding step's (discarded) row stays finite
            state = {"prefix_key": keys, "prefix_value": values, "prefix_cluster": clusters}
            if keys.size(1) >= self.num_clusters * w:
                state = self._prefix_to_ring(keys, values, clusters)
            out = F.scaled_dot_product_attention(
                q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, :, None, :]
            )  # B x H x 1 x hd
        else:
            batch = torch.arange(B, device=x.device)
            slots = torch.arange(w, device=x.device)[None, :]
            parts = []
            if Hl:
                # Local heads: one ring buffer of the last w real words.
                seen = state["local_count"]  # B
                slot = seen % w
                lk, lv = state["local_key"], state["local_value"]
                lk[batch, slot] = torch.where(real[:, None, None], k[:, :Hl], lk[batch, slot])
                lv[batch, slot] = torch.where(real[:, None, None], v[:, :Hl], lv[batch, slot])
                state["local_count"] = seen + real.long()
                visible = (slots < state["local_count"].clamp(max=w)[:, None]) | ~real[:, None]  # B x w
                parts.append(F.scaled_dot_product_attention(
                    q[:, :Hl, None, :], lk.transpose(1, 2), lv.transpose(1, 2), attn_mask=visible[:, None, None, :]
                ))
            if Hl < H:
                keys, values, count = state["cluster_key"], state["cluster_value"], state["cluster_count"]
                seen = count[batch, cluster]  # B: words of this cluster so far
                slot = seen % w
                # Write this word's key/value into its cluster's ring buffer (padding steps write nothing).
                old_k, old_v = keys[batch, cluster, slot], values[batch, cluster, slot]
                keys[batch, cluster, slot] = torch.where(real[:, None, None], k[:, Hl:], old_k)
                values[batch, cluster, slot] = torch.where(real[:, None, None], v[:, Hl:], old_v)
                count[batch, cluster] = seen + real.long()

                keys, values = keys[batch, cluster], values[batch, cluster]  # B x w x H-Hl x hd
                visible = slots < count[batch, cluster].clamp(max=w)[:, None]  # B x w
                visible = visible | ~real[:, None]  # a padding step's (discarded) row stays finite
                parts.append(F.scaled_dot_product_attention(
                    q[:, Hl:, None, :], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None, None, :]
                ))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # B x H x 1 x hd
        out = out.reshape(B, 1, d) * real[:, None, None].to(out.dtype)
        out = self.out_proj(out)
        return (out[:, 0] if squeeze else out), state

    def _prefix_to_ring(self, keys: Tensor, values: Tensor, clusters: Tensor) -> Dict[str, Tensor]:
        """The ring-buffer state equal to a whole-prefix one: the n-th word of cluster c (n from 0)
        sits in slot n % w of c's buffer, if it is among c's last w words."""
        B, T = clusters.shape
        K, w = self.num_clusters, self.window
        real = clusters >= 0
        c = clusters.clamp(min=0)
        seen = (F.one_hot(c, K) * real[..., None]).cumsum(1)  # B x T x K: words of each cluster so far
        count = seen[:, -1]  # B x K
        n = seen.gather(2, c[..., None])[..., 0] - 1  # B x T: index of each word within its cluster
        keep = real & (count.gather(1, c) - n <= w)
        b, j = keep.nonzero(as_tuple=True)
        state = self.init_state(B, keys.device, keys.dtype)
        Hl = self.local_heads
        state["cluster_key"][b, c[b, j], n[b, j] % w] = keys[b, j, Hl:]
        state["cluster_value"][b, c[b, j], n[b, j] % w] = values[b, j, Hl:]
        state["cluster_count"] = count
        # Local heads: the m-th real word (from 0) sits in slot m % w if it is among the last w.
        m = real.long().cumsum(1) - 1  # B x T
        total = m[:, -1] + 1
        b, j = (real & (total[:, None] - m <= w)).nonzero(as_tuple=True)
        state["local_key"][b, m[b, j] % w] = keys[b, j, :Hl]
        state["local_value"][b, m[b, j] % w] = values[b, j, :Hl]
        state["local_count"] = total
        return state

    @staticmethod
    def reorder_state(state: Dict[str, Tensor], new_order: Tensor) -> Dict[str, Tensor]:
        """Beam search: select/reorder the batch entries of a decoding state."""
        return {name: t.index_select(0, new_order) for name, t in state.items()}
