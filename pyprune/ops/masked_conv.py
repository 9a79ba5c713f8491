"""Masked convolution: public function, fakes, autograd, backend choice.

pyprune.masked_conv2d(x, weight, bias, stride, padding, dilation, groups, *, in_mask, out_mask,
weight_mask) = F.conv2d(x * in_mask, weight * weight_mask, bias, ...) * out_mask.

Boolean channel masks are structural: the kernels (torch.ops.pyprune.masked_conv2d) skip the
masked work. Float masks multiply and receive gradients; a float mask shared by every sample is
folded into the weight and bias (weight-sized work, no pass over x or the output). A per-sample
float in_mask is applied by the CUDA and Triton kernels as they load x (no scaled copy of x), a
per-sample float out_mask in their epilogue (storing the unscaled output as well only when the
mask's gradient is wanted, as eager does); on the CPU they multiply x or the output.

A bool weight mask alone (no bool channel masks, groups 1) runs on the CPU as
torch.ops.pyprune._sparse_conv2d: a direct sparse convolution over the kept weights where few
enough are kept to pay (csrc/cpu/sparse_conv.cpp documents the measured limits, by output size
and reduction length: 13-35% kept for 32x32 and larger outputs down to 3-4% for 4x4), else
oneDNN on the masked weight; its
backward computes the weight gradient at the kept weights only and, for stride 1, the input
gradient with the same kernel on the transposed weight. On the Triton backend it runs as
torch.ops.pyprune._sparse_conv2d_triton, block-sparse (triton_kernels/masked_conv.py: tiles of
16 output x 16 input channels at one tap without a kept weight are skipped). Other weight masks
(float, or with channel masks, or on the cuda backend, where the break-even against cuDNN has
not been measured) apply to the weight, computed on the fly for each call, and the dense engine
runs.
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _layout, _validate, reference
from ._common import _transforming, eager_kernel, register, register_vmap, vjp

IntPair = Union[int, Sequence[int]]


def _empty_output(x: Tensor, weight: Tensor, channels: int, stride, padding, dilation) -> Tensor:
    """The (N, channels, H_out, W_out) output of a convolution, in x's memory format."""
    h, w = ((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
            // stride[i] + 1 for i in range(2))
    return x.new_empty((x.shape[0], channels, h, w)).contiguous(
        memory_format=_layout.memory_format(x))


@torch.library.register_fake("pyprune::masked_conv2d")
def _masked_conv2d_fake(x, weight, bias, stride, padding, dilation, groups, in_mask, out_mask):
    return _empty_output(x, weight, weight.shape[0], stride, padding, dilation)


@torch.library.register_fake("pyprune::_masked_conv2d_backward")
def _masked_conv2d_backward_fake(grad, x, weight, stride, padding, dilation, groups, in_mask,
                                 out_mask):
    return (torch.empty_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((weight.shape[0],)))


def _register(op, setup_context, backward, reference_of, per_sample) -> Callable:
    """A convolution op's entry point (ops._common.register) and vmap rule. First-order backward
    runs the op's backward kernels; when a graph of the gradient is built (create_graph,
    torch.func) the gradient comes from ``reference_of(ctx, x, weight, bias, *masks)``, the
    same convolution in differentiable torch ops, so double backward is exact. Forward-mode AD
    (torch.func.jvp / jacfwd, forward_ad) raises NotImplementedError. ``reference_of`` sees the saved x, weight and masks and a zero bias
    (the gradients do not depend on its value)."""
    def differentiable_backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        bias_at, mask_at, n_inputs = ctx.layout
        x, weight, *masks = ctx.saved_tensors[:2 + len(mask_at)]
        soft = [i for i, m in enumerate(masks) if _soft(m)]

        def fn(x, weight, *rest):
            rest = iter(rest)
            bias = next(rest) if ctx.has_bias else None
            ms = [next(rest) if i in soft else m for i, m in enumerate(masks)]
            return reference_of(ctx, x, weight, bias, *ms)

        bias = (weight.new_zeros(weight.shape[0]),) if ctx.has_bias else ()
        got = iter(vjp(fn, (x, weight, *bias, *(masks[i] for i in soft)),
                       grads if len(grads) > 1 else grads[0]))
        out = [None] * n_inputs
        out[0], out[1] = next(got), next(got)
        if ctx.has_bias:
            out[bias_at] = next(got)
        for i in soft:
            out[mask_at[i]] = next(got)
        return tuple(out)

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "masked_conv2d: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) "
            "is not supported; use reverse mode (torch.func.jacrev, vjp)")

    call = register(op, setup_context, differentiable_backward, jvp)
    register_vmap(op, per_sample=per_sample)
    return call


@torch.library.register_fake("pyprune::_sparse_conv2d")
def _sparse_conv2d_fake(x, weight, weight_mask, bias, stride, padding, dilation):
    return _empty_output(x, weight, weight.shape[0], stride, padding, dilation)


def _sparse_conv2d_setup(ctx, inputs, output):
    x, weight, weight_mask, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, weight_mask)
    ctx.attrs = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.layout = (3, (2,), len(inputs))


