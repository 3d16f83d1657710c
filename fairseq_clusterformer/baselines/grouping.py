"""Run a sequence module on each sentence's real words only, sentences of equal length together.

The published LSH and routing attentions size their buckets and windows from the padded length
and hash or route padding along with the words, so a word's output depends on its batch mates
and its padding. ``run_by_length`` removes both: it takes each sentence's real words (left or
right padding alike), groups the sentences by real length L, and calls ``fn(words, L)`` on
each group (G x L x d, no padding at all); whatever ``fn`` does is then a function of the
sentence alone. Outputs go back to the original positions, zero at padding.
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor


def run_by_length(
    fn: Callable[[Tensor, int], Tuple[Tensor, Optional[Tensor]]], x: Tensor, pad: Optional[Tensor]
) -> Tuple[Tensor, Optional[Tensor]]:
    """x: B x N x d, pad: B x N (True at padding) or None. ``fn(words, L)`` returns (G x L x d
    output, a scalar mean loss over its words or None). Returns (B x N x d output, the
    word-weighted mean of the losses or None)."""
    B, N, d = x.shape
    if pad is None or not bool(pad.any()):
        return fn(x, N)
    lengths = (~pad).sum(1)
    pos = torch.arange(N, device=x.device).expand(B, N)
    # Real words first, in order: the sorted position of each real word is its rank among them.
    real_first = torch.argsort(pos + N * pad.long(), dim=1)  # B x N
    flat = x.reshape(B * N, d)
    out = x.new_zeros(B * N, d)
    losses: List[Tuple[Tensor, int]] = []
    for L in torch.unique(lengths).tolist():
        if L == 0:
            continue
        rows = (lengths == L).nonzero()[:, 0]  # G
        index = (real_first[rows, :L] + rows[:, None] * N).reshape(-1)  # G L rows of the flat input
        y, loss = fn(flat.index_select(0, index).view(rows.numel(), L, d), L)
        out = out.index_copy(0, index, y.reshape(-1, d))
        if loss is not None:
            losses.append((loss, rows.numel() * L))
    total = None
    if losses:
        n = sum(c for _, c in losses)
        total = sum(loss * (c / n) for loss, c in losses)
    return out.view(B, N, d), total
