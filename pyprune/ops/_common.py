"""Registration and layout helpers shared by every op and backend."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

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
    allocated with empty_like(view) then keeps x's memory format (see ``restored``).
    """
    return cached_view(x, inner_start, _group_layout)


def _group_layout(x: Tensor, inner_start: int) -> tuple[list[int] | None, tuple, bool]:
    """group_view's layout for ``cached_view``: the group dims in memory order, or a copy."""
    n = x.shape[0]
    c = x.shape[1] if inner_start == 2 else 1
    rows = (n, c, math.prod(x.shape[inner_start:]))
    order = insertion_order(list(range(inner_start, x.dim())), x.stride)
    if mergeable([x.shape[d] for d in order], [x.stride(d) for d in order]):
        return list(range(inner_start)) + order, rows, False
    return None, rows, True


class _Layout(NamedTuple):
    """How ``cached_view`` views x, a function of x's sizes and strides."""

    perm: tuple[int, ...] | None  # x.permute(perm) first; None: x as it is
    rows: tuple  # the view's shape
    copy: bool  # by reshape (it copies where the dims cannot merge), else by view
    shape: tuple  # x's shape permuted into the view's order
    inverse: list[int] | None  # the permutation back to x, None for none


def _layout(x: Tensor, perm: list[int] | None, rows, copy: bool) -> _Layout:
    if perm is None or list(perm) == sorted(perm):
        return _Layout(None, tuple(rows), copy, tuple(x.shape), None)
    return _Layout(tuple(perm), tuple(rows), copy, tuple(x.shape[d] for d in perm),
                   [perm.index(d) for d in range(x.dim())])


_LAYOUTS: dict[tuple, _Layout] = {}
_LAYOUT_CACHE_SIZE = 512


def cached_view(x: Tensor, kind: int, layout_of: Callable[[Tensor, int], tuple]):
    """x viewed as ``layout_of(x, kind)`` -> (perm or None, rows, copy) says: x.permute(perm)
    as shape rows, by reshape where ``copy``, else by view; and the map of a result shaped like
    the view back to x (``restored``). In eager mode the layout is computed once per (sizes,
    strides, kind): the Python that orders and checks x's dims runs once per layout, not once
    per call. While dynamo traces (sizes may be symbolic) and for symbolic sizes outside it
    (make_fx, export: not hashable), every call computes it."""
    layout = key = None
    if not torch.compiler.is_compiling():
        try:
            key = (x.shape, x.stride(), kind, layout_of)
            layout = _LAYOUTS.get(key)
        except TypeError:
            key = None
    if layout is None:
        layout = _layout(x, *layout_of(x, kind))
        if key is not None:
            if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
    perm, rows, copy, shape, inverse = layout
    if perm is not None:
        x = x.permute(perm)
    view = x.reshape(rows) if copy else x.view(rows)
    return view, lambda out: restored(out, shape, inverse)


def restored(out: Tensor, shape, inverse: list[int] | None = None) -> Tensor:
    """A kernel's fresh result ``out``, laid out like an op's memory-order view of x, as x's
    shape and strides (``shape``: x's shape permuted into memory order, ``inverse``: the
    permutation back, None for none), without a copy and not as a view of ``out``.

    A returned view (``_base`` set) makes FSDP2 warn that the module returned one: an in-place
    op on it would drop FSDP2's pre-backward hook. The final alias is aten._unsafe_view, which
    autograd takes for a new tensor (gradient grad.reshape), as reshape does for a copy it made;
    ``out`` is a temporary that nothing else holds or saves. The _unsafe_view (an operator
    call, a few microseconds more than Tensor.view) is paid only where the result requires grad:
    a view that autograd does not track is harmless.
    """
    if inverse is None or inverse == sorted(inverse):
        return _UNSAFE_VIEW(out, shape) if out.requires_grad else out.view(shape)
    view = out.view(shape).permute(inverse)
    return _UNSAFE_VIEW(view, view.shape) if view.requires_grad else view


_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default  # the overload itself: no lookup per call


