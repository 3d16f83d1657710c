"""Assignment rules for the causal clustering attention (ClusterAttention(..., router=...)).

ClusterAttention's decoder variant assigns each word to a group by itself (word t's group
depends on x_t alone), lets it attend to the last ``window`` words of its group, and decodes
exactly with an O(window d) cache. ClusterFormer's rule is the nearest learned centroid; a
router replaces only that rule:

    LSHRouter       Reformer's angular LSH: argmax over [x R; -x R] with a fixed random
                    rotation R (d x K/2) per layer, a buffer drawn once at construction.
    RoutingRouter   Routing Transformer: the nearest of K k-means means (unit vectors, EMA-
                    updated once per optimizer step, kmeans.py); its commitment loss
                    mean |x/|x| - mu_a|^2 over real words goes to the criterion.

A router exposes ``num_groups``, ``directions(dtype)`` (K x d: the group of x is the argmax of
these rows' dot products with x, which modules/incremental.assign_per_word computes exactly the
same way in a full forward and in a decoding step) and ``losses(x, pad, assign)``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kmeans


class LSHRouter(nn.Module):
    """Angular LSH with fixed rotations: group = argmax over [x R; -x R], K = 2 R-columns."""

    def __init__(self, embed_dim: int, num_groups: int):
        super().__init__()
        if num_groups < 2 or num_groups % 2:
            raise ValueError(f"LSH hashing gives an even number of buckets (>= 2), got {num_groups}")
        self.num_groups = num_groups
        # Drawn from the global RNG like any parameter initialisation (fairseq seeds it); saved
        # in the state dict, so a loaded model hashes as it was trained.
        self.register_buffer("rotations", torch.randn(embed_dim, num_groups // 2))

    def directions(self, dtype) -> Tensor:
        r = self.rotations.to(dtype).t()  # K/2 x d
        return torch.cat([r, -r], 0)  # K x d: [x R; -x R] = x . rows

    def losses(self, x: Tensor, pad: Optional[Tensor], assign: Tensor) -> Optional[Tensor]:
        return None  # hashing has nothing to learn


class RoutingRouter(nn.Module):
    """The nearest k-means mean (Routing Transformer), means updated by an EMA of k-means steps.

    The means are buffers (no gradient): training forwards accumulate each real word's k-means
    statistics, and ``set_num_updates`` applies them once per optimizer step (averaged over
    processes under DDP). Within a forward and across decoding steps the means do not move, so
    assignments are per word and decoding is exact.
    """

    def __init__(self, embed_dim: int, num_groups: int, ema_decay: float = 0.999):
        super().__init__()
        self.num_groups = num_groups
        self.ema_decay = ema_decay
        self.register_buffer("means", F.normalize(torch.randn(1, num_groups, embed_dim), dim=-1))
        self.register_buffer("initted", torch.tensor(False))
        kmeans.init_pending(self)

    def directions(self, dtype) -> Tensor:
        return self.means[0].to(dtype)  # argmax_i mu_i . x = argmax_i mu_i . x/|x|

    def losses(self, x: Tensor, pad: Optional[Tensor], assign: Tensor) -> Tensor:
        """Commitment loss: mean over real words of mean_d (x/|x| - mu_a)^2 (the package's MSE)."""
        unit = F.normalize(x, dim=-1)
        routed = self.means[0].to(x.dtype)[assign.clamp(min=0)]  # B x N x d
        err = (unit - routed).pow(2).mean(-1)  # B x N
        if pad is not None:
            err = err.masked_fill(pad, 0.0)
            loss = err.sum() / (~pad).sum().clamp(min=1)
        else:
            loss = err.mean()
        if self.training:
            kmeans.accumulate(self, unit.detach()[:, None], assign.clamp(min=0)[:, None], None if pad is None else ~pad)
        return loss

    def set_num_updates(self, num_updates: int):
        kmeans.apply_pending(self, num_updates)