@torch.library.register_fake("pyprune::_sparse_conv2d_backward")
def _sparse_conv2d_backward_fake(grad, x, weight, weight_mask, stride, padding, dilation, x_grad,
                                 weight_grad):
    return (torch.empty_like(x) if x_grad else x.new_empty((0,)),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad
            else weight.new_empty((0,)))


def _sparse_conv2d_backward(op):
    """The autograd backward of a weight-mask convolution whose backward op is ``op``: grad_x
    and grad_weight from it (sparse where the forward is), grad_bias summed."""
    def backward(ctx, grad):
        x, weight, weight_mask = ctx.saved_tensors
        stride, padding, dilation = ctx.attrs
        x_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = op(grad.contiguous(memory_format=_layout.memory_format(x)),
                    x, weight, weight_mask, stride, padding, dilation, x_grad, weight_grad)
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (gx if x_grad else None, gw if weight_grad else None, None, gb, None, None, None)

    return backward


# The Triton weight-mask convolution (block-sparse, triton_kernels/masked_conv.py), opaque to
# the compiler like the other Triton launchers.
@torch.library.custom_op("pyprune::_sparse_conv2d_triton", mutates_args=())
def _sparse_conv2d_triton(
    x: Tensor, weight: Tensor, weight_mask: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> Tensor:
    from ..triton_kernels import masked_conv as kernels

    return kernels.masked_conv2d_forward(x, weight, bias, tuple(stride), tuple(padding),
                                         tuple(dilation), None, None, weight_mask=weight_mask)


@torch.library.custom_op("pyprune::_sparse_conv2d_backward_triton", mutates_args=())
def _sparse_conv2d_backward_triton(
    grad: Tensor, x: Tensor, weight: Tensor, weight_mask: Tensor, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], x_grad: bool, weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import masked_conv as kernels

    return kernels.sparse_conv2d_backward(grad, x, weight, weight_mask, tuple(stride),
                                          tuple(padding), tuple(dilation), x_grad, weight_grad)


_sparse_conv2d_triton.register_fake(_sparse_conv2d_fake)
_sparse_conv2d_backward_triton.register_fake(_sparse_conv2d_backward_fake)

# Weight-mask convolution per backend: (forward, backward).
_SPARSE_OPS = {
    "cpu": (torch.ops.pyprune._sparse_conv2d.default,
            torch.ops.pyprune._sparse_conv2d_backward.default),
    "triton": (torch.ops.pyprune._sparse_conv2d_triton.default,
               torch.ops.pyprune._sparse_conv2d_backward_triton.default),
}
_SPARSE_CALL = {}
for _fwd, _bwd in _SPARSE_OPS.values():
    _SPARSE_CALL[_fwd] = _register(
        _fwd, _sparse_conv2d_setup, _sparse_conv2d_backward(_bwd),
        lambda ctx, x, weight, bias, weight_mask: reference.masked_conv2d(
            x, weight, bias, *ctx.attrs, weight_mask=weight_mask),
        per_sample=(0,))


@torch.library.register_fake("pyprune::_channel_conv")
def _channel_conv_fake(x, weight, bias, stride, padding, dilation, in_index, out_index, channels):
    return _empty_output(x, weight, channels, stride, padding, dilation)


# The Triton launchers, opaque to the compiler (see SPEC section 3 on TRITON_INTERPRET).
@torch.library.custom_op("pyprune::masked_conv2d_triton", mutates_args=())
def _masked_conv2d_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int, in_mask: Optional[Tensor],
    out_mask: Optional[Tensor],
) -> Tensor:
    for mask, name in ((in_mask, "in_mask"), (out_mask, "out_mask")):
        if _soft(mask):  # bool only, as pyprune::masked_conv2d (soft: the scaled op)
            raise TypeError(f"masked_conv2d_triton: {name} must be bool, got {mask.dtype}")
    if groups > 1:  # as on every backend: the dense engine with the masks around it
        return reference.masked_conv2d(x, weight, bias, stride, padding, dilation, groups,
                                       in_mask, out_mask)
    from ..triton_kernels import masked_conv as kernels

    return kernels.masked_conv2d_forward(x, weight, bias, tuple(stride), tuple(padding),
                                         tuple(dilation), in_mask, out_mask)


