"""SAP benchmark cases: float32, ratio 1.0 (r = group size draws per sample), inputs after a ReLU.

Variants: "exact" (a true multinomial draw) and "bernoulli" (independent keeps, same marginals).
Eager is SAP as the paper's code writes it, for both variants: torch.multinomial of r indices
(which sorts) + scatter into a mask, then x * mask / q with q = 1 - (1 - p)^r (computed stably
here, and detached, so every provider's gradient is grad * mask / q).

Bytes moved (n = bytes of x): forward reads x twice (sum, then keep) and writes out (3n);
backward reads x twice and grad once and writes grad_x (4n); full is both (7n).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

import pyprune

from .harness import Case, Step, build_step, provider_fn

RATIO = 1.0

CASES = [
    Case((8, 64, 32, 32), variant="exact", quick=True),
    Case((8, 64, 32, 32), variant="bernoulli", quick=True),
    Case((128, 64, 32, 32), variant="exact"),
    Case((128, 64, 32, 32), variant="bernoulli"),
    Case((128, 256, 8, 8), variant="exact"),
    Case((128, 256, 8, 8), variant="bernoulli"),
]


def sap_eager(x: Tensor, r: int) -> Tensor:
    """The paper's SAP: r multinomial draws per sample, scattered into a mask, rescaled by 1/q."""
    flat = x.flatten(1)
    a = flat.abs()
    p = a / a.sum(1, keepdim=True)
    idx = torch.multinomial(p.detach(), r, replacement=True)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    q = (-torch.expm1(r * torch.log1p(-p))).detach()
    return torch.where(mask, flat / q, torch.zeros((), dtype=x.dtype, device=x.device)).view_as(x)


@functools.lru_cache(maxsize=1)
def _input(case: Case, device: torch.device) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(case.shape, dtype=case.dtype, device=device, generator=gen).relu_()


def setup_sap(case: Case, provider: str, mode: str, device: torch.device) -> Step:
    x = _input(case, device)
    r = int(RATIO * math.prod(case.shape[1:]))
    exact = case.variant != "bernoulli"

    def op(x: Tensor) -> Tensor:
        return pyprune.sap(x, RATIO, exact=exact)

    fn = provider_fn(provider, functools.partial(sap_eager, r=r), op)
    n = x.numel() * x.element_size()
    return build_step(fn, (x,), mode, {"forward": 3 * n, "backward": 4 * n, "full": 7 * n}[mode])
