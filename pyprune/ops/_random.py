"""Seeds for pyprune's counter-based (Philox) random ops, and the memory-order views they run on.

A random op draws a seed tensor of two int64, (key, stream), from a ``torch.Generator`` on the
input's device (``generator=None``: torch's default generator of that device, so
``torch.manual_seed`` reproduces the result) and passes it to the kernel as a tensor: kernels
read it from device memory, so there is no host sync and CUDA graphs can capture the op, and
backward regenerates the forward's random values from the same seed instead of saving a mask.
Value i of a call is word i & 3 of Philox4x32-10(key, counter=(i >> 2, stream)); see
csrc/random.h, which the CPU and CUDA kernels share and triton_kernels/noise.py mirrors.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._common import cached_view, insertion_order, mergeable

_SEED_RANGE = 2**62


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Two int64 (key, stream) drawn from ``generator`` (or the device's default), on ``device``;
    the caller has checked the generator (pyprune._validate.generator)."""
    return torch.randint(-_SEED_RANGE, _SEED_RANGE, (2,), generator=generator,
                         device=device, dtype=torch.int64)


def memory_order_view(x: Tensor, batch_dims: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x as a (N, L) (batch_dims=1) or (L,) (batch_dims=0) view whose rows run in memory order,
    so contiguous and channels_last inputs need no copy; random value i is element i of a row of
    this view. Returns the view and the map from a result shaped like the view back to x (not a
    view of it: ``_common.restored``)."""
    return cached_view(x, batch_dims, _memory_layout)


def _memory_layout(x: Tensor, batch_dims: int) -> tuple[list[int], list, bool]:
    """memory_order_view's layout for ``_common.cached_view``: the dims after the batch dims in
    memory order where they merge into one (a view), else in their own order (a copy)."""
    lead = list(range(batch_dims))
    inner = list(range(batch_dims, x.dim()))
    order = insertion_order(inner, x.stride)
    merged = mergeable([x.shape[d] for d in order], [x.stride(d) for d in order])
    rows = [x.shape[0], math.prod(x.shape[1:])] if batch_dims else [x.numel()]
    return lead + (order if merged else inner), rows, not merged
