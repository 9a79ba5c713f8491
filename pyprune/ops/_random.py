"""Seeds for pyprune's counter-based (Philox) random ops, and the memory-order views they run on.

A random op draws a seed tensor of two int64, (key, stream), from a ``torch.Generator`` of the
input's device (``generator=None``: torch's default generator of that device, so
``torch.manual_seed`` reproduces the result), passes it to the kernel, and saves it for
backward, which regenerates the forward's random values from it instead of saving a mask.
Value i of a call is word i & 3 of Philox4x32-10(key, counter=(i >> 2, stream)); see
csrc/random.h, which the CPU and CUDA kernels share and triton_kernels/_random.py mirrors.

Two ways to draw it, both with no host sync:

* on the host, for an eager call on a CUDA tensor: the key from the generator's seed (mixed, so
  that it is not the key torch's own Philox ops use), the stream its Philox offset, which the
  call advances by 4 as a torch random op does. No kernel: the kernels take the pair by value
  (a seed tensor on the CPU). This saves the launch of a randint (~1.5 us of device time and
  ~4 us of host time a call).
* on the device, ``torch.randint`` from the generator: on the CPU, while dynamo traces (the
  graph draws its own seed), under CUDA graph capture (each replay draws anew from the
  generator's graph-safe state), a torch.func transform (vmap's randomness modes see the draw)
  or a torch dispatch mode, and for a generator of another device (randint raises).

A seed reproduces the result on each path; the two paths draw different seeds from one state.
"""
from __future__ import annotations

import array
import functools
import math
from typing import Callable

import torch
from torch import Tensor

from ._common import _transforming, cached_view, insertion_order, mergeable

_SEED_RANGE = 2**62
_MASK64 = (1 << 64) - 1


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Two int64 (key, stream) drawn from ``generator`` (or the device's default): on the host
    for an eager CUDA call, else on ``device`` (module docstring); the caller has checked the
    generator (pyprune._validate.generator)."""
    if device.type == "cuda" and _host_draw(device, generator):
        if generator is None:
            generator = torch.cuda.default_generators[device.index]
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        # From a buffer: ~2 us a call less than torch.tensor([...]).
        return torch.frombuffer(array.array("q", (host_key(generator.initial_seed()), offset)),
                                dtype=torch.int64)
    return torch.randint(-_SEED_RANGE, _SEED_RANGE, (2,), generator=generator,
                         device=device, dtype=torch.int64)


def _host_draw(device: torch.device, generator: torch.Generator | None) -> bool:
    """Whether a seed for ``device`` is drawn on the host (see the module docstring)."""
    return (not torch.compiler.is_compiling() and not _transforming()
            and not torch._C._len_torch_dispatch_stack()
            and (generator is None or _generator_on(generator, device))
            and not torch.cuda.is_current_stream_capturing())


def _generator_on(generator: torch.Generator, device: torch.device) -> bool:
    """Whether generator serves device: torch.Generator("cuda") has no device index (it
    serves the current device), so its device never equals cuda:0 itself."""
    own = torch.device(generator.device)
    return own.type == device.type and own.index in (None, device.index)


@functools.lru_cache(maxsize=64)
def host_key(seed: int) -> int:
    """The Philox key of a host draw from a generator seeded with ``seed``: splitmix64's
    finalizer of seed + a constant (torch's Philox ops key with the seed itself), as an int64."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


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
