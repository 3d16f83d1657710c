"""The fast path's kernels: custom autograd Functions around block attention and clustering.

ClusterAttention (cluster_attention.py) calls these on its fast path; its reference path
computes the same with clustering.py's plain torch functions. Each Function here exists for
memory or speed, and each is checked against the reference path, a float64 oracle and gradcheck
in tests/.

Terms used throughout:
    layout      the block layout of the sorted words: M blocks of W rows (M = B K for the encoder),
                optionally preceded by W filler rows (``paired``: the "previous block" of block 0)
    layout_word the word (row of the flattened B N x d input) held by each layout row
    word_row    the layout row holding each word (in range everywhere; anything at padding)
    word_pad    B N bool, True at padding words (None: no padding)
    layout_empty rows of the layout that hold no real word (filler, empty slots)
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .clustering import COSINE_EPS
from .constants import arange, constant_tensor

# The two row permutations around block attention (words -> block slots -> words) are one-to-one
# on the rows that matter: every word is in exactly one block slot, and every other row (padding
# words, filler rows, empty block slots, a real word repeated into an empty slot) has exactly zero
# gradient (masked keys whose query outputs are never read). Their backward passes are therefore
# gathers (``grad[word_row]``, zeroed at padding words), not autograd's zero-fill plus
# index_add, with the same values. Each one is fused with the projection next to it, so that the
# permuted copy of the words (or of the attention output) is a temporary, not a saved activation.
# ``None`` for a mask means that nothing needs zeroing (a batch without padding).


def gather_rows(t: Tensor, index: Tensor, zero: Optional[Tensor]) -> Tensor:
    """t[index], with the rows where ``zero`` is True set to 0 (index must be in range everywhere)."""
    rows = t.index_select(0, index)
    return rows if zero is None else rows.masked_fill_(zero[:, None], 0.0)


class GatherProject(torch.autograd.Function):
    """Words in block order, projected by the stacked q|k|v weights of their head groups.

    x: (B N) x d words; layout_word: the word held by each layout row (``filler`` rows first,
    then G groups of R rows: group g's blocks, for its heads); word_row: (B N) x G, the row of
    each word in each group's layout (filler not counted; anything at padding); word_pad: where
    words are padding; weight: 3 D x d, the q, then k, then v rows of the call's heads in order
    (D = heads x head_dim each), group g being the g-th equal share of the heads; bias: 3 D or
    None. Returns the (filler + G R) x C projection (C = 3 D / G): each group's rows projected
    by its own heads' q|k|v rows (the filler rows: zero with G > 1, masked keys either way). Its
    backward receives the gradient in the same form (FlashBlockAttention and PairedViews write
    it so): one matmul for the input gradient (with G > 1 over every group's rows of each word
    side by side), and one, batched over the groups, for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, layout_word, word_row, word_pad, weight, bias, filler, groups):
        G, d = groups, weight.size(1)
        if G > 1:  # G x C x d: each group's q|k|v rows together (the q|k|v layout the views expect)
            weight = weight.view(3, G, -1, d).transpose(0, 1).reshape(G, -1, d)
            bias = None if bias is None else bias.view(3, G, -1).transpose(0, 1).reshape(G, -1)
        ctx.save_for_backward(x, layout_word, word_row, word_pad, weight.view(G, -1, d))
        ctx.has_bias, ctx.filler = bias is not None, filler
        if G == 1:  # the filler rows read word 0: one matmul over every row
            return F.linear(x.index_select(0, layout_word), weight, bias)
        C = weight.size(1)
        rows = x.index_select(0, layout_word[filler:]).view(G, -1, d)  # the gathered words are freed
        qkv = x.new_empty(filler + rows.size(0) * rows.size(1), C)
        qkv[:filler].zero_()
        out = qkv[filler:].view(G, -1, C)
        if bias is None:
            torch.bmm(rows, weight.transpose(1, 2), out=out)
        else:
            torch.baddbmm(bias[:, None, :], rows, weight.transpose(1, 2), out=out)
        return qkv

    @staticmethod
    def backward(ctx, grad_qkv: Tensor):
        x, layout_word, word_row, word_pad, weight = ctx.saved_tensors
        G, C, d = weight.shape
        # The filler rows are keys that every query masks: their gradient is zero.
        grad = grad_qkv[ctx.filler :]  # G R x C
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if G == 1:  # the layout rows' input gradient, then each word's row (d wide)
                grad_x = gather_rows(torch.mm(grad, weight[0]), word_row.view(-1), word_pad)
            else:  # (B N) x G C: every group's gradient row of each word, times the G C x d weight
                grad_x = torch.mm(grad.index_select(0, word_row.view(-1)).view(-1, G * C), weight.view(G * C, d))
                if word_pad is not None:
                    grad_x.masked_fill_(word_pad[:, None], 0.0)
        if ctx.needs_input_grad[4]:
            # recomputed: cheaper than keeping the gathered words alive
            rows = x.index_select(0, layout_word[ctx.filler :])
            if G == 1:
                grad_weight = torch.mm(grad.t(), rows)
            else:  # G x C x d, then the q, k and v rows of every group together again
                grad_weight = torch.bmm(grad.view(G, -1, C).transpose(1, 2), rows.view(G, -1, d))
                grad_weight = grad_weight.view(G, 3, -1, d).transpose(0, 1).reshape(-1, d)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad.view(G, -1, C).sum(1).view(G, 3, -1).transpose(0, 1).reshape(-1)
        return grad_x, None, None, None, grad_weight, grad_bias, None, None


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


