"""Channel-wise activation suppressing (Bai et al., 2021): public function, fakes, autograd,
backend choice."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _backend, _validate, reference
from ._common import eager_kernel, group_view, register, register_vmap, save, vjp


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The compiled ops (schema in csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda).
@torch.library.register_fake("pyprune::cas")
def _cas_fake(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], label: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 3, lambda: f"x must be a 3-D (N, K, L) view, got {x.dim()}-D")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: f"weight must have shape (num_classes, {x.shape[1]})")
    n, k = x.shape[0], x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty((n, weight.shape[0])),
        x.new_empty((n,), dtype=torch.int64),
        x.new_empty((n, k), dtype=_acc_dtype(x.dtype)),
    )


@torch.library.register_fake("pyprune::_cas_backward")
def _cas_backward_fake(
    grad_out: Tensor, grad_logits: Tensor, x: Tensor, weight: Tensor, index: Tensor, mean: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(grad_out.shape == x.shape, lambda: "grad_out must have x's shape")
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


# The Triton launchers, opaque to the compiler (see SPEC section 3 on TRITON_INTERPRET).
@torch.library.custom_op("pyprune::cas_triton", mutates_args=())
def _cas_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], label: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels import cas as kernels

    # Checked here, so that a compiled graph calling this op checks too: CPU labels (the
    # interpreter) are read on the host (a ValueError naming the value); on a GPU the kernels
    # flag a bad label and the launcher asserts on the flag (no host sync, one launch).
    if label is not None and _validate.host_reads_free(label):
        _validate.label_range(label, weight.shape[0])
    return kernels.cas_forward(x, weight, bias, label)


@torch.library.custom_op("pyprune::_cas_backward_triton", mutates_args=())
def _cas_backward_triton(
    grad_out: Tensor, grad_logits: Tensor, x: Tensor, weight: Tensor, index: Tensor, mean: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels import cas as kernels

    return kernels.cas_backward(grad_out, grad_logits, x, weight, index, mean)


_cas_triton.register_fake(_cas_fake)
_cas_backward_triton.register_fake(_cas_backward_fake)

_OPS = {
    "cpu": (torch.ops.pyprune.cas.default, torch.ops.pyprune._cas_backward.default),
    "cuda": (torch.ops.pyprune.cas.default, torch.ops.pyprune._cas_backward.default),
    "triton": (torch.ops.pyprune.cas_triton.default, torch.ops.pyprune._cas_backward_triton.default),
}


def _cas_of(index: Tensor, has_bias: bool) -> Callable:
    """CAS on the (N, K, L) view with the class of each sample fixed, in differentiable torch
    ops: the derivative of the kernels' math (argmax has none)."""
    def cas_fixed(x: Tensor, weight: Tensor, bias: Tensor | None = None):
        logits = x.mean(2) @ weight.T
        return x * weight[index][:, :, None], logits + bias if has_bias else logits

    return cas_fixed


def _autograd(fwd, bwd) -> Callable:
    """CAS's entry point. First-order backward runs the backward kernel; when a graph of the
    gradient is built (create_graph, torch.func) the same gradient comes from the differentiable
    formula, and forward-mode AD takes its tangent (the product rule) from it too."""
    bwd_kernel = eager_kernel(bwd)

    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, _, index, mean = output
        # index and mean serve backward only; differentiating through them raises. Their
        # gradients (always zero) are not materialized: two zero fills fewer a backward.
        ctx.mark_non_differentiable(index, mean)
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        save(ctx, x, weight, index, mean)

    def backward(ctx, grad_out, grad_logits, _grad_index, _grad_mean):
        x, weight, index, mean = ctx.saved_tensors
        if grad_out is None:  # out or logits unused: its gradient is zero
            grad_out = torch.zeros_like(x)
        if grad_logits is None:
            grad_logits = x.new_zeros((x.shape[0], weight.shape[0]))
        if torch.is_grad_enabled():
            # The gradients do not depend on the bias's value: a zero one stands in.
            bias = (weight.new_zeros(weight.shape[0]),) if ctx.has_bias else ()
            grads = vjp(_cas_of(index, ctx.has_bias), (x, weight, *bias), (grad_out, grad_logits))
            return (*grads, None) if ctx.has_bias else (*grads, None, None)
        grad_x, grad_weight, grad_bias = bwd_kernel(grad_out, grad_logits, x, weight, index, mean)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None

    def jvp(ctx, tangent_x, tangent_weight, tangent_bias, _tangent_label):
        # The product rule on out = x * weight[index] and logits = mean(x) @ weight.T + bias.
        x, weight, index, mean = ctx.saved_tensors
        out = torch.zeros_like(x)
        logits = x.new_zeros((x.shape[0], weight.shape[0]))
        if tangent_x is not None:
            out = out + tangent_x * weight[index][:, :, None]
            logits = logits + tangent_x.mean(2) @ weight.T
        if tangent_weight is not None:
            out = out + x * tangent_weight[index][:, :, None]
            logits = logits + mean.to(x.dtype) @ tangent_weight.T
        if tangent_bias is not None:
            logits = logits + tangent_bias
        return out, logits, None, None

    return register(fwd, setup_context, backward, jvp)


