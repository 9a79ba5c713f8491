"""CAS benchmark cases: float32, 10 classes, training mode (a label per sample), the eager code
of the CAS paper: channel means, a linear layer, the label's weight row, a multiply.

Shapes: the ResNet-18/CIFAR stages CAS is inserted after (256x8x8, 512x4x4) and the earlier
ones, at batch 128; ResNet-50/ImageNet's last stage at batch 32 (2048x7x7, 1000 classes is the
variant "c1000").

Bytes moved (n = bytes of x): forward reads x and writes out (2n); backward reads grad_out and
x and writes grad_x (3n); full is both (5n). Weights, logits and means are negligible.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

import pyprune

from .harness import Case, Step, build_step, provider_fn

CLASSES = 10

CASES = [
    Case((128, 64, 32, 32)),
    Case((128, 128, 16, 16)),
    Case((128, 256, 8, 8), quick=True),
    Case((128, 512, 4, 4), quick=True),
    Case((32, 2048, 7, 7), variant="c1000"),
]


def cas_eager(x: Tensor, weight: Tensor, bias: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """The CAS paper's module: logits from the pooled features, the label's row as the mask."""
    logits = F.linear(x.mean((2, 3)), weight, bias)
    mask = weight[label]
    return x * mask[:, :, None, None], logits


def classes_of(case: Case) -> int:
    """The classes of a case: 1000 for the "c1000" variant, else CLASSES."""
    return 1000 if case.variant == "c1000" else CLASSES


@functools.lru_cache(maxsize=1)
def _inputs(case: Case, device: torch.device) -> tuple[Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    classes = classes_of(case)
    n, k = case.shape[:2]
    x = torch.randn(case.shape, dtype=case.dtype, device=device, generator=gen)
    weight = torch.randn((classes, k), dtype=case.dtype, device=device, generator=gen) / k**0.5
    bias = torch.randn((classes,), dtype=case.dtype, device=device, generator=gen)
    label = torch.randint(classes, (n,), device=device, generator=gen)
    return x, weight, bias, label


def setup_cas(case: Case, provider: str, mode: str, device: torch.device) -> Step:
    x, weight, bias, label = _inputs(case, device)
    fn = provider_fn(provider, cas_eager, pyprune.cas)
    n = x.numel() * x.element_size()
    return build_step(fn, (x, weight, bias, label), mode,
                      {"forward": 2 * n, "backward": 3 * n, "full": 5 * n}[mode], wrt=(0, 1, 2))
