"""Memory formats of outputs and gradients, as F.conv2d and the ops' fake implementations
pick them.

``torch._prims_common.suggest_memory_format`` walks the strides through the symbolic-shape
guards each call: ~30 us of host time on a tiny tensor on the dev VM, several times an aten
op's launch, on every masked convolution's forward (triton) and backward (every backend).
``memory_format`` answers the same from a cache keyed by the shape and strides where they are
plain ints, and asks suggest_memory_format itself where they are symbolic (tracing).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1024)
def _format_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(
        torch.empty_strided(shape, stride, device="meta"))


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """suggest_memory_format(t): channels_last where t's strides are channels_last-like (even
    if also contiguous), else contiguous_format."""
    if t.layout != torch.strided:
        return torch.contiguous_format
    shape, stride = tuple(t.shape), t.stride()
    if all(type(v) is int for v in shape) and all(type(v) is int for v in stride):
        return _format_of(shape, stride)
    return torch._prims_common.suggest_memory_format(t)
