"""k-winners-take-all (Xiao et al., 2020): public function, fakes, autograd, backend choice."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import _backend, _validate, reference
from ._common import group_view, register, register_linear, register_vmap, save

MODES = ("sample", "channel")


# The compiled ops (schema in csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda).
@torch.library.register_fake("pyprune::kwta")
def _kwta_fake(x: Tensor, k: int, absolute: bool) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 3, lambda: f"x must be a 3-D (N, C, L) view, got {x.dim()}-D")
    torch._check(1 <= k <= x.shape[2], lambda: f"k must be in [1, {x.shape[2]}], got {k}")
    return torch.empty_like(x), x.new_empty(x.shape[:2])


@torch.library.register_fake("pyprune::_kwta_backward")
def _kwta_backward_fake(grad: Tensor, x: Tensor, threshold: Tensor, absolute: bool) -> Tensor:
    torch._check(grad.shape == x.shape, lambda: "grad must have x's shape")
    return torch.empty_like(x)


# The Triton launchers, opaque to the compiler (see SPEC section 3 on TRITON_INTERPRET).
@torch.library.custom_op("pyprune::kwta_triton", mutates_args=())
def _kwta_triton(x: Tensor, k: int, absolute: bool) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import kwta as kernels

    return kernels.kwta_forward(x, k, absolute)


@torch.library.custom_op("pyprune::_kwta_backward_triton", mutates_args=())
def _kwta_backward_triton(grad: Tensor, x: Tensor, threshold: Tensor, absolute: bool) -> Tensor:
    from ..triton_kernels import kwta as kernels

    return kernels.kwta_backward(grad, x, threshold, absolute)


_kwta_triton.register_fake(_kwta_fake)
_kwta_backward_triton.register_fake(_kwta_backward_fake)

_OPS = {
    "cpu": (torch.ops.pyprune.kwta.default, torch.ops.pyprune._kwta_backward.default),
    "cuda": (torch.ops.pyprune.kwta.default, torch.ops.pyprune._kwta_backward.default),
    "triton": (torch.ops.pyprune.kwta_triton.default, torch.ops.pyprune._kwta_backward_triton.default),
}



def _autograd(fwd, bwd) -> Callable:
    """kwta's entry point: gradient and tangent grad * keep_mask, through the backward op
    (linear in grad, so it is its own derivative)."""
    grad_of = register_linear(bwd)

    def setup_context(ctx, inputs, output):
        # The threshold's gradient (always zero) is not materialized: a zero fill fewer.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        save(ctx, inputs[0], output[1])
        ctx.absolute = inputs[2]

    def backward(ctx, grad, _grad_threshold):
        if grad is None:
            return None, None, None
        x, threshold = ctx.saved_tensors
        return grad_of(grad, x, threshold, ctx.absolute), None, None

    def jvp(ctx, tangent, _k, _absolute):
        x, threshold = ctx.saved_tensors
        return grad_of(tangent, x, threshold, ctx.absolute), None

    return register(fwd, setup_context, backward, jvp)


_CALL = {}
for _fwd, _bwd in {v[0]: v[1] for v in _OPS.values()}.items():
    _CALL[_fwd] = _autograd(_fwd, _bwd)
    register_vmap(_fwd, per_sample=(0,))
    register_vmap(_bwd, per_sample=(0, 1, 2))


def kwta(
    x: Tensor,
    ratio: float | None = None,
    *,
    k: int | None = None,
    mode: str = "sample",
    absolute: bool = False,
) -> Tensor:
    r"""k-winners-take-all activation.

    Splits x into groups, keeps every element whose key is at least the k-th largest key of its
    group and zeroes the rest (ties at the threshold are kept; NaN ranks largest and is kept):

        out = where(key(x) >= kth_largest(key(x), group), x, 0),   key = abs if absolute else id

    Args:
        x: floating tensor (N, ...). Any strides; channels_last is kept.
        ratio: fraction of each group to keep; k = int(ratio * group_size). In (0, 1].
        k: number of winners per group, in [1, group_size]. Give exactly one of ratio and k.
        mode: ``"sample"`` (a group is all of one sample, x.flatten(1)) or ``"channel"`` (a
            group is one (n, c) map over the spatial dims; x.dim() >= 3).
        absolute: rank by |x| instead of x.

    Gradient: grad * keep_mask. Backward keeps only x and one threshold per group.

    Example:
        >>> x = torch.randn(8, 64, 32, 32)
        >>> y = pyprune.kwta(x, 0.1)                  # 10% largest of each sample
        >>> y = pyprune.kwta(x, k=5, mode="channel")  # 5 largest of each 32x32 map
    """
    mode = _validate.choice(mode, "mode", MODES)
    _validate.tensor(x, "x", min_dim=2 if mode == "sample" else 3)
    absolute = _validate.flag(absolute, "absolute")
    inner_start = 1 if mode == "sample" else 2
    group_size = math.prod(x.shape[inner_start:])
    k = _validate.count_from_ratio_or_k(ratio, k, group_size, group=f"{mode} group")
    backend = _backend.select("kwta", x)
    if backend == "reference":
        return reference.kwta(x, k, mode, absolute)
    view, restore = group_view(x, inner_start)
    out, _ = _CALL[_OPS[backend][0]](view, k, absolute)
    return restore(out)