@torch.library.custom_op("pyprune::_masked_conv2d_backward_triton", mutates_args=())
def _masked_conv2d_backward_triton(
    grad: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int, in_mask: Optional[Tensor], out_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias), as pyprune::_masked_conv2d_backward."""
    from ..triton_kernels import masked_conv as kernels

    return kernels.masked_conv2d_backward(grad, x, weight, tuple(stride), tuple(padding),
                                          tuple(dilation), in_mask, out_mask, groups)


def _soft(mask: Optional[Tensor]) -> bool:
    return mask is not None and mask.dtype != torch.bool


_masked_conv2d_backward_triton.register_fake(_masked_conv2d_backward_fake)
_masked_conv2d_triton.register_fake(_masked_conv2d_fake)


# Soft (float) per-sample channel masks inside the kernels (pyprune::_masked_conv2d_scaled's
# contract, csrc/ops.cpp): the in_mask scales x's channels as they are loaded, the out_mask the
# output in the epilogue; the unscaled output is returned as well when the out_mask's gradient
# is wanted (raw; else an empty tensor), as eager conv2d(...) * out_mask keeps it too.
@torch.library.custom_op("pyprune::_masked_conv2d_scaled_triton", mutates_args=())
def _masked_conv2d_scaled_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], in_mask: Optional[Tensor],
    out_mask: Optional[Tensor], raw: bool,
) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import masked_conv as kernels

    unscaled = _empty_output(x, weight, weight.shape[0], stride, padding, dilation) if raw else None
    out = kernels.masked_conv2d_forward(x, weight, bias, tuple(stride), tuple(padding),
                                        tuple(dilation), in_mask, out_mask, raw=unscaled)
    return out, unscaled if raw else x.new_empty((0,))


def _masked_conv2d_scaled_fake(x, weight, bias, stride, padding, dilation, in_mask, out_mask,
                               raw):
    out = _empty_output(x, weight, weight.shape[0], stride, padding, dilation)
    return out, torch.empty_like(out) if raw else x.new_empty((0,))


_masked_conv2d_scaled_triton.register_fake(_masked_conv2d_scaled_fake)
torch.library.register_fake("pyprune::_masked_conv2d_scaled")(_masked_conv2d_scaled_fake)


def _scaled_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, in_mask, out_mask, ctx.raw = inputs
    ctx.save_for_backward(x, weight, in_mask, out_mask, output[1])
    ctx.attrs = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.layout = (2, (6, 7), len(inputs))


def _scaled_reference(ctx, x, weight, bias, in_mask, out_mask):
    out = reference.masked_conv2d(x, weight, bias, *ctx.attrs, 1, in_mask, out_mask)
    if not ctx.raw:
        return out, out.new_zeros((0,))
    unscaled = reference.masked_conv2d(x, weight, bias, *ctx.attrs, 1, in_mask,
                                       None if _soft(out_mask) else out_mask)
    return out, unscaled


def _channel_scale(mask: Tensor) -> Tensor:
    return mask.view(*((-1,) if mask.dim() == 2 else (1,)), mask.shape[-1], 1, 1)


def _scaled_backward(bwd):
    """The autograd backward of a soft-mask op whose bool-mask backward op is ``bwd``: with
    u = x * in_mask (soft) and grad_u = grad * out_mask (soft), ``bwd`` gives grad_u's input
    gradient g, grad_weight and grad_bias (skipping what bool masks remove); then grad_x =
    g * in_mask, grad_in_mask = sum over (H, W) of g * x, grad_out_mask = sum over (H, W) of
    grad * raw (over the batch too for a (C,) mask)."""
    bwd = eager_kernel(bwd)

    def backward(ctx, grad, _grad_raw):
        x, weight, in_mask, out_mask, raw = ctx.saved_tensors
        stride, padding, dilation = ctx.attrs
        soft_in, soft_out = _soft(in_mask), _soft(out_mask)
        grad_u = grad * _channel_scale(out_mask) if soft_out else grad
        u = x * _channel_scale(in_mask) if soft_in else x
        gx, gw, gb = bwd(
            grad_u.contiguous(memory_format=_layout.memory_format(x)),
            u, weight, stride, padding, dilation, 1, None if soft_in else in_mask,
            None if soft_out else out_mask)
        g_in = g_out = None
        if soft_in:
            if ctx.needs_input_grad[6]:
                g_in = (gx * x).sum((2, 3))
                g_in = g_in.sum(0) if in_mask.dim() == 1 else g_in
            gx = gx * _channel_scale(in_mask)
        if soft_out and ctx.needs_input_grad[7]:
            if raw.numel() != grad.numel():
                raise RuntimeError("masked_conv2d: the out_mask gradient needs the unscaled "
                                   "output; call with raw=True")
            g_out = (grad * raw).sum((2, 3))
            g_out = g_out.sum(0) if out_mask.dim() == 1 else g_out
        return (gx, gw, gb if ctx.has_bias else None, None, None, None, g_in, g_out, None)

    return backward

_OPS = {
    "cpu": (torch.ops.pyprune.masked_conv2d.default, torch.ops.pyprune._masked_conv2d_backward.default),
    "cuda": (torch.ops.pyprune.masked_conv2d.default, torch.ops.pyprune._masked_conv2d_backward.default),
    "triton": (torch.ops.pyprune.masked_conv2d_triton.default,
               torch.ops.pyprune._masked_conv2d_backward_triton.default),
}


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, in_mask, out_mask = inputs
    ctx.save_for_backward(x, weight, in_mask, out_mask)
    ctx.attrs = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.layout = (2, (7, 8), len(inputs))


def _backward_of(bwd):
    """The autograd backward of a bool-mask convolution whose backward op is ``bwd``, called as
    ops._common.eager_kernel does (below autograd; a Triton launcher directly)."""
    bwd = eager_kernel(bwd)

    def backward(ctx, grad):
        x, weight, in_mask, out_mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.attrs
        gx, gw, gb = bwd(
            grad.contiguous(memory_format=_layout.memory_format(x)),
            x, weight, stride, padding, dilation, groups, in_mask, out_mask)
        return gx, gw, gb if ctx.has_bias else None, None, None, None, None, None, None

    return backward


_CALL = {}
for _fwd, _bwd in {v[0]: v[1] for v in _OPS.values()}.items():
    _CALL[_fwd] = _register(
        _fwd, _setup_context, _backward_of(_bwd),
        lambda ctx, x, weight, bias, in_mask, out_mask: reference.masked_conv2d(
            x, weight, bias, *ctx.attrs, in_mask, out_mask),
        per_sample=lambda ranks: (0,) + tuple(i for i in (7, 8) if ranks[i] == 2))

# Soft per-sample channel masks inside the kernels, per backend.
_SCALED_OPS = {
    "cuda": torch.ops.pyprune._masked_conv2d_scaled.default,
    "triton": torch.ops.pyprune._masked_conv2d_scaled_triton.default,
}
_SCALED_CALL = {  # per backend, as _SCALED_OPS
    _backend_name: _register(_op, _scaled_setup, _scaled_backward(_OPS[_backend_name][1]), _scaled_reference,
                   per_sample=None)
    for _backend_name, _op in _SCALED_OPS.items()
}


def _pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    # The common cases, without the ABC checks: an int or a pair of ints (not bool: exact types).
    if type(value) is int and value >= minimum:
        return value, value
    if (type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and min(value) >= minimum):
        return value[0], value[1]
    values = (value, value) if isinstance(value, numbers.Integral) else value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(values[0]), int(values[1])


# Integer types of each float dtype's width, for exact bitwise masking.
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _keep(t: Tensor, mask: Tensor) -> Tensor:
    """t where mask else +0.0, exactly: masked entries take no part even if inf or NaN. On the
    CPU without autograd, an AND with all-ones / all-zeros bit patterns (5x faster than
    torch.where for a 128x128x3x3 weight there); else torch.where with a scalar zero (one
    launch on the GPU, where the AND takes three: the mask's conversion, its negation, the
    AND). Under a torch.func transform or forward-mode AD, torch.where too: the bit patterns
    carry no tangent (jvp through them would drop the weight's tangent)."""
    if ((torch.is_grad_enabled() and t.requires_grad) or torch.compiler.is_compiling()
            or t.device.type != "cpu" or _transforming()):
        return torch.where(mask, t, 0.0)
    bits = _BITS[t.dtype]
    return (t.contiguous().view(bits) & -mask.to(bits)).view(t.dtype)  # mask broadcasts


@functools.lru_cache(maxsize=1024)
def _reads_every_position(size: int, kernel: int, stride: int, padding: int,
                          dilation: int) -> bool:
    """Whether the convolution's taps along one spatial dim read every input position."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    read = bytearray(size)
    for o in range(out):
        for t in range(kernel):
            i = o * stride - padding + t * dilation
            if 0 <= i < size:
                read[i] = 1
    return all(read)


def _leaves_unread_input(x: Tensor, weight: Tensor, stride: tuple[int, int],
                         padding: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether some input position is read by no output (strides past the kernel's span,
    dilation gaps, a remainder at the edge); True for symbolic sizes."""
    for i in range(2):
        size, kernel = x.shape[2 + i], weight.shape[2 + i]
        if not (isinstance(size, int) and isinstance(kernel, int)):
            return True
        if not _reads_every_position(size, kernel, stride[i], padding[i], dilation[i]):
            return True
    return False


def fold_static_masks(
    weight: Tensor, bias: Optional[Tensor], groups: int, in_mask: Optional[Tensor] = None,
    out_mask: Optional[Tensor] = None, weight_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """weight and bias with masks shared by the batch applied to them: weight_mask entrywise,
    in_mask (C_in,) on the weight's input columns (of each group), out_mask (C_out,) on its rows
    and the bias. A bool mask zeroes exactly (inf or NaN in masked entries do not leak), a float
    one multiplies. conv2d(x * in_mask, weight, bias) * out_mask = conv2d(x, folded weight,
    folded bias)."""
    def apply(t: Tensor, m: Tensor) -> Tensor:
        return _keep(t, m) if m.dtype == torch.bool else t * m

    if weight_mask is not None:
        weight = apply(weight, weight_mask)
    if in_mask is not None:
        c_out, c_in_group = weight.shape[:2]
        grouped = weight.reshape(groups, c_out // groups, *weight.shape[1:])
        weight = apply(grouped, in_mask.view(groups, 1, c_in_group, 1, 1)).reshape(weight.shape)
    if out_mask is not None:
        weight = apply(weight, out_mask.view(-1, 1, 1, 1))
        bias = None if bias is None else apply(bias, out_mask)
    return weight, bias


def _check_mask(mask: object, name: str, channels: int, x: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != x.dtype:
        raise TypeError(f"{name} must be bool (structural) or x's dtype {x.dtype} (soft), "
                        f"got {mask.dtype}")
    n = x.shape[0]
    # Dim by dim, as comparisons of possibly symbolic sizes: `mask.shape in ((c,), (n, c))` has
    # rejected a matching (1, c) mask under torch.compile(dynamic=True).
    if not (mask.dim() == 1 and mask.shape[0] == channels
            or mask.dim() == 2 and mask.shape[0] == n and mask.shape[1] == channels):
        raise ValueError(f"{name} must have shape ({channels},) or ({n}, {channels}), "
                         f"got {tuple(mask.shape)}")
    return mask


def _same_padding(x: Tensor, weight: Tensor, stride, dilation) -> tuple[Tensor, tuple[int, int]]:
    """padding='same' as F.conv2d: the total padding d * (k - 1), the odd element at the end."""
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
    total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    if total[0] % 2 == 0 and total[1] % 2 == 0:
        return x, (total[0] // 2, total[1] // 2)
    x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
    return x, (0, 0)


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
    weight_mask: Tensor | None = None,
) -> Tensor:
    r"""Convolution that skips the work its masks remove.

        out = F.conv2d(x * in_mask, weight * weight_mask, bias, stride, padding, dilation,
                       groups) * out_mask

    Args:
        x: (N, C_in, H, W) float tensor, any strides (channels_last is kept).
        weight, bias, stride, padding, dilation, groups: as ``F.conv2d`` (padding may be an
            int, a pair, ``"valid"`` or ``"same"``).
        in_mask: (C_in,) or (N, C_in), or None.
        out_mask: (C_out,) or (N, C_out), or None. (N, C) masks differ per sample (dynamic
            channel gating, see ``pyprune.nn.ChannelGate``).
        weight_mask: weight's shape, or None.

    A bool mask is structural: masked input channels take no part (inf or NaN in them do not
    leak), masked output channels are exactly 0 (bias included), and the mask gets no gradient.
    A float mask (x's dtype) multiplies and gets a gradient (soft masks, e.g. CHIPNet training).

    Channel masks shared by the batch run the dense engine (oneDNN, cuDNN) once on the kept
    channels: at 25% of the output channels kept the conv does a quarter of the work. Per-sample
    masks run each sample's kept channels (cpu) or an implicit-GEMM kernel that skips masked
    tiles (cuda, triton). A sparse bool weight mask runs a direct sparse convolution over the
    kept weights (cpu; inf or NaN in a sample sends that sample to the dense engine, so results
    match conv2d(x, weight * weight_mask) there too) or skips the empty 16x16 channel tiles of
    the weight (triton; such samples run every tile). groups > 1 applies the masks around the
    dense engine.

    Example:
        >>> keep = torch.zeros(128, dtype=torch.bool); keep[:32] = True
        >>> y = pyprune.masked_conv2d(x, conv.weight, conv.bias, padding=1, out_mask=keep)
    """
    _validate.tensor(x, "x", dim=4)
    _validate.tensor(weight, "weight", dim=4)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    groups = _validate.integer(groups, "groups")
    c_in, c_out = x.shape[1], weight.shape[0]
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"groups must be >= 1 and divide the input ({c_in}) and output "
                         f"({c_out}) channels, got {groups}")
    if c_out == 0:  # as F.conv2d, which has no output to give
        raise ValueError(f"weight must have at least one output channel, got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"weight of shape {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[1] * groups} input channels, x has {c_in}")
    if bias is not None:
        _validate.tensor(bias, "bias", dim=1)
        if bias.shape[0] != c_out or bias.dtype != x.dtype:
            raise ValueError(f"bias must have shape ({c_out},) and dtype {x.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    # Dilation along a kernel dimension of size 1 changes nothing; normalizing it to 1 also
    # avoids a crash of torch 2.13's CPU convolution (oneDNN) with a dilated 1x1 kernel on
    # grouped channels_last input (e.g. x (1, 4, 5, 1), groups 2, stride 2, padding 1, bias).
    dilation = tuple(1 if weight.shape[2 + i] == 1 else dilation[i] for i in range(2))
    in_mask = _check_mask(in_mask, "in_mask", c_in, x)
    out_mask = _check_mask(out_mask, "out_mask", c_out, x)
    if weight_mask is not None:
        if not isinstance(weight_mask, Tensor):
            raise TypeError(f"weight_mask must be a torch.Tensor or None, got "
                            f"{type(weight_mask).__name__}")
        if weight_mask.dtype not in (torch.bool, x.dtype):
            raise TypeError(f"weight_mask must be bool or x's dtype {x.dtype}, got "
                            f"{weight_mask.dtype}")
        if weight_mask.shape != weight.shape:
            raise ValueError(f"weight_mask must have weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(weight_mask.shape)}")
    _validate.same_device(x=x, weight=weight, bias=bias, in_mask=in_mask, out_mask=out_mask,
                          weight_mask=weight_mask)
    if isinstance(padding, str):
        padding = _validate.choice(padding, "padding", ("valid", "same"))
        if padding == "same":
            x, padding = _same_padding(x, weight, stride, dilation)
        else:
            padding = (0, 0)
    else:
        padding = _pair(padding, "padding", 0)
    for i in range(2):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < span:
            raise ValueError(f"the input's spatial size {tuple(x.shape[2:])} with padding "
                             f"{padding} is smaller than the dilated kernel ({span} in dim {2 + i})")

    backend = _backend.select("masked_conv2d", x)
    # Without input channels the output is the bias (the reference pads a zero channel; the
    # kernels would index channels that are not there).
    if backend == "reference" or c_in == 0:
        return reference.masked_conv2d(x, weight, bias, stride, padding, dilation, groups,
                                       in_mask, out_mask, weight_mask)

    # Float channel masks shared by the batch fold into the weight and bias; per-sample ones
    # multiply x or the output. Bool channel masks stay for the kernels to skip. A bool weight
    # mask alone goes to the CPU's sparse convolution (which runs the dense engine where the
    # mask keeps too much to pay); otherwise it folds into the weight.
    def soft(m: Optional[Tensor], static: bool) -> Optional[Tensor]:
        return m if _soft(m) and (m.dim() == 1) == static else None

    scale_in, scale_out = soft(in_mask, False), soft(out_mask, False)
    soft_in, soft_out = soft(in_mask, True), soft(out_mask, True)
    if (soft_in is not None and soft_in.requires_grad and torch.is_grad_enabled()
            and _leaves_unread_input(x, weight, stride, padding, dilation)):
        # A shared float in_mask's gradient is sum(grad_u * x) over every input position, as
        # the reference's x * in_mask gives it: an inf or NaN of x where no output reads makes
        # it NaN (0 * inf). Folded into the weight it would see the read positions only, so
        # such a geometry scales x instead.
        scale_in, soft_in = soft_in.view(1, -1).expand(x.shape[0], -1), None
    in_mask = None if _soft(in_mask) else in_mask
    out_mask = None if _soft(out_mask) else out_mask
    sparse = (backend in _SPARSE_OPS and groups == 1 and in_mask is None and out_mask is None
              and weight_mask is not None and weight_mask.dtype == torch.bool)
    weight, bias = fold_static_masks(weight, bias, groups, soft_in, soft_out,
                                     None if sparse else weight_mask)
    if ((scale_in is not None or scale_out is not None) and backend in _SCALED_OPS
            and groups == 1 and not sparse):
        # The CUDA and Triton kernels scale x's channels as they load them and the output in
        # their epilogue: no scaled copy of x (the backward forms it for the weight gradient
        # only), no second pass over the output; the unscaled output is stored too only where
        # the out_mask's gradient will be asked for.
        raw = scale_out is not None and torch.is_grad_enabled() and scale_out.requires_grad
        return _SCALED_CALL[backend](
            x, weight, bias, stride, padding, dilation,
            scale_in if scale_in is not None else in_mask,
            scale_out if scale_out is not None else out_mask, raw)[0]
    if scale_in is not None:
        x = x * scale_in[:, :, None, None]
    if sparse:
        y = _SPARSE_CALL[_SPARSE_OPS[backend][0]](x, weight, weight_mask, bias, stride, padding,
                                                  dilation)
    elif in_mask is None and out_mask is None and backend in ("cpu", "cuda"):
        # Nothing structural left: the dense engine itself (oneDNN / cuDNN), without the op's
        # dispatch (measured 2-4% of an 11 ms convolution here).
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    else:
        y = _CALL[_OPS[backend][0]](x, weight, bias, stride, padding, dilation, groups, in_mask,
                                    out_mask)
    if scale_out is not None:
        y = y * scale_out[:, :, None, None]
    return y
