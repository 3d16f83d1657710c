"""Online k-means means for the routing baseline, updated once per optimizer step.

The Routing Transformer keeps its cluster means as buffers (no gradient) and moves them by an
exponential moving average of k-means steps. Here both routing pieces (the package's encoder
attention, routing.py, and the decoder's RoutingRouter, routers.py) share this bookkeeping:

- during training forwards, ``accumulate`` adds each real word's unit vector to the sum of its
  cluster (and counts it): padding never counts;
- ``apply_pending`` (called from ``set_num_updates``, which fairseq calls before the first forward
  of every update on every process) turns the sums into new means and moves the buffer by
  ``ema_decay``; under torch.distributed the sums and counts are all-reduced first, so every
  process applies the same step and the means stay identical on all ranks. The first update
  replaces the random initial means outright (the package instead runs 10 k-means iterations on
  the first batch, which would differ between ranks).

A module using it has buffers ``means`` (G x C x D: G groups of C means) and ``initted``, an
``ema_decay`` float, and calls ``init_pending(self)`` in its constructor.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def init_pending(module):
    module._pending_sum: Optional[Tensor] = None
    module._pending_count: Optional[Tensor] = None
    module._last_num_updates: Optional[int] = None


@torch.no_grad()
def accumulate(module, x: Tensor, buckets: Tensor, valid: Optional[Tensor]):
    """x: b x G x n x D unit vectors; buckets: b x G x n (their clusters); valid: b x n (False at
    padding) or None. Adds them to the module's pending per-cluster sums and counts."""
    b, G, n, D = x.shape
    C = module.means.size(1)
    x = x.float()  # statistics in float32 whatever the model's dtype
    weight = torch.ones(b, 1, n, device=x.device)
    if valid is not None:
        weight = weight * valid[:, None, :].float()
    one_hot = F.one_hot(buckets, C).float() * weight[..., None]  # b x G x n x C
    sums = torch.einsum("bgnc,bgnd->gcd", one_hot, x)
    counts = one_hot.sum((0, 2))  # G x C
    if module._pending_sum is None:
        module._pending_sum, module._pending_count = sums, counts
    else:
        module._pending_sum += sums
        module._pending_count += counts


@torch.no_grad()
def apply_pending(module, num_updates: int):
    """Apply the k-means step accumulated since the previous update (see the module docstring).
    A collective under torch.distributed: every process calls it with the same num_updates."""
    if num_updates == module._last_num_updates:
        return
    module._last_num_updates = num_updates
    means = module.means
    sums, counts = module._pending_sum, module._pending_count
    module._pending_sum = module._pending_count = None
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        packed = torch.zeros(means.size(0), means.size(1), means.size(2) + 1, device=means.device)
        if sums is not None:
            packed[..., :-1] = sums
            packed[..., -1] = counts
        dist.all_reduce(packed)
        sums, counts = packed[..., :-1], packed[..., -1]
    if sums is None or not bool((counts > 0).any()):
        return
    new = torch.where((counts > 0)[..., None], F.normalize(sums, dim=-1), means.float()).to(means.dtype)
    if not bool(module.initted):
        means.copy_(new)
        module.initted.fill_(True)
    else:
        means.mul_(module.ema_decay).add_(new, alpha=1 - module.ema_decay)
