"""Gaussian-noise benchmark cases (RNA / RSA): float32, std 0.1, eager x + std * randn_like(x)
(additive) and x * (1 + std * randn_like(x)) (variant "multiplicative").

Bytes moved (n = bytes of x): forward reads x and writes out (2n); backward (multiplicative:
reads grad, writes grad_x, the noise regenerated; additive: grad passes through) 2n; full 4n.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

import pyprune

from .harness import Case, Step, build_step, provider_fn

STD = 0.1

CASES = [
    Case((8, 64, 32, 32), quick=True),
    Case((128, 64, 32, 32)),
    Case((128, 64, 32, 32), variant="multiplicative"),
    Case((128, 256, 8, 8)),
    Case((32, 256, 56, 56)),
    Case((128, 65536)),
]


def noise_eager(x: Tensor, multiplicative: bool) -> Tensor:
    noise = STD * torch.randn_like(x)
    return x * (1 + noise) if multiplicative else x + noise


@functools.lru_cache(maxsize=1)
def _input(case: Case, device: torch.device) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(case.shape, dtype=case.dtype, device=device, generator=gen)


def setup_noise(case: Case, provider: str, mode: str, device: torch.device) -> Step:
    x = _input(case, device)
    multiplicative = case.variant == "multiplicative"

    def op(x: Tensor) -> Tensor:
        return pyprune.gaussian_noise(x, STD, multiplicative=multiplicative)

    fn = provider_fn(provider, functools.partial(noise_eager, multiplicative=multiplicative), op)
    n = x.numel() * x.element_size()
    return build_step(fn, (x,), mode, {"forward": 2 * n, "backward": 2 * n, "full": 4 * n}[mode])
