"""Stochastic activation pruning (Dhillon et al., 2018): public function, fakes, autograd,
backend choice. Randomness: pyprune/ops/_random.py."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import _backend, _validate, reference
from ._common import register, register_linear, register_vmap, save
from ._random import draw_seed, memory_order_view


@torch.library.register_fake("pyprune::sap")
def _sap_fake(x: Tensor, seed: Tensor, r: int, exact: bool) -> Tensor:
    torch._check(x.dim() == 2, lambda: f"x must be a 2-D (N, L) view, got {x.dim()}-D")
    torch._check(r >= 1, lambda: f"r must be >= 1, got {r}")
    return torch.empty_like(x)


@torch.library.register_fake("pyprune::_sap_backward")
def _sap_backward_fake(grad: Tensor, x: Tensor, seed: Tensor, r: int, exact: bool) -> Tensor:
    torch._check(grad.shape == x.shape, lambda: "grad must have x's shape")
    return torch.empty_like(grad)


# The Triton launchers, opaque to the compiler (see SPEC section 3 on TRITON_INTERPRET).
@torch.library.custom_op("pyprune::sap_triton", mutates_args=())
def _sap_triton(x: Tensor, seed: Tensor, r: int, exact: bool) -> Tensor:
    from ..triton_kernels import sap as kernels

    return kernels.sap_forward(x, x, seed, r, exact)


@torch.library.custom_op("pyprune::_sap_backward_triton", mutates_args=())
def _sap_backward_triton(grad: Tensor, x: Tensor, seed: Tensor, r: int, exact: bool) -> Tensor:
    from ..triton_kernels import sap as kernels

    return kernels.sap_forward(grad, x, seed, r, exact)


_sap_triton.register_fake(_sap_fake)
_sap_backward_triton.register_fake(_sap_backward_fake)

_OPS = {
    "cpu": (torch.ops.pyprune.sap.default, torch.ops.pyprune._sap_backward.default),
    "cuda": (torch.ops.pyprune.sap.default, torch.ops.pyprune._sap_backward.default),
    "triton": (torch.ops.pyprune.sap_triton.default, torch.ops.pyprune._sap_backward_triton.default),
}



def _autograd(fwd, bwd) -> Callable:
    """SAP's entry point: gradient and tangent grad * kept / q, the kept set regenerated from
    the seed by the backward op (linear in grad, so it is its own derivative)."""
    grad_of = register_linear(bwd)

    def setup_context(ctx, inputs, output):
        x, seed, ctx.r, ctx.exact = inputs
        save(ctx, x, seed)

    def backward(ctx, grad):
        x, seed = ctx.saved_tensors
        return grad_of(grad, x, seed, ctx.r, ctx.exact), None, None, None

    def jvp(ctx, tangent, *_constants):
        x, seed = ctx.saved_tensors
        return grad_of(tangent, x, seed, ctx.r, ctx.exact)

    return register(fwd, setup_context, backward, jvp)


_CALL = {}
for _fwd, _bwd in {v[0]: v[1] for v in _OPS.values()}.items():
    _CALL[_fwd] = _autograd(_fwd, _bwd)
    # Per vmap entry: the seed is shared or not as vmap's randomness asks.
    register_vmap(_fwd, per_sample=None)
    register_vmap(_bwd, per_sample=None)


# The draw count is a 32-bit kernel argument (Triton's i32 r).
MAX_DRAWS = 2**31 - 1


def sap_draws(x: Tensor, ratio: float = 1.0, samples: int | None = None) -> int:
    """r: ``samples``, or int(ratio * group_size) with group_size = x.flatten(1).shape[1]."""
    group_size = math.prod(x.shape[1:])
    if group_size <= 0:
        raise ValueError(f"x's sample group is empty (size {group_size}); nothing to draw from")
    if samples is not None:
        r = _validate.integer(samples, "samples")
        if not 1 <= r <= MAX_DRAWS:
            raise ValueError(f"samples must be in [1, {MAX_DRAWS}], got {r}")
        return r
    ratio = _validate.real(ratio, "ratio")
    if not ratio > 0.0 or math.isinf(ratio):
        raise ValueError(f"ratio must be a finite number > 0, got {ratio}")
    r = torch.sym_int(ratio * group_size)  # symbolic under dynamic shapes, no guard
    if r < 1:
        raise ValueError(
            f"ratio={ratio} draws int({ratio} * {group_size}) = 0 samples from a sample group of "
            f"{group_size}; ratio must be >= {1 / group_size:.3g}"
        )
    if r > MAX_DRAWS:
        raise ValueError(
            f"ratio={ratio} draws int({ratio} * {group_size}) = {float(r):.3g} samples; ratio "
            f"must be <= {MAX_DRAWS / group_size:.3g} ({MAX_DRAWS} draws a call)"
        )
    return r


def sap(
    x: Tensor,
    ratio: float = 1.0,
    *,
    samples: int | None = None,
    exact: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Stochastic activation pruning.

    Per sample (the group is x.flatten(1)), p = |x| / sum|x|; r draws with replacement from p
    (r = ``samples``, or int(ratio * group_size)); each kept element is rescaled so the output is
    unbiased:

        out_j = x_j / q_j if kept else 0,   q_j = 1 - (1 - p_j)^r = -expm1(r * log1p(-p_j))

    exact=True keeps the elements a true multinomial draw hits (inverse CDF against the prefix
    sum of |x| with sorted uniforms from cumulated exponential spacings: no sort, no index
    tensor); exact=False keeps each element independently with probability q_j (same
    marginals, one pass). An all-zero sample gives zeros; a sample with a NaN or inf (p
    undefined) keeps nothing and gives x * 0: NaN at its non-finite elements, 0 elsewhere.

    Randomness comes from ``generator`` (default: torch's default generator of x's device, so
    ``torch.manual_seed`` reproduces the output); a seed reproduces the output on every backend
    run of one device for one memory layout of x. Gradient: grad * kept / q, with the kept set
    regenerated from the seed (backward saves x and a 2-element seed, no mask).

    Data parallelism (DDP, FSDP): a draw depends only on the seed and the sample's position in
    the call's batch, so ranks seeded alike draw the same random numbers for the same local
    batch positions (identical samples get identical masks on every rank). Give each rank its
    own seed: ``pyprune.seed_per_rank(seed)`` seeds the default generator with seed + rank, or
    pass ``generator=torch.Generator(x.device).manual_seed(seed + rank)``.

    Example:
        >>> y = pyprune.sap(torch.relu(torch.randn(8, 64, 32, 32)))           # r = 65536 draws
        >>> y = pyprune.sap(x, samples=1000, exact=False, generator=gen)
    """
    _validate.tensor(x, "x", min_dim=2)
    exact = _validate.flag(exact, "exact")
    generator = _validate.generator(generator, x.device)
    r = sap_draws(x, ratio, samples)
    backend = _backend.select("sap", x)
    if backend == "reference":
        return reference.sap(x, r, exact, generator)
    seed = draw_seed(x.device, generator)
    view, restore = memory_order_view(x, 1)
    return restore(_CALL[_OPS[backend][0]](view, seed, r, exact))