_CALL = {}
for _fwd, _bwd in {v[0]: v[1] for v in _OPS.values()}.items():
    _CALL[_fwd] = _autograd(_fwd, _bwd)
    register_vmap(_fwd, per_sample=(0, 3))
    register_vmap(_bwd, per_sample=None)  # its weight and bias gradients sum over the batch


def _check_args(x: object, weight: object, bias: object, label: object) -> None:
    """CAS's argument checks (all before any kernel runs)."""
    _validate.tensor(x, "x", dim=4)
    _validate.tensor(weight, "weight", dim=2)
    n, k, h, w = x.shape
    if k == 0 or h * w == 0:
        raise ValueError(
            f"x must have at least one channel and one spatial element, got shape {tuple(x.shape)}"
        )
    classes = weight.shape[0]
    if weight.shape[1] != k or classes == 0:
        raise ValueError(
            f"weight must have shape (num_classes >= 1, {k}) for x with {k} channels, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        _validate.tensor(bias, "bias", dim=1)
        if bias.shape[0] != classes:
            raise ValueError(f"bias must have shape ({classes},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if label is not None:
        if not isinstance(label, Tensor):
            raise TypeError(f"label must be a torch.Tensor or None, got {type(label).__name__}")
        if label.dtype != torch.int64:
            raise TypeError(f"label must be an int64 tensor of class indices, got {label.dtype}")
        if label.shape != (n,):
            raise ValueError(f"label must have shape ({n},) (one class per sample), "
                             f"got {tuple(label.shape)}")
    _validate.same_device(x=x, weight=weight, bias=bias, label=label)


def cas(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, label: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Channel-wise activation suppressing (Bai et al., ICLR 2021).

    An auxiliary linear classifier on the channel means of x, whose weight row of a class
    rescales the channels:

        logits = mean_hw(x) @ weight.T + bias
        m      = weight[label]  if a label is given (training), else weight[argmax(logits)]
        out    = x * m[:, :, None, None]

    Args:
        x: (N, K, H, W) float tensor; any strides (channels_last is kept).
        weight: (C, K) classifier weight, x's dtype (like ``nn.Linear(K, C).weight``).
        bias: (C,) or None.
        label: (N,) int64 class indices in [0, C), or None (then the argmax of the logits, the
            first index on ties, NaN counting as largest, as torch.argmax).

    Returns:
        (out, logits): out like x, logits (N, C) in x's dtype. Differentiable in x, weight and
        bias (the argmax itself is not). Backward keeps x, the per-sample class index and the
        (N, K) channel means.

    Example:
        >>> x, w = torch.randn(8, 256, 8, 8), torch.randn(10, 256)
        >>> out, logits = pyprune.cas(x, w, label=torch.randint(10, (8,)))   # training
        >>> out, logits = pyprune.cas(x, w)                                  # inference
    """
    _check_args(x, weight, bias, label)
    backend = _backend.select("cas", x)
    # The cpu kernel and the triton op check the labels themselves, the cuda kernel with a device
    # assert where it reads them (no extra launches).
    if backend == "reference":
        _validate.label_range(label, weight.shape[0])
        return reference.cas(x, weight, bias, label)
    view, restore = group_view(x, 2)
    out, logits, _, _ = _CALL[_OPS[backend][0]](view, weight, bias, label)
    return restore(out), logits
