"""Tensors that depend on sizes alone, made once per size.

On a GPU every tensor a forward creates is a kernel launch, and the attention layers are bound by
their launches at translation lengths (docs/benchmarks.md). Index ranges, the per-sequence word
and cluster counts of a batch without padding, the sorting loss's fixed pair weights: each layer
of each step would make the same few small tensors again. Here they are made once per key and
shared; callers only read them.

Inside torch.compile nothing is cached: ``sized_constant`` makes the tensor in the graph, where
it fuses with its users (a cached tensor would be a graph input, guarded on its identity).
"""

from typing import Callable

import torch
from torch import Tensor

_CONSTANTS: dict = {}  # constant_tensor's tensors, by key
_MAX_CONSTANTS = 256  # e.g. index ranges for every batch size of beam search: bounded


def constant_tensor(key, make: Callable[[], Tensor]) -> Tensor:
    """make(), once per key (which must name its device, and its dtype where that varies):
    small tensors (or a tuple of them) that a hot path would otherwise create at every call, each
    a kernel launch on a GPU; callers never modify them. Made outside any inference mode, so that
    they serve outside it too."""
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        with torch.inference_mode(False):
            t = _CONSTANTS[key] = make()
    return t


def sized_constant(key, make: Callable[[], Tensor]) -> Tensor:
    """constant_tensor(key, make) outside torch.compile; make() inside it."""
    if torch.compiler.is_compiling():
        return make()
    return constant_tensor(key, make)


def arange(n: int, device) -> Tensor:
    """torch.arange(n, device=device) (long), shared: read it, never write to it."""
    device = torch.device(device)
    return sized_constant(("arange", n, device), lambda: torch.arange(n, device=device))


def filled(shape, value, dtype: torch.dtype, device) -> Tensor:
    """torch.full(shape, value, dtype=dtype, device=device), shared: read it, never write to it."""
    shape, device = tuple(shape), torch.device(device)
    return sized_constant(
        ("full", shape, value, dtype, device), lambda: torch.full(shape, value, dtype=dtype, device=device)
    )
