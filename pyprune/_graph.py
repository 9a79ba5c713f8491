"""Channel flow through a model's graph (torch.fx), for compact() and budget_loss().

For every tensor (fx node) with a channel dimension (dim 1 of (N, C, ...)):

* alive: the channels that can be non-zero, forward from the inputs (a conv's bias makes all of
  its outputs alive; a mask keeps only its channels; an addition keeps the union, a product the
  intersection; a concatenation concatenates);
* needed: the channels the model's output depends on, backward from the output (a mask passes
  on only its channels; a conv needs every input channel its masks do not drop);
* groups: channels that ops join must be kept or removed together. Channel-wise ops (BatchNorm,
  activations, pooling, masks, residual additions, products with a per-channel scale as in
  squeeze-and-excitation, a flatten of (N, C, 1, 1) and its inverse) join channel c of their
  inputs and output; a concatenation along the channels joins channel c of its i-th input with
  channel offset_i + c of its output. Groups are of single channels, so a tensor that feeds
  several concatenations (DenseNet) ties each of its channels to its copy in every one. A group
  that touches the model's input or output, or an op this module does not know, is frozen: it
  keeps every channel.

The vectors are float tensors (1 = alive / needed), combined with * (and) and maximum (or), so
the same pass runs on hard masks (compact) and on CHIPNet's soft masks (budget, differentiable).
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .nn import CAS, KWTA, SAP, ChannelGate, ChipMask, GaussianNoise, MagnitudePruned, MaskedConv2d
from .nn import NoisyWeight

_PYPRUNE_MODULES = (KWTA, SAP, GaussianNoise, CAS, MaskedConv2d, ChannelGate, ChipMask,
                    NoisyWeight, MagnitudePruned)

# Channel-wise ops with f(0) = 0: a zero channel stays zero, and each channel only sees itself.
# (Hardtanh and ReLU6, F.hardtanh: zero to zero only where the range holds 0, _hardtanh_kind.)
_ZERO_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish,
                 nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ZERO_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.leaky_relu,
                   F.hardswish, F.mish, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout}
_ZERO_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}
# Channel-wise ops that may turn a zero channel non-zero. (GaussianNoise is not one of them
# here: its draws depend on its input's shape, so removing channels would change the noise the
# kept ones get; as an unknown op it keeps its channels.)
_CHANNEL_MODULES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.Sigmoid, nn.Hardsigmoid)
_CHANNEL_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_CHANNEL_METHODS = {"sigmoid", "sigmoid_"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_CAT = {torch.cat, torch.concat}
_RESHAPE_METHODS = ("flatten", "view", "reshape", "squeeze", "unsqueeze")

LeafModules = Iterable[Union[str, type]]


def _hardtanh_kind(lo, hi) -> str:
    """A hardtanh over [lo, hi] maps a zero channel to zero ("zero") only where the range holds
    0; a bound that is not a number (an fx value) counts as not ("other")."""
    numbers = isinstance(lo, (int, float)) and isinstance(hi, (int, float))
    return "zero" if numbers and lo <= 0 <= hi else "other"


class Tracer(fx.Tracer):
    """fx tracer that keeps pyprune's modules whole (their forward branches on their state),
    and the modules the caller names (qualified names or types). It remembers the innermost
    module whose forward failed, so that the error can name it."""

    def __init__(self, leaf_modules: LeafModules = ()) -> None:
        super().__init__()
        leaf_modules = list(leaf_modules)
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failed: Optional[tuple[str, nn.Module]] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _PYPRUNE_MODULES + self.leaf_types) or qualname in self.leaf_names
                or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = (self.path_of_module(m), m)
            raise


def trace(model: nn.Module, example_input: Tensor,
          leaf_modules: LeafModules = ()) -> fx.GraphModule:
    """The model's graph, with every node's output shape from a run on example_input.

    leaf_modules: qualified names or types of submodules to keep whole (not traced into); their
    channels are kept as they are. A model that torch.fx cannot trace (data-dependent Python
    control flow, calls that check their arguments' types) raises a ValueError that names the
    innermost module whose forward failed."""
    leaf_modules = list(leaf_modules)
    names = dict(model.named_modules())
    for m in leaf_modules:
        if isinstance(m, str):
            if m not in names or m == "":
                raise ValueError(f"leaf_modules: {m!r} is not a submodule of the model")
        elif not (isinstance(m, type) and issubclass(m, nn.Module)):
            raise TypeError(f"leaf_modules must hold qualified module names or nn.Module "
                            f"types, got {m!r}")
    tracer = Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx cannot trace data-dependent Python control flow
        if tracer.failed is None:
            where = ("in the model's own forward, which cannot be a leaf: move the part that "
                     "fx cannot trace into a submodule and pass its name in leaf_modules")
        else:
            name, m = tracer.failed
            where = (f"in module {name!r} ({type(m).__name__}): pass leaf_modules=[{name!r}] "
                     f"(or [{type(m).__name__}]) to keep it whole; its channels are then kept")
        raise ValueError(f"cannot trace the model with torch.fx ({type(err).__name__}: {err}) "
                         f"{where}") from err
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    gm.train(was_training)
    return gm


def _shape(node: fx.Node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def channels(node: fx.Node) -> Optional[int]:
    shape = _shape(node)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _static(mask: Optional[Tensor]) -> bool:
    return mask is None or mask.dim() == 1


def conv_kind(m: nn.Module) -> str:
    """'conv' (groups 1, static masks), 'depthwise' (one channel per group, static masks) or
    'other' for a Conv2d / MaskedConv2d."""
    if isinstance(m, MaskedConv2d) and not (_static(m.in_mask) and _static(m.out_mask)):
        return "other"
    if m.groups == 1:
        return "conv"
    if m.groups == m.in_channels == m.out_channels:
        return "depthwise"
    return "other"


def kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """conv, depthwise, linear, mask, zero (channel-wise, f(0)=0), channel (channel-wise),
    add, mul (channel-wise product, e.g. by a per-channel scale), cat (along the channels),
    flatten (a reshape that keeps the channels), shape (reads x.shape), input, output or
    other."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d):
            return conv_kind(m)
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, ChipMask):
            return "mask"
        if isinstance(m, nn.Hardtanh):  # (ReLU6 too)
            return _hardtanh_kind(m.min_val, m.max_val)
        if isinstance(m, _ZERO_MODULES) or (isinstance(m, KWTA) and m.mode == "channel"):
            return "zero"
        if isinstance(m, _CHANNEL_MODULES):
            return "channel"
        if isinstance(m, nn.Flatten) and _flattens_channels(node):
            return "flatten"
        return "other"
    if _reads_shape(node):
        return "shape"
    if node.op == "call_function":
        if node.target is F.hardtanh:  # hardtanh(input, min_val=-1.0, max_val=1.0)
            args = node.args
            return _hardtanh_kind(node.kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                                  node.kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
        if node.target in _ZERO_FUNCTIONS:
            return "zero"
        if node.target in _CHANNEL_FUNCTIONS:
            return "channel"
        if node.target in _ADD and _two_tensors(node):
            return "add"
        if node.target in _MUL:
            return _mul_kind(node)
        if node.target in _CAT and cat_parts(node) is not None:
            return "cat"
        if node.target is torch.flatten and _flattens_channels(node):
            return "flatten"
        return "other"
    if node.op == "call_method":
        if node.target in _ZERO_METHODS:
            return "zero"
        if node.target in _CHANNEL_METHODS:
            return "channel"
        if node.target in ("add", "add_") and _two_tensors(node):
            return "add"
        if node.target in ("mul", "mul_"):
            return _mul_kind(node)
        if node.target in _RESHAPE_METHODS and _flattens_channels(node):
            return "flatten"
        if node.target == "mean" and _spatial_mean(node):
            return "zero"
        return "other"
    return "other"


def _reads_shape(node: fx.Node) -> bool:
    """x.shape, x.size(), x.dim() and the like: they read the tensor's (compacted) shape at run
    time, so they hold no channel to keep."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.op == "call_method" and node.target in ("size", "dim")


def _two_tensors(node: fx.Node) -> bool:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    return len(args) == 2 and len(node.args) == 2 and _shape(args[0]) == _shape(args[1]) == _shape(node)


def _mul_kind(node: fx.Node) -> str:
    """zero for a tensor times a number; mul for two tensors whose product is channel-wise
    (each broadcasts over the output's other dims, as an SE scale (N, C, 1, 1)); else other."""
    if len(node.args) != 2 or node.kwargs:
        return "other"
    out = _shape(node)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if out is None or len(out) < 2:
        return "other"
    if len(tensors) == 1:
        number = node.args[1] if tensors[0] is node.args[0] else node.args[0]
        return "zero" if isinstance(number, (int, float)) and _shape(tensors[0]) == out else "other"
    for t in tensors:
        s = _shape(t)
        if s is None or len(s) != len(out) or s[1] != out[1] or any(
                s[i] not in (1, out[i]) for i in range(len(out)) if i != 1):
            return "other"
    return "mul"


def cat_parts(node: fx.Node) -> Optional[list[tuple[fx.Node, int]]]:
    """(input, channel offset in the output) of a concatenation along dim 1, else None."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = _shape(node)
    if not isinstance(tensors, (list, tuple)) or out is None or len(out) < 2:
        return None
    if not isinstance(dim, int) or dim % len(out) != 1:
        return None
    parts, offset = [], 0
    for t in tensors:
        s = _shape(t) if isinstance(t, fx.Node) else None
        if s is None or len(s) != len(out):
            return None
        parts.append((t, offset))
        offset += int(s[1])
    return parts if offset == out[1] else None


def _flattens_channels(node: fx.Node) -> bool:
    """A reshape between (N, C, 1, 1) and (N, C) (either way) that computes its sizes from the
    tensor (a literal channel count would no longer hold once channels are removed)."""
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None:
        return False
    if len(src) == 4 and src[2] * src[3] == 1 and tuple(out) == tuple(src[:2]):
        pass
    elif len(src) == 2 and len(out) == 4 and tuple(out) == (src[0], src[1], 1, 1):
        pass
    else:
        return False
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else node.args[1:]
        return len(sizes) >= 2 and not (isinstance(sizes[1], int) and sizes[1] != -1)
    return True


def _spatial_mean(node: fx.Node) -> bool:
    src, out = _shape(node.args[0]), _shape(node)
    return (src is not None and out is not None and len(src) == 4
            and tuple(out[:2]) == tuple(src[:2]))


def inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def linear_channels(node: fx.Node) -> bool:
    """A Linear on (N, features) giving (N, out_features): its features are channels."""
    return len(node.args) == 1 and _linear_channels(node.args[0]) and _linear_channels(node)


@dataclass
class Flow:
    """alive / needed per node (float vectors over its channels) and the channels each node
    keeps, ``kept(node)``: the most any channel of its group is alive and needed (1 for a frozen
    group)."""

    gm: fx.GraphModule
    alive: dict[fx.Node, Tensor] = field(default_factory=dict)
    needed: dict[fx.Node, Tensor] = field(default_factory=dict)
    offset: dict[fx.Node, int] = field(default_factory=dict)
    label: Optional[Tensor] = None   # per channel of every node: its group
    keep: Optional[Tensor] = None    # per group

    def kept(self, node: fx.Node) -> Tensor:
        start = self.offset[node]
        return self.keep[self.label[start:start + len(self.alive[node])]]


@dataclass
class _Groups:
    kinds: tuple
    offset: dict
    label: Tensor
    frozen: Tensor
    copies: dict = field(default_factory=dict)

    def on(self, device: Optional[torch.device]) -> tuple[Tensor, Tensor]:
        """(label, frozen) on ``device``, copied there once: a later call (a budget loss every
        step, a CUDA graph capture of it) makes no host-to-device copy."""
        if device is None or torch.device(device).type == "cpu":
            return self.label, self.frozen
        key = str(device)
        if key not in self.copies:
            self.copies[key] = (self.label.to(device), self.frozen.to(device))
        return self.copies[key]


_GROUPS: "weakref.WeakKeyDictionary[fx.GraphModule, _Groups]" = weakref.WeakKeyDictionary()


def _groups(gm: fx.GraphModule, nodes: list[fx.Node], kinds: dict, modules: dict,
            sizes: dict[fx.Node, int]) -> _Groups:
    """The channel groups (connected components of the joins) and the frozen ones: they depend
    on the graph alone, so budget_loss, which analyses one graph every step, builds them once."""
    key = tuple(kinds[n] for n in nodes)
    cached = _GROUPS.get(gm)
    if cached is not None and cached.kinds == key:
        return cached
    offset, total = {}, 0
    for n in nodes:
        if n in sizes:
            offset[n] = total
            total += sizes[n]
    left, right = [], []

    def join(a: fx.Node, b: fx.Node, at: int = 0) -> None:
        """Channel c of b is channel at + c of a."""
        if a in offset and b in offset:
            c = sizes[b]
            left.append(torch.arange(offset[a] + at, offset[a] + at + c))
            right.append(torch.arange(offset[b], offset[b] + c))

    frozen = torch.zeros(total, dtype=torch.bool)

    def freeze(n: fx.Node) -> None:
        if n in offset:
            frozen[offset[n]:offset[n] + sizes[n]] = True

    for n in nodes:
        k = kinds[n]
        if k in ("zero", "channel", "flatten", "mask", "depthwise"):
            join(n, inputs(n)[0])
        elif k in ("add", "mul"):
            for s in inputs(n):
                join(n, s)
        elif k == "cat":
            for s, at in cat_parts(n):
                join(n, s, at)
        elif k == "input":
            freeze(n)
        elif k == "linear" and not linear_channels(n):
            for s in inputs(n):
                freeze(s)
            freeze(n)
        elif k in ("output", "other"):
            for s in inputs(n):
                freeze(s)
            freeze(n)
    label = torch.arange(total)
    if left:
        a, b = torch.cat(left), torch.cat(right)
        while True:  # connected components: hook each edge to its smaller label, then jump
            low = torch.minimum(label[a], label[b])
            new = label.scatter_reduce(0, a, low, "amin").scatter_reduce(0, b, low, "amin")
            new = new[new]
            if torch.equal(new, label):
                break
            label = new
    groups_frozen = torch.zeros(total, dtype=torch.bool)
    groups_frozen[label[frozen]] = True
    groups = _Groups(key, offset, label, groups_frozen)
    _GROUPS[gm] = groups
    return groups


def analyse(gm: fx.GraphModule, mask_of: Callable[[nn.Module], Tensor],
            like: Optional[Tensor] = None) -> Flow:
    """Channel flow of a traced, shape-propagated graph. mask_of(chip_mask) gives a ChipMask's
    mask as a vector (0/1 for hard masks, z for soft ones); ``like`` sets the vectors' dtype and
    device (float32 on the CPU by default)."""
    modules = dict(gm.named_modules())
    opts = dict(dtype=like.dtype, device=like.device) if like is not None else dict(dtype=torch.float32)
    flow = Flow(gm)
    nodes = list(gm.graph.nodes)
    kinds = {n: kind(n, modules) for n in nodes}

    def ones(n: fx.Node) -> Optional[Tensor]:
        c = channels(n)
        return None if c is None else torch.ones(c, **opts)

    def vec(mask: Tensor) -> Tensor:
        return mask.to(**opts)

    # Forward: alive.
    for n in nodes:
        k = kinds[n]
        src = inputs(n)
        a = flow.alive.get(src[0]) if src else None
        if k in ("zero", "flatten") and a is not None:
            flow.alive[n] = a
        elif k == "mask" and a is not None:
            flow.alive[n] = a * vec(mask_of(modules[n.target]))
        elif k == "add":
            flow.alive[n] = torch.maximum(flow.alive[src[0]], flow.alive[src[1]])
        elif k == "mul":
            flow.alive[n] = flow.alive[src[0]] * flow.alive[src[-1]]
        elif k == "cat":
            flow.alive[n] = torch.cat([flow.alive[s] for s, _ in cat_parts(n)])
        elif k in ("conv", "depthwise"):
            m = modules[n.target]
            out = ones(n)
            if k == "depthwise" and m.bias is None and a is not None:
                out = a.clone()
            if isinstance(m, MaskedConv2d) and m.out_mask is not None:
                out = out * (m.out_mask != 0).to(**opts)
            if k == "depthwise" and isinstance(m, MaskedConv2d) and m.in_mask is not None and m.bias is None:
                out = out * (m.in_mask != 0).to(**opts)
            flow.alive[n] = out
        elif k != "output":
            v = ones(n)
            if v is not None:
                flow.alive[n] = v

    # Backward: needed.
    for n in reversed(nodes):
        if n not in flow.alive:
            continue
        total = torch.zeros_like(flow.alive[n])
        for u in n.users:
            k = kinds[u]
            if k in ("zero", "channel", "flatten", "add") and u in flow.needed:
                need = flow.needed[u]
            elif k == "mul" and u in flow.needed:  # not needed where the other factor is 0
                a, b = inputs(u)[0], inputs(u)[-1]
                need = flow.needed[u] * flow.alive[b if a is n else a]
            elif k == "cat" and u in flow.needed:
                size = len(total)
                need = torch.zeros_like(total)
                for s, at in cat_parts(u):
                    if s is n:
                        need = torch.maximum(need, flow.needed[u][at:at + size])
            elif k == "mask" and u in flow.needed:
                need = flow.needed[u] * vec(mask_of(modules[u.target]))
            elif k in ("conv", "depthwise") and u.args[0] is n:
                m = modules[u.target]
                need = torch.ones_like(total) if k == "conv" else flow.needed.get(u, torch.ones_like(total))
                if isinstance(m, MaskedConv2d) and m.in_mask is not None:
                    need = need * (m.in_mask != 0).to(**opts)
            else:
                need = torch.ones_like(total)
            total = torch.maximum(total, need)
        flow.needed[n] = total

    # Groups: the most any of their channels is alive and needed, 1 if frozen.
    sizes = {n: len(v) for n, v in flow.alive.items()}
    groups = _groups(gm, nodes, kinds, modules, sizes)
    label, frozen = groups.on(opts.get("device"))
    flow.offset, flow.label = groups.offset, label
    members = [flow.alive[n] * flow.needed[n] for n in nodes if n in groups.offset]
    if members:
        value = torch.cat(members)
        keep = torch.zeros(len(value), **opts).scatter_reduce(0, flow.label, value, "amax",
                                                              include_self=False)
        flow.keep = torch.where(frozen, torch.ones_like(keep), keep)
    else:
        flow.keep = torch.zeros(0, **opts)
    return flow


def _linear_channels(node: fx.Node) -> bool:
    shape = _shape(node)
    return shape is not None and len(shape) == 2
