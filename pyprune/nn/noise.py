"""The SAP paper's baselines as modules: random noise on activations (RNA / RSA), and noise or
magnitude pruning applied to a layer's weight at every forward (RNW / RSW / DWP)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops.masked_conv import masked_conv2d
from ..ops.noise import gaussian_noise, magnitude_mask


def _std(std: object) -> float:
    std = _validate.real(std, "std")
    if not 0.0 <= std < float("inf"):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    return std


class GaussianNoise(nn.Module):
    """x + N(0, std^2) (RNA), or x * N(1, std^2) if multiplicative (RSA), in training and eval.
    It draws from torch's default generator: under DDP/FSDP call ``pyprune.seed_per_rank(seed)``
    once per process, or every rank adds the same noise at the same local batch positions.

    >>> act = GaussianNoise(0.1)
    """

    def __init__(self, std: float, multiplicative: bool = False) -> None:
        super().__init__()
        self.std = _std(std)
        self.multiplicative = _validate.flag(multiplicative, "multiplicative")

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_noise(x, self.std, multiplicative=self.multiplicative)

    def extra_repr(self) -> str:
        return f"std={self.std}, multiplicative={self.multiplicative}"


class _WeightWrapper(nn.Module):
    """Runs ``layer`` with its ``weight`` replaced by ``self.transform(weight)`` at each forward
    (torch.func.functional_call: the layer and its parameter are left untouched, gradients
    reach the parameter through the transform)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"layer must have a tensor attribute 'weight', got {type(layer).__name__}")
        self.layer = layer

    def transform(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weight = self.transform(self.layer.weight)
        return torch.func.functional_call(self.layer, {"weight": weight}, args, kwargs)


class NoisyWeight(_WeightWrapper):
    """``layer`` with Gaussian noise on its weight at each forward: w + N(0, std^2) (RNW) or
    w * N(1, std^2) if multiplicative (RSW).

    >>> conv = NoisyWeight(nn.Conv2d(3, 16, 3), std=0.05)
    """

    def __init__(self, layer: nn.Module, std: float, multiplicative: bool = False) -> None:
        super().__init__(layer)
        self.std = _std(std)
        self.multiplicative = _validate.flag(multiplicative, "multiplicative")

    def transform(self, weight: Tensor) -> Tensor:
        return gaussian_noise(weight, self.std, multiplicative=self.multiplicative)

    def extra_repr(self) -> str:
        return f"std={self.std}, multiplicative={self.multiplicative}"


class MagnitudePruned(_WeightWrapper):
    """``layer`` with its weight masked at each forward to the int(keep_ratio * numel) largest
    |w| (DWP; ties kept). The mask follows the weight as it trains; gradients reach the kept
    weights only.

    >>> fc = MagnitudePruned(nn.Linear(512, 10), keep_ratio=0.3)

    A plain ``nn.Conv2d`` (zero padding) runs as ``pyprune.masked_conv2d`` with the mask as its
    bool weight mask: on the CPU the direct sparse convolution, forward and backward, where the
    kept share is small enough to pay (same values and gradients as the masked weight).
    """

    def __init__(self, layer: nn.Module, keep_ratio: float) -> None:
        super().__init__(layer)
        keep_ratio = _validate.real(keep_ratio, "keep_ratio")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = keep_ratio

    def transform(self, weight: Tensor) -> Tensor:
        mask = magnitude_mask(weight, self.keep_ratio)
        return torch.where(mask, weight, 0.0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        conv = self.layer
        if (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and len(args) == 1
                and not kwargs and isinstance(args[0], Tensor) and args[0].dim() == 4):
            return masked_conv2d(args[0], conv.weight, conv.bias, conv.stride, conv.padding,
                                 conv.dilation, conv.groups,
                                 weight_mask=magnitude_mask(conv.weight, self.keep_ratio))
        return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}"
