"""The noise and pruning baselines of SAP: gaussian_noise (RNA/RSA on activations, RNW/RSW on
weights) and magnitude_mask (DWP). Randomness: pyprune/ops/_random.py."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _backend, _validate, reference
from ._common import register, register_vmap, save
from ._random import draw_seed, memory_order_view
from .kwta import _OPS as _KWTA_OPS


@torch.library.register_fake("pyprune::gaussian_noise")
def _noise_fake(x: Tensor, seed: Tensor, std: float, multiplicative: bool) -> Tensor:
    torch._check(x.dim() == 1, lambda: f"x must be a 1-D view, got {x.dim()}-D")
    return torch.empty_like(x)


@torch.library.custom_op("pyprune::gaussian_noise_triton", mutates_args=())
def _noise_triton(x: Tensor, seed: Tensor, std: float, multiplicative: bool) -> Tensor:
    from ..triton_kernels import noise as kernels

    return kernels.gaussian_noise(x, seed, std, multiplicative)


_noise_triton.register_fake(_noise_fake)

_OPS = {
    "cpu": torch.ops.pyprune.gaussian_noise.default,
    "cuda": torch.ops.pyprune.gaussian_noise.default,
    "triton": torch.ops.pyprune.gaussian_noise_triton.default,
}


def _autograd(op) -> Callable:
    """gaussian_noise's entry point. d/dx of x + std n is 1; of x (1 + std n) it is (1 + std n):
    the op itself applied to the gradient or tangent (linear, so its own derivative too)."""

    def setup_context(ctx, inputs, output):
        _, seed, ctx.std, ctx.multiplicative = inputs
        save(ctx, seed)

    def derivative(ctx, g: Tensor) -> Tensor:
        (seed,) = ctx.saved_tensors
        return call(g, seed, ctx.std, True) if ctx.multiplicative else g

    def backward(ctx, grad):
        return derivative(ctx, grad), None, None, None

    def jvp(ctx, tangent, *_constants):
        return derivative(ctx, tangent)

    call = register(op, setup_context, backward, jvp)
    return call


_CALL = {}
for _op in set(_OPS.values()):
    _CALL[_op] = _autograd(_op)
    register_vmap(_op, per_sample=None)  # per vmap entry, as vmap's randomness asks


def gaussian_noise(
    x: Tensor,
    std: float,
    *,
    multiplicative: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Random noise: x + N(0, std^2) (RNA on activations, RNW on weights) or, multiplicative,
    x * N(1, std^2) (RSA / RSW). One fused pass; no noise tensor is materialized.

    Randomness comes from ``generator`` (default: torch's default generator of x's device, so
    ``torch.manual_seed`` reproduces it); backward regenerates the noise from the seed.
    Gradient: grad (additive) or grad * (1 + std * n) (multiplicative).

    Data parallelism (DDP, FSDP): the noise of an element depends only on the seed and the
    element's position in x, so ranks seeded alike add the same noise at the same local batch
    positions. Give each rank its own seed: ``pyprune.seed_per_rank(seed)`` (seed + rank for the
    default generator) or ``generator=torch.Generator(x.device).manual_seed(seed + rank)``.
    (Noise on a weight, ``nn.NoisyWeight``, is the same on every rank seeded alike, as the
    weight is; after ``seed_per_rank`` each rank perturbs the weight with its own noise.)

    Example:
        >>> y = pyprune.gaussian_noise(x, 0.1)
        >>> w = pyprune.gaussian_noise(conv.weight, 0.05, multiplicative=True)
    """
    _validate.tensor(x, "x")
    std = _validate.real(std, "std")
    if not 0.0 <= std < float("inf"):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    multiplicative = _validate.flag(multiplicative, "multiplicative")
    generator = _validate.generator(generator, x.device)
    backend = _backend.select("gaussian_noise", x)
    if backend == "reference":
        return reference.gaussian_noise(x, std, multiplicative, generator)
    seed = draw_seed(x.device, generator)
    view, restore = memory_order_view(x, 0)
    return restore(_CALL[_OPS[backend]](view, seed, std, multiplicative))


def magnitude_mask(w: Tensor, keep_ratio: float) -> Tensor:
    r"""DWP mask: True for the k = int(keep_ratio * w.numel()) largest |w| of the whole tensor
    (ties at the threshold kept, NaN counts as largest and is kept), False elsewhere; all False
    where k is 0 (keep_ratio < 1 / w.numel()).

    The threshold is k-WTA's select (torch.ops.pyprune.kwta over |w| as one group); under
    torch.compile it is torch.topk's (``reference.kth_largest``), whose k may stay symbolic (the
    kernel's int k would specialize the graph to each size).

    Example:
        >>> mask = pyprune.magnitude_mask(conv.weight, 0.2)   # keep the 20% largest weights
    """
    _validate.tensor(w, "w", min_dim=1)
    keep_ratio = _validate.real(keep_ratio, "keep_ratio")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if w.numel() == 0:
        raise ValueError("w is empty; nothing to select from")
    k = int(keep_ratio * w.numel())
    if k == 0:
        return torch.zeros_like(w, dtype=torch.bool, memory_format=torch.contiguous_format)
    backend = _backend.select("magnitude_mask", w)
    if backend == "reference":
        return reference.magnitude_mask(w, keep_ratio)
    w = w.detach()
    if torch.compiler.is_compiling():
        threshold = reference.kth_largest(w.abs().flatten(), k)
    else:
        _, threshold = _KWTA_OPS[backend][0](w.reshape(1, 1, -1), k, True)
    return (w.abs() >= threshold.view(())) | w.isnan()
