"""k-WTA benchmark cases: float32, ratio 0.1, eager top-k + mask as users write it.

Shapes: ResNet-18/CIFAR activations at batch 128, ResNet-50/ImageNet activations at batch 32, a
2-D (128, 65536) case and a small batch, all over each sample ("sample" mode); and one
"channel"-mode case (its CSV shape carries the word "channel").

Bytes moved (n = bytes of x): forward reads x and writes out (2n); backward reads grad and x
and writes grad_x (3n); full is both (5n).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

import pyprune

from .harness import Case, Step, build_step, provider_fn

RATIO = 0.1

CASES = [
    Case((8, 64, 32, 32), quick=True),
    Case((128, 64, 32, 32)),
    Case((128, 128, 16, 16)),
    Case((128, 256, 8, 8)),
    Case((128, 512, 4, 4), quick=True),
    Case((32, 256, 56, 56)),
    Case((32, 2048, 7, 7)),
    Case((128, 65536)),
    Case((128, 64, 32, 32), variant="channel"),
]


def kwta_sample(x: Tensor, k: int) -> Tensor:
    """Eager k-WTA over each sample: the k-th largest value as threshold, then a mask multiply."""
    thr = x.flatten(1).topk(k, dim=1).values[:, -1:]
    return x * (x.flatten(1) >= thr).view_as(x)


def kwta_channel(x: Tensor, k: int) -> Tensor:
    """Eager k-WTA over each (sample, channel) map."""
    thr = x.flatten(2).topk(k, dim=2).values[..., -1:]
    return x * (x.flatten(2) >= thr).view_as(x)


@functools.lru_cache(maxsize=1)
def _input(case: Case, device: torch.device) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(case.shape, dtype=case.dtype, device=device, generator=gen)


def setup_kwta(case: Case, provider: str, mode: str, device: torch.device) -> Step:
    x = _input(case, device)
    kwta_mode = case.variant or "sample"
    group_start = 1 if kwta_mode == "sample" else 2
    k = int(RATIO * math.prod(case.shape[group_start:]))
    eager = kwta_sample if kwta_mode == "sample" else kwta_channel

    def op(x: Tensor) -> Tensor:
        return pyprune.kwta(x, RATIO, mode=kwta_mode)

    fn = provider_fn(provider, functools.partial(eager, k=k), op)
    n = x.numel() * x.element_size()
    return build_step(fn, (x,), mode, {"forward": 2 * n, "backward": 3 * n, "full": 5 * n}[mode])