FLASH_CPU_OPS = _find_flash_cpu_ops()
# False: always compute block attention with F.scaled_dot_product_attention (and its autograd).
# The tests run both paths.
USE_FLASH_CPU_KERNEL = True
# Local and clustered heads, as many of each, attend in one block-attention call (attend_in_blocks
# with two head groups) on CUDA, where a training step waits on kernel launches. On the CPU they
# take one call each: the same time there, and the backward then holds one group's q|k|v gradient
# at a time instead of both, which lowers the causal layer's peak training memory. True: the one
# call on the CPU too (the tests, and scripts/count_launches, which counts the CUDA code path).
HEAD_GROUPS_IN_ONE_CALL_ON_CPU = False
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
    and value is computed and stored once (under torch.compile, concatenated copies: see below).
    """
    rows, width = qkv.shape
    d = width // 3
    filler = W if paired else 0
    M = (rows - filler) // W
    q = qkv[filler:, :d].view(M, W, H, hd)
    if not paired:
        return q, qkv[:, d : 2 * d].view(M, W, H, hd), qkv[:, 2 * d :].view(M, W, H, hd)
    if torch.compiler.is_compiling():
        # Compiled, inductor (torch 2.13) gives the copy it makes of the overlapping view fixed
        # strides in the backward graph: a second sequence length then fails its stride check.
        # Concatenated pairs of blocks have symbolic strides (one copy of k and v, which the
        # CPU's compiled graph made anyway): M x 2W x 2d, keys then values.
        blocks = qkv[:, d:].view(M + 1, W, 2 * d)
        kv = torch.cat([blocks[:-1], blocks[1:]], dim=1)
        return q, kv[:, :, :d].view(M, 2 * W, H, hd), kv[:, :, d:].view(M, 2 * W, H, hd)
    # (M + 1) x (W width) rows of layout blocks -> M x 2 x (W width) overlapping windows of two
    # consecutive blocks -> M x 2W x width, a view (no storage_offset arithmetic).
    pairs = qkv.view(M + 1, W * width).unfold(0, 2, 1).transpose(1, 2).reshape(M, 2 * W, width)
    return q, pairs[:, :, d : 2 * d].view(M, 2 * W, H, hd), pairs[:, :, 2 * d :].view(M, 2 * W, H, hd)


def additive_mask(allowed: Tensor, dtype) -> Tensor:
    """bool mask (True: may attend) -> 0 / -inf in ``dtype``, the form the attention kernels take.

    scaled_dot_product_attention makes the same of a bool mask itself, from two scalar tensors
    it creates on the mask's device at every call: three kernel launches on a GPU, where this
    is one (the two values are made once per dtype and device). The same values, so the same
    result. Inside torch.compile the bool mask is returned (the conversion fuses there)."""
    if torch.compiler.is_compiling():
        return allowed
    device = allowed.device
    values = constant_tensor(
        ("mask values", dtype, device), lambda: torch.tensor([0.0, float("-inf")], dtype=dtype, device=device)
    )
    return torch.where(allowed, values[0], values[1])


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


class PairedViews(torch.autograd.Function):
    """q, k, v as views of the rows x 3d projection (_qkv_views), for F.scaled_dot_product_attention.

    Its backward folds the gradients of the overlapping key/value views (each M x 2W, twice the
    size of k and v) into one rows x 3d gradient. Used where FlashBlockAttention is not: on CUDA,
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


