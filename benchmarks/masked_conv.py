"""Masked convolution benchmark cases: float32, 3x3 convolutions with padding 1, bias.

Eager is the way PyTorch prunes today (torch.nn.utils.prune): the masks multiply the input,
the weight and the output around a dense F.conv2d, which does all the work whatever the masks
remove; torch.compile of the same. pyprune runs only what the masks keep.

Variants (the keep ratio in percent): ``out25`` a static mask keeping 25% of the output
channels (ideal speed-up 4x: a quarter of the FLOPs), ``in50`` 50% of the input channels,
``sample-out25`` a different 25% of the output channels per sample (dynamic gating), ``w50``
/ ``w20`` / ``w10`` / ``w5`` an unstructured weight mask keeping that share of the weights
(ideal 2x-20x, which no dense engine can use; pyprune's CPU backend runs its direct sparse
convolution below a density limit per output size, see csrc/cpu/sparse_conv.cpp), ``b25`` /
``b10`` a weight mask that keeps that share of 16x16 tiles of (output, input) channels, all
taps of a kept tile (block pruning: the Triton backend skips the empty tiles, the CPU's sparse
kernel sees it as any mask of that density; on a GPU these rows give the break-even between
the Triton block-sparse kernel and cuDNN on the masked weight, which the cuda backend runs),
``dense`` no mask (the op's overhead over F.conv2d).

Shapes: the issue's reference layer (32x128x16x16, 128 filters), ResNet-18/CIFAR stages at
batch 32 (64x32x32, 256x8x8, 512x4x4) and a ResNet-50/ImageNet 3x3 layer (256x14x14) at 32.

Bytes (for GB/s, which a compute-bound op does not reach): x, weight and output once each.
"""
from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import Tensor

import pyprune

from .harness import Case, Step, build_step, provider_fn

CASES = [
    Case((32, 128, 16, 16), "dense"),
    Case((32, 128, 16, 16), "out25", quick=True),
    Case((32, 128, 16, 16), "out50", quick=True),
    Case((32, 128, 16, 16), "out75"),
    Case((32, 128, 16, 16), "in50"),
    Case((32, 128, 16, 16), "sample-out25", quick=True),
    Case((32, 128, 16, 16), "sample-out50"),
    Case((32, 128, 16, 16), "w50", quick=True),
    Case((32, 128, 16, 16), "w20"),
    Case((32, 128, 16, 16), "w10", quick=True),
    Case((32, 128, 16, 16), "w5"),
    Case((32, 128, 16, 16), "b25", quick=True),
    Case((32, 128, 16, 16), "b10"),
    Case((32, 256, 14, 14), "b25"),
    Case((32, 64, 32, 32), "w20"),
    Case((32, 256, 8, 8), "w10"),
    Case((32, 256, 14, 14), "w10"),
    Case((32, 64, 32, 32), "out50"),
    Case((32, 256, 8, 8), "out50"),
    Case((32, 256, 8, 8), "sample-out50"),
    Case((32, 512, 4, 4), "out50"),
    Case((32, 256, 14, 14), "out50"),
]


def ideal_speedup(variant: str) -> float:
    """The FLOP ratio dense / masked of a variant (w50: what a sparse engine could reach)."""
    m = re.search(r"(\d+)$", variant)
    return 100.0 / int(m.group(1)) if m else 1.0


def masked_conv_eager(x: Tensor, weight: Tensor, bias: Tensor, in_mask, out_mask,
                      weight_mask) -> Tensor:
    """Masks as multipliers around the dense conv, as torch.nn.utils.prune and FBS code do."""
    if in_mask is not None:
        m = in_mask.to(x.dtype)
        x = x * (m.view(1, -1, 1, 1) if m.dim() == 1 else m[:, :, None, None])
    if weight_mask is not None:
        weight = weight * weight_mask.to(weight.dtype)
    y = F.conv2d(x, weight, bias, 1, 1)
    if out_mask is not None:
        m = out_mask.to(y.dtype)
        y = y * (m.view(1, -1, 1, 1) if m.dim() == 1 else m[:, :, None, None])
    return y


def masked_conv_pyprune(x, weight, bias, in_mask, out_mask, weight_mask) -> Tensor:
    return pyprune.masked_conv2d(x, weight, bias, 1, 1, in_mask=in_mask, out_mask=out_mask,
                                 weight_mask=weight_mask)


_TILE = 16  # channel tile of the ``b`` masks, the Triton weight-mask kernel's tile


def _keep(n: int, keep: float, gen: torch.Generator, device) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[: int(n * keep)]] = True
    return mask.to(device)


@functools.lru_cache(maxsize=1)
def _inputs(case: Case, device: torch.device) -> tuple:
    gen = torch.Generator().manual_seed(0)
    n, c = case.shape[:2]
    x = torch.randn(case.shape, generator=gen).to(case.dtype).to(device)
    weight = (torch.randn(c, c, 3, 3, generator=gen) / (3 * c**0.5)).to(case.dtype).to(device)
    bias = torch.randn(c, generator=gen).to(case.dtype).to(device)
    in_mask = out_mask = weight_mask = None
    keep = 1.0 / ideal_speedup(case.variant)
    if case.variant.startswith("out"):
        out_mask = _keep(c, keep, gen, device)
    elif case.variant.startswith("in"):
        in_mask = _keep(c, keep, gen, device)
    elif case.variant.startswith("sample-out"):
        out_mask = torch.stack([_keep(c, keep, gen, device) for _ in range(n)])
    elif case.variant.startswith("w"):
        weight_mask = (torch.rand(weight.shape, generator=gen) < keep).to(device)
    elif case.variant.startswith("b"):
        tiles = torch.rand(c // _TILE, c // _TILE, generator=gen) < keep
        tiles = tiles.repeat_interleave(_TILE, 0).repeat_interleave(_TILE, 1)
        weight_mask = tiles[:, :, None, None].expand(weight.shape).contiguous().to(device)
    return x, weight, bias, in_mask, out_mask, weight_mask


def setup_masked_conv(case: Case, provider: str, mode: str, device: torch.device) -> Step:
    inputs = _inputs(case, device)
    x, weight = inputs[:2]
    fn = provider_fn(provider, masked_conv_eager, masked_conv_pyprune)
    out_bytes = x.numel() * x.element_size()  # C_out = C_in, same spatial size
    n = x.numel() * x.element_size() + weight.numel() * weight.element_size() + out_bytes
    return build_step(fn, inputs, mode, {"forward": n, "backward": 2 * n, "full": 3 * n}[mode],
                      wrt=(0, 1, 2))
