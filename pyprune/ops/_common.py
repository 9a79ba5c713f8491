"""Registration and layout helpers shared by every op and backend."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def mergeable(sizes: list[int], strides: list[int]) -> bool:
    """Whether dims with these sizes/strides (outer to inner) can be viewed as one dim."""
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    return all(dims[i][1] == dims[i + 1][0] * dims[i + 1][1] for i in range(len(dims) - 1))


def group_view(x: Tensor, inner_start: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View x as (N, C, L): dims before ``inner_start`` index groups, the rest form a group.

    inner_start=1: one group per sample (C = 1); inner_start=2: one group per (n, c).
    Selection within a group does not depend on element order, so a sample's dims are taken in
    memory order, which views contiguous and channels_last tensors without a copy. Returns the
    view and a function that maps a result laid out like the view back to x's shape; a result
    allocated with empty_like(view) then keeps x's memory format.
    """
    n = x.shape[0]
    c = x.shape[1] if inner_start == 2 else 1
    inner = list(range(inner_start, x.dim()))
    length = math.prod(x.shape[inner_start:])
    order = sorted(inner, key=lambda d: -x.stride(d))
    sizes = [x.shape[d] for d in order]
    if mergeable(sizes, [x.stride(d) for d in order]):
        perm = list(range(inner_start)) + order
        permuted = x.permute(perm)
        inverse = [perm.index(d) for d in range(x.dim())]
        shape = permuted.shape
        return permuted.view(n, c, length), lambda out: out.view(shape).permute(inverse)
    return x.reshape(n, c, length), lambda out: out.view(x.shape)


def register_autograd(
    op: str,
    backward: Callable[..., Tensor],
    save: Callable[[tuple, tuple], tuple[Tensor, ...]],
    attrs: Callable[[tuple], dict],
) -> None:
    """Autograd for op: save(inputs, outputs) tensors, attrs(inputs) constants, and
    backward(grad, *saved, **attrs) -> grad of the first input (other inputs get None)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*save(inputs, output))
        ctx.attrs = attrs(inputs)
        ctx.n_inputs = len(inputs)

    def bwd(ctx, grad, *unused):
        return (backward(grad, *ctx.saved_tensors, **ctx.attrs),) + (None,) * (ctx.n_inputs - 1)

    torch.library.register_autograd(op, bwd, setup_context=setup_context)


def register_linear_backward(
    op: str, save: Callable[[tuple], tuple[Tensor, ...]], attrs: Callable[[tuple], dict]
) -> None:
    """Autograd for a backward op linear in its first input (grad) and locally constant in the
    rest (kwta's mask, SAP's kept / q): its derivative in grad is op itself, so double
    backward (gradient penalties, Hessian-vector products) gets op(grad_grad, *saved)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*save(inputs))
        ctx.attrs = attrs(inputs)
        ctx.n_inputs = len(inputs)

    def bwd(ctx, grad_grad):
        return (op(grad_grad, *ctx.saved_tensors, **ctx.attrs),) + (None,) * (ctx.n_inputs - 1)

    torch.library.register_autograd(op, bwd, setup_context=setup_context)


def forbid_double_backward(op: str, what: str) -> None:
    """Autograd for a backward op that has no derivative of its own: differentiating through
    it raises instead of silently giving no gradient."""

    def setup_context(ctx, inputs, output):
        pass

    def bwd(ctx, *grads):
        raise RuntimeError(
            f"{what}: double backward (differentiating its gradient, e.g. for a gradient "
            "penalty) is not supported"
        )

    torch.library.register_autograd(op, bwd, setup_context=setup_context)