class FlashBlockAttention(torch.autograd.Function):
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
        out, lse = FLASH_CPU_OPS[0](q, k, v, 0.0, False, attn_mask=additive_mask(allowed, qkv.dtype))
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
            gq, gk, gv = FLASH_CPU_OPS[1](
                grad_out[c],
                q[c],
                k[c],
                v[c],
                out[c],
                lse[c],
                0.0,
                False,
                attn_mask=additive_mask(allowed[c], qkv.dtype),
            )  # M_c x H x W|n_keys x hd
            _add_block_grads(grad_qkv, first, gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2), W, paired)
        return grad_qkv, None, None, None, None, None


def block_attention(qkv: Tensor, allowed: Tensor, W: int, H: int, hd: int, paired: bool, dropout_p: float) -> Tensor:
    """Block attention on the rows x 3d projection -> (M W) x (H hd), rows in block-slot order."""
    # Under torch.compile the CPU too takes the sdpa path: the flash backward's loop over
    # memory-sized chunks depends on the shape, which would recompile at every new length.
    flash_cpu = USE_FLASH_CPU_KERNEL and FLASH_CPU_OPS is not None and not torch.compiler.is_compiling()
    if flash_cpu and qkv.device.type == "cpu" and dropout_p == 0.0:
        return FlashBlockAttention.apply(qkv, allowed, W, H, hd, paired)
    q, k, v = PairedViews.apply(qkv, W, H, hd, paired)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=additive_mask(allowed, qkv.dtype),
        dropout_p=dropout_p,
    )  # M x H x W x hd, laid out as M x W x H x hd like the queries
    return out.transpose(1, 2).reshape(-1, H * hd)