def insertion_order(dims: list[int], key: Callable[[int], object]) -> list[int]:
    """dims sorted by descending key, stable. A plain loop of comparisons rather than sorted():
    dynamo traces it when the keys are symbolic (strides under dynamic shapes)."""
    order: list[int] = []
    for d in dims:
        i = len(order)
        while i > 0 and key(order[i - 1]) < key(d):
            i -= 1
        order.insert(i, d)
    return order


def save(ctx, *tensors: Tensor | None) -> None:
    """Save tensors for backward and for the forward-mode (jvp) rule alike."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def _transforming() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) or forward-mode AD is active."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0)


_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd
_ANY_REQUIRES_GRAD = torch._C._any_requires_grad
_PLAIN = (Tensor, torch.nn.Parameter)  # tensor types a launcher may be handed directly


def _launcher(op) -> Callable | None:
    """The Python function of a torch.library.custom_op with one implementation for every
    device (the Triton launchers), or None (a C++ op, or torch's internals changed)."""
    opdef = torch._library.custom_ops._maybe_get_opdef(op)
    if opdef is None or list(getattr(opdef, "_backend_fns", {})) != [None]:
        return None
    return getattr(opdef, "_init_fn", None)


def eager_kernel(op) -> Callable:
    """``op`` for eager calls that record nothing: called below autograd (no autograd kernel,
    which for a custom_op or torch.library autograd is Python), and for a custom_op (the Triton
    launchers) its Python function itself where the dispatcher has nothing to add: no torch
    dispatch or torch function mode active and every tensor argument a plain Tensor. That skips
    the custom_op's dispatch (boxing into Python and its check that no output aliases an
    input), ~11 us a call on the dev VM. Modes, tensor subclasses (fake, functional, DTensor)
    and torch.func transforms (functorch wrappers, forward-mode AD: the op called as it is)
    keep the dispatcher."""
    launcher = _launcher(op)

    def run(*args):
        if _transforming():
            return op(*args)
        if (launcher is not None and not torch._C._len_torch_dispatch_stack()
                and not torch._C._is_torch_function_mode_enabled()
                and all(type(a) in _PLAIN for a in args if isinstance(a, Tensor))):
            return launcher(*args)
        with _BELOW_AUTOGRAD():
            return op(*args)

    return run


def register(
    op,
    setup_context: Callable,
    backward: Callable,
    jvp: Callable | None = None,
) -> Callable:
    """Autograd for the compiled op ``op`` (torch.ops.pyprune.*), and the entry point that calls
    it. Three paths, one ``setup_context`` and ``backward``:

    * while dynamo traces: the op itself, through its torch.library autograd (register_autograd
      below), which AOTAutograd differentiates (dynamo cannot trace a custom jvp);
    * under a torch.func transform or forward-mode AD: an autograd.Function with a forward-mode
      rule ``jvp(ctx, *tangents)`` (None: forward-mode AD raises) and a vmap rule generated from
      the op's own (see ``register_vmap``), so torch.func.grad / jacrev / jacfwd / jvp / vmap
      and torch.autograd.forward_ad see through it;
    * eager otherwise: the kernel called as ``eager_kernel`` does (below autograd, a Triton
      launcher directly) when nothing is to be recorded, else a lean autograd.Function whose
      forward calls it so, entered through the C++ apply. The op's own autograd kernel is Python (torch.library's autograd_impl: another
      Function.apply, the schema's defaults refilled, a redispatch), and Function.apply binds
      the arguments to forward's signature (inspect.signature) each call: the lean path skips
      both (on the dev VM, k-WTA on a tiny tensor: 30 -> 16 us a recorded call, 16 -> 10 us an
      unrecorded one; benchmarks/host_overhead.py measures the whole calls).
    """
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    name = "Function_" + str(op).replace("pyprune.", "").replace(".", "_")
    attrs = {
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    }
    if jvp is not None:
        attrs["jvp"] = staticmethod(jvp)
    function = type(name, (torch.autograd.Function,), attrs)

    kernel = eager_kernel(op)

    def lean_forward(ctx, *args):
        output = kernel(*args)
        setup_context(ctx, args, output)
        return output

    lean = type(name + "_eager", (torch.autograd.Function,), {
        "forward": staticmethod(lean_forward),
        "backward": staticmethod(backward),
    })
    # torch._C._FunctionBase.apply: Function.apply less the argument binding and the unwrapping
    # of dead functorch wrappers, which matter under transforms only (not on this path).
    lean_apply = super(torch.autograd.Function, lean).apply

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if _transforming():
            return function.apply(*args)
        if torch.is_grad_enabled() and _ANY_REQUIRES_GRAD(*args):
            return lean_apply(*args)
        return kernel(*args)

    return call


_TENSOR = object()  # marks where register_linear's saved tensors go back into the arguments


def register_linear(op) -> Callable:
    """Autograd for an op linear in its first input and locally constant in the rest (kwta's
    and SAP's gradient ops, grad * mask and grad * kept / q): its derivative
    and its tangent are the op itself applied to the incoming gradient or tangent, so double
    backward (gradient penalties, Hessian-vector products) and jvp cost one more call.
    Returns the entry point (as ``register``)."""

    def setup_context(ctx, inputs, output):
        rest = inputs[1:]
        save(ctx, *(a for a in rest if isinstance(a, Tensor)))
        ctx.rest = [_TENSOR if isinstance(a, Tensor) else a for a in rest]

    def arguments(ctx) -> list:
        tensors = iter(ctx.saved_tensors)
        return [next(tensors) if a is _TENSOR else a for a in ctx.rest]

    def backward(ctx, grad):
        return (call(grad, *arguments(ctx)),) + (None,) * len(ctx.rest)

    def jvp(ctx, tangent, *unused):
        return call(tangent, *arguments(ctx))

    call = register(op, setup_context, backward, jvp)
    return call


def vjp(fn: Callable, primals: tuple[Tensor, ...], cotangents: tuple[Tensor, ...]) -> tuple:
    """Gradients of fn (plain differentiable torch ops) at primals for the cotangents, through
    torch.func.vjp: differentiable again and usable under torch.func transforms. The backward of
    ops whose kernels have no derivative of their own runs this when a graph of the gradient is
    being built (create_graph=True, torch.func.grad)."""
    _, pull = torch.func.vjp(fn, *primals)
    return pull(cotangents)


def _batched(arg, dim, size):
    return arg.movedim(dim, 0) if isinstance(dim, int) else arg.expand(size, *arg.shape)


def register_vmap(op, per_sample: tuple[int, ...] | Callable[[list], tuple[int, ...]] | None) -> None:
    """A vmap rule for op. ``per_sample``: the positions of the tensor arguments whose dim 0 is
    the op's own batch (its outputs all have it too), or a function of the arguments' logical
    ranks (None for non-tensors) giving them: vmap's batch folds into that dim and the kernel
    runs once. When another tensor argument is batched (a weight), or per_sample is None
    (random ops, whose seed gives each vmap entry its own or the same draws as vmap's
    randomness asks; ops whose outputs reduce over the batch), the op runs once per entry."""

    def loop(info, in_dims, *args):
        outs = [
            op(*(a.select(d, b) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
            for b in range(info.batch_size)
        ]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    def rule(info, in_dims, *args):
        positions = per_sample
        if callable(per_sample):
            positions = per_sample([
                a.dim() - isinstance(d, int) if isinstance(a, Tensor) else None
                for a, d in zip(args, in_dims)
            ])
        batched = [i for i, d in enumerate(in_dims) if isinstance(d, int)]
        if positions is None or any(i not in positions for i in batched):
            return loop(info, in_dims, *args)
        size = info.batch_size
        args = list(args)
        n = None
        for i in positions:
            if args[i] is not None:
                a = _batched(args[i], in_dims[i], size)
                n = a.shape[1]
                args[i] = a.flatten(0, 1)
        out = op(*args)
        if isinstance(out, tuple):
            return tuple(o.unflatten(0, (size, n)) for o in out), (0,) * len(out)
        return out.unflatten(0, (size, n)), 0

    torch.library.register_vmap(op, rule)