class ScatterProject(torch.autograd.Function):
    """Attention output back in word order (zero at padding), then the output projection.

    out: (G R) x D in block layout: G groups of R rows, group g holding the g-th equal share of
    the call's heads (D = its heads x head_dim); word_row / word_pad: (B N) x G, the row of each word in each group's
    layout (in range everywhere), and where words are padding; layout_word / layout_empty: the
    word held by each layout row and the rows that hold none; weight: d x G D, the output
    projection's columns of these heads. Each word's rows of the G groups, side by side, are its
    heads in order. The backward brings the output gradient into block order once and computes
    both the input and the weight gradient there, so no word-order copy of the attention output
    is kept for the backward.
    """

    @staticmethod
    def forward(ctx, out, word_row, word_pad, layout_word, layout_empty, weight, bias):
        ctx.save_for_backward(out, layout_word, layout_empty, weight)
        ctx.has_bias = bias is not None
        words = gather_rows(out, word_row.view(-1), None).view(word_row.size(0), -1)  # (B N) x G D
        if word_pad is not None:
            words.masked_fill_(word_pad[:, None], 0.0)
        return F.linear(words, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        out, layout_word, layout_empty, weight = ctx.saved_tensors
        D = out.size(1)
        d, G = weight.size(0), weight.size(1) // D
        grad_blocks = gather_rows(grad_y, layout_word, layout_empty).view(G, -1, d)  # G x R x d
        grad_out = grad_weight = grad_bias = None
        if G == 1:
            grad_blocks = grad_blocks[0]
            grad_out = torch.mm(grad_blocks, weight) if ctx.needs_input_grad[0] else None
            grad_weight = grad_blocks.t().mm(out) if ctx.needs_input_grad[5] else None
        else:
            if ctx.needs_input_grad[0]:  # (G R) x D
                grad_out = torch.bmm(grad_blocks, weight.view(d, G, D).transpose(0, 1)).view(-1, D)
            if ctx.needs_input_grad[5]:  # G x d x D, then d x G D
                grad_weight = torch.bmm(grad_blocks.transpose(1, 2), out.view(G, -1, D))
                grad_weight = grad_weight.transpose(0, 1).reshape(d, G * D)
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = grad_y.sum(0)
        return grad_out, None, None, None, None, grad_weight, grad_bias


def _softmax_over_words(scores):
    """softmax over dim 1 of B x N x K scores, returned as B x N x K (possibly a transposed view).

    CUDA's softmax over a non-last dimension runs a strided kernel that took 6 ms of an 18 ms
    training step at N = 8192, K = 91, batch 20 on an H200 (python -m scripts.profile_attention
    --device cuda); over the last dimension of the K x N transpose it is a small fraction of
    that. On the CPU the strided softmax is the faster of the two: no copy.
    """
    if scores.is_cuda:
        return torch.softmax(scores.transpose(1, 2), dim=-1).transpose(1, 2)
    return torch.softmax(scores, dim=1)


class ClusteringFunction(torch.autograd.Function):
    """Assignments, updated centroids C' and both losses, with one fused backward.

    Forward (per sequence; U is kept as N x K):
        U = X (C W_C)^T / sqrt(d);  a_j = argmax over real clusters of U_j (unless given)
        P = softmax over real words of U;  C' = P^T X
        clustering loss = word_weight * sum over real words of sim(x_j, c'_{a_j})
        sorting loss = sum over adjacent pairs of pair_weight * sim(c'_i, c'_{i+1})
    with sim(a, b) = a.b / max(|a| |b|, eps) (cosine) or a.b / d (dot); the weights are negative
    (word_weight = -1 / the number of real words: the losses are minus mean similarities).
    Autograd would write four N x d gradients of X (through U, C', the dot products and the
    norms) and add them up, with a few dozen small operations around them; this backward writes
    one, with a single matmul over the three N x K factors stacked ([P, dU, S] @ [dC', C W_C,
    C']) plus the norm term in place. Every small tensor is made once: the pair dot products and
    the centroid norms come from one K x K Gram matrix, and the signs and the 1 / n of the losses
    ride on the weights. tests/test_cluster_attention.py checks it against a float64 reference
    and gradcheck.

    pad: B x N True at padding, or None (no padding); validf: pad as 0/1 weights (None with
    pad); word_weight: -1 / the number of real words (scalar, in the losses' dtype); cluster_pad:
    B x K True for clusters beyond k_b, or None (all real); pair_weight: B|1 x K-1 weights of the
    pair similarities (clustering.sorting_pair_weights with ``negated``).
    """

    @staticmethod
    def forward(ctx, x, cw, pad, validf, word_weight, cluster_pad, pair_weight, assign, cosine):
        B, N, d = x.shape
        K = cw.size(1)
        scale = 1.0 / math.sqrt(d)
        # U; beta=0 ignores the (uninitialised) input
        scores = torch.baddbmm(x.new_empty(()).expand(B, N, K), x, cw.transpose(1, 2), beta=0, alpha=scale)
        # Finite fill values: safe in fp16/bf16, and an all-padding row softmaxes to uniform, not NaN.
        fill = torch.finfo(scores.dtype).min
        if assign is None:
            assign = (scores if cluster_pad is None else scores.masked_fill(cluster_pad[:, None, :], fill)).argmax(2)
        own = assign  # B x N, in range everywhere
        probs = _softmax_over_words(scores if pad is None else scores.masked_fill_(pad[:, :, None], fill))
        cents = torch.bmm(probs.transpose(1, 2), x)  # C': B x K x d
        dots = torch.bmm(x, cents.transpose(1, 2)).gather(2, own[:, :, None])[:, :, 0]  # B x N
        gram = torch.bmm(cents, cents.transpose(1, 2))  # B x K x K: c'_i . c'_k
        pair_dots = gram.diagonal(1, 1, 2)  # B x K-1: c'_i . c'_{i+1}
        none = x.new_empty(0)
        if cosine:
            x_norm = torch.linalg.vector_norm(x, dim=-1)  # B x N
            c_norm = gram.diagonal(0, 1, 2).sqrt()  # B x K (a sum of squares: never negative)
            own_norm = c_norm.gather(1, own)
            denom = x_norm * own_norm
            inv = denom.clamp(min=COSINE_EPS).reciprocal_() if pad is None else validf / denom.clamp(min=COSINE_EPS)
            word_sim = dots * inv  # zero at padding
            pair_denom = c_norm[:, :-1] * c_norm[:, 1:]
            pair_denom_c = pair_denom.clamp(min=COSINE_EPS)
            pair_sim = pair_dots / pair_denom_c
            extra = (inv, word_sim, denom, x_norm, own_norm, c_norm, pair_sim, pair_denom, pair_denom_c)
        else:
            word_sim = dots / d if pad is None else dots * (validf / d)
            pair_sim = pair_dots / d
            extra = (none if pad is None else validf,)
        # In the weights' dtype (float32 for half-precision input: clustering.loss_dtype)
        clustering_loss = word_sim.sum(dtype=word_weight.dtype) * word_weight
        sorting_loss = (pair_sim * pair_weight).sum()
        ctx.save_for_backward(x, cw, probs, cents, own, word_weight, pair_weight, none if pad is None else pad, *extra)
        ctx.cosine, ctx.scale = cosine, scale
        ctx.mark_non_differentiable(assign)
        # An output nothing used (C' of the decoder and of the last encoder layer) gets None as its
        # gradient, not a tensor of zeros made for it.
        ctx.set_materialize_grads(False)
        return (assign if pad is None else assign.masked_fill(pad, -1)), cents, clustering_loss, sorting_loss

    @staticmethod
    def backward(ctx, _grad_assign, grad_cents, grad_clustering, grad_sorting):
        x, cw, probs, cents, own, word_weight, pair_weight, pad = ctx.saved_tensors[:8]
        B, N, d = x.shape
        if grad_clustering is None:  # a loss that nothing used
            grad_clustering = torch.zeros_like(word_weight)
        if grad_sorting is None:
            grad_sorting = torch.zeros_like(word_weight)
        g = grad_clustering * word_weight  # the gradient of each real word's similarity
        grad_pair_sim = pair_weight * grad_sorting  # B|1 x K-1
        neg_coef = None
        if ctx.cosine:
            inv, word_sim, denom, x_norm, own_norm, c_norm, pair_sim, pair_denom, pair_denom_c = ctx.saved_tensors[8:]
            # sim = dot / max(den, eps): d/d dot = 1 / max(den, eps); d/d den = -sim / den where
            # den >= eps, else 0. The denominators' gradients are kept negated (no negation
            # launched): the terms they feed are subtracted below.
            grad_dots = inv * g  # 0 at padding (inv is)
            neg_grad_denom = (word_sim * grad_dots).masked_fill_(denom < COSINE_EPS, 0.0)
            grad_pair_dots = grad_pair_sim / pair_denom_c
            neg_grad_pair_denom = (grad_pair_dots * pair_sim).masked_fill_(pair_denom < COSINE_EPS, 0.0)
            # of each centroid norm: the words' denominators (their own centroid), then both pairs'
            neg_grad_c_norm = torch.zeros_like(c_norm).scatter_add_(1, own, neg_grad_denom * x_norm)  # B x K
            neg_grad_c_norm[:, :-1].addcmul_(neg_grad_pair_denom, c_norm[:, 1:])  # not +=: one more copy
            neg_grad_c_norm[:, 1:].addcmul_(neg_grad_pair_denom, c_norm[:, :-1])
            # d|v|/dv = v / |v| (0 at v = 0, as autograd's norm: there v = 0 and the term vanishes)
            neg_coef = neg_grad_denom * own_norm / x_norm.clamp(min=torch.finfo(x_norm.dtype).tiny)  # B x N, times x
        else:
            validf = ctx.saved_tensors[8]
            # (g is in the losses' dtype, float32 for half-precision input: back to x's)
            grad_dots = (g / d).to(x.dtype).expand(B, N) if validf.numel() == 0 else validf * (g / d)
            grad_pair_dots = grad_pair_sim / d
        one_hot = torch.zeros_like(probs).scatter_(2, own[:, :, None], grad_dots[:, :, None])  # S: B x N x K
        # C''s gradient: the incoming one, plus through the word-centroid dot products (S^T X)...
        if grad_cents is None:
            grad_c = torch.bmm(one_hot.transpose(1, 2), x)
        else:
            grad_c = torch.baddbmm(grad_cents, one_hot.transpose(1, 2), x)
        if neg_coef is not None:  # ... the norms ...
            grad_c.addcmul_(
                cents, (neg_grad_c_norm / c_norm.clamp(min=torch.finfo(c_norm.dtype).tiny))[:, :, None], value=-1
            )
        grad_c[:, :-1].addcmul_(cents[:, 1:], grad_pair_dots[:, :, None])  # ... and the pair dot products
        grad_c[:, 1:].addcmul_(cents[:, :-1], grad_pair_dots[:, :, None])
        # B x N x K, with U's scale (alpha) applied in the same matmul; beta=0 ignores the input
        grad_probs = torch.baddbmm(
            probs.new_empty(()).expand(B, N, cents.size(1)), x, grad_c.transpose(1, 2), beta=0, alpha=ctx.scale
        )
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(1, keepdim=True))
        # Padding scores were filled: no gradient (their probabilities are 0 unless a whole
        # sequence is padding).
        if pad.numel():
            grad_scores.masked_fill_(pad[:, :, None], 0.0)
        grad_cw = torch.bmm(grad_scores.transpose(1, 2), x)  # B x K x d
        grad_x = torch.bmm(
            torch.cat([probs, grad_scores, one_hot], dim=2), torch.cat([grad_c, cw.expand(B, -1, d), cents], dim=1)
        )
        if neg_coef is not None:
            grad_x.addcmul_(x, neg_coef[:, :, None], value=-1)
        return grad_x, grad_cw, None, None, None, None, None, None, None


def cluster_words(
    x: Tensor,
    projected_centroids: Tensor,
    *,
    pad: Optional[Tensor],
    validf: Optional[Tensor],
    word_weight: Tensor,
    cluster_pad: Optional[Tensor],
    pair_weight: Tensor,
    assign: Optional[Tensor],
    cosine: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """ClusteringFunction with named arguments: (assignments, C', clustering loss, sorting loss)."""
    return ClusteringFunction.apply(
        x, projected_centroids, pad, validf, word_weight, cluster_pad, pair_weight, assign, cosine
    )


def attend_in_blocks(
    attn,
    x: Tensor,
    pad: Optional[Tensor],
    block_word: Tensor,
    word_row: Tensor,
    key_ok: Tensor,
    slot_real: Tensor,
    paired: bool,
    heads: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """Attention inside blocks of the sorted sequence, back in the original order, out_proj applied.

    The heads come in G groups of equal size, each with its own order of the words (G = 1: one
    order for every head; G = 2: the local heads' and the clustered heads'), all in one call.

    attn: the ClusterAttention layer (its projections and head sizes); x: B x N x d; pad: B x N
    (True at padding) or None; block_word: G x B x M x W, the original position held by each
    block slot of each group's layout (in range everywhere); word_row: G x B x N, the slot (index
    into M W) of each real word (anything at padding); key_ok: G x B x M x W x n_keys (or
    broadcastable), which keys each query may see (n_keys = 2W with ``paired``: block i sees
    block i-1 then itself; W otherwise); slot_real: G x B x M x W (or broadcastable), the slots
    holding a real word (the others see every key, so that their discarded rows stay finite).
    Returns B x N x d: out_proj of the attention output, which is zero at padding.

    The words are gathered into block order once per group (group-major rows, the G B M blocks
    one after another) and projected by one q|k|v matmul (batched over the groups, each with its
    heads' weights); the [previous, own] keys and values of every block are overlapping views of
    that result, so nothing is computed twice, and one attention call covers every group's
    blocks. Both row gathers (into block order and back) are one-to-one on the real words, so
    their backward passes are gathers too, each fused with the projection next to it
    (GatherProject, ScatterProject).

    heads: (first, end) computes only those heads: their rows of the q/k/v projections and
    their columns of out_proj (whose bias is added only by the part holding head 0), so the
    parts of a layer whose heads attend differently add up to the whole layer's output.
    """
    B, N, d = x.shape
    G, _, M, W = block_word.shape
    hd = attn.head_dim
    h0, h1 = heads if heads is not None else (0, attn.num_heads)
    if (h1 - h0) % G:
        raise ValueError(f"{h1 - h0} heads do not split into {G} groups of equal size")
    Hg, cols = (h1 - h0) // G, slice(h0 * hd, h1 * hd)
    word_pad = None if pad is None else pad.view(-1)
    layout_empty = ~slot_real  # G|1 x B|1 x M x W
    filler = W if paired else 0  # W rows in front: the "previous block" of the first block (masked)
    # Rows of the flattened (B N) x d input that make the layout (filler rows read word 0).
    layout_word = block_word.new_zeros(filler + G * B * M * W)
    seq_start = arange(G * B, x.device).view(G, B, 1)  # the layout's sequences, group-major
    torch.add(block_word.view(G, B, M * W), seq_start[:1], alpha=N, out=layout_word[filler:].view(G, B, M * W))
    # The layout row of each word in each group (filler not counted): (B N) x G
    layout_row = torch.add(word_row, seq_start, alpha=M * W).view(G, B * N)
    if word_pad is not None:
        layout_row.masked_fill_(word_pad, 0)
    layout_row = layout_row.t().contiguous()  # a copy only with G > 1
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    # Every head: the whole weights (a slice would add a zero-filled gradient copy per tensor).
    part = (lambda t: t) if heads is None else (lambda t: t[cols])
    weight = torch.cat([part(p.weight) for p in projs])  # 3 G Hg hd x d (GatherProject groups the rows)
    bias = None if projs[0].bias is None else torch.cat([part(p.bias) for p in projs])
    qkv = GatherProject.apply(x.reshape(B * N, d), layout_word, layout_row, word_pad, weight, bias, filler, G)
    n_keys = 2 * W if paired else W
    allowed = (key_ok | layout_empty[..., None]).expand(G, B, M, W, n_keys).reshape(G * B * M, 1, W, n_keys)
    dropout_p = attn.dropout if attn.training else 0.0
    out = block_attention(qkv, allowed, W, Hg, hd, paired, dropout_p)  # (G B M W) x Hg hd
    out_weight = attn.out_proj.weight if heads is None else attn.out_proj.weight[:, cols]
    out = ScatterProject.apply(
        out,
        layout_row,
        word_pad,
        layout_word[filler:],
        layout_empty.expand(G, B, M, W).reshape(-1),
        out_weight,
        attn.out_proj.bias if h0 == 0 else None,
    )
    return out.view(B, N, d)
