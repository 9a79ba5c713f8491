"""Channel flow through a model's graph (torch.fx), for compact() and budget_loss().

For every tensor (fx node) with a channel dimension (dim 1 of (N, C, ...)):

* alive: the channels that can be non-zero, forward from the inputs (a conv's bias makes all of
  its outputs alive; a mask keeps only its channels; an addition keeps the union);
* needed: the channels the model's output depends on, backward from the output (a mask passes
  on only its channels; a conv needs every input channel its masks do not drop);
* group: tensors joined by channel-wise ops (BatchNorm, activations, pooling, masks, residual
  additions, a flatten of (N, C, 1, 1)) index the same channels, so they must keep the same
  ones. A group that touches the model's input or output, or an op this module does not know,
  is frozen: it keeps every channel.

The vectors are float tensors (1 = alive / needed), combined with * (and) and maximum (or), so
the same pass runs on hard masks (compact) and on CHIPNet's soft masks (budget, differentiable).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .nn import CAS, KWTA, SAP, ChannelGate, ChipMask, GaussianNoise, MagnitudePruned, MaskedConv2d
from .nn import NoisyWeight

_PYPRUNE_MODULES = (KWTA, SAP, GaussianNoise, CAS, MaskedConv2d, ChannelGate, ChipMask,
                    NoisyWeight, MagnitudePruned)

# Channel-wise ops with f(0) = 0: a zero channel stays zero, and each channel only sees itself.
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh,
                 nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ZERO_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.leaky_relu,
                   F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                   F.dropout}
_ZERO_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}
# Channel-wise ops that may turn a zero channel non-zero.
_CHANNEL_MODULES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.Sigmoid, GaussianNoise)
_ADD = {operator.add, operator.iadd, torch.add}


class Tracer(fx.Tracer):
    """fx tracer that keeps pyprune's modules whole (their forward branches on their state)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _PYPRUNE_MODULES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example_input: Tensor) -> fx.GraphModule:
    """The model's graph, with every node's output shape from a run on example_input."""
    try:
        graph = Tracer().trace(model)
    except Exception as err:  # fx cannot trace data-dependent Python control flow
        raise ValueError(f"cannot trace the model with torch.fx: {err}") from err
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
    add, flatten, input, output or other."""
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
        if isinstance(m, _ZERO_MODULES) or (isinstance(m, KWTA) and m.mode == "channel"):
            return "zero"
        if isinstance(m, _CHANNEL_MODULES):
            return "channel"
        if isinstance(m, nn.Flatten) and _flattens_channels(node):
            return "flatten"
        return "other"
    if node.op == "call_function":
        if node.target in _ZERO_FUNCTIONS:
            return "zero"
        if node.target in _ADD and _two_tensors(node):
            return "add"
        if node.target is torch.flatten and _flattens_channels(node):
            return "flatten"
        return "other"
    if node.op == "call_method":
        if node.target in _ZERO_METHODS:
            return "zero"
        if node.target in ("add", "add_") and _two_tensors(node):
            return "add"
        if node.target in ("flatten", "view", "reshape", "squeeze") and _flattens_channels(node):
            return "flatten"
        if node.target == "mean" and _spatial_mean(node):
            return "zero"
        return "other"
    return "other"


def _two_tensors(node: fx.Node) -> bool:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    return len(args) == 2 and len(node.args) == 2 and _shape(args[0]) == _shape(args[1]) == _shape(node)


def _flattens_channels(node: fx.Node) -> bool:
    src, out = _shape(node.args[0]), _shape(node)
    return (src is not None and out is not None and len(src) == 4 and src[2] * src[3] == 1
            and tuple(out) == tuple(src[:2]))


def _spatial_mean(node: fx.Node) -> bool:
    src, out = _shape(node.args[0]), _shape(node)
    return (src is not None and out is not None and len(src) == 4
            and tuple(out[:2]) == tuple(src[:2]))


def inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


@dataclass
class Flow:
    """alive / needed per node (float vectors over its channels), the group of every node
    and the channels each group keeps (``keep``, a float vector)."""

    gm: fx.GraphModule
    alive: dict[fx.Node, Tensor] = field(default_factory=dict)
    needed: dict[fx.Node, Tensor] = field(default_factory=dict)
    group: dict[fx.Node, fx.Node] = field(default_factory=dict)
    frozen: set = field(default_factory=set)
    keep: dict[fx.Node, Tensor] = field(default_factory=dict)

    def root(self, node: fx.Node) -> fx.Node:
        while self.group[node] is not node:
            self.group[node] = self.group[self.group[node]]
            node = self.group[node]
        return node

    def kept(self, node: fx.Node) -> Tensor:
        return self.keep[self.root(node)]


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

    # Groups and frozen groups.
    for n in nodes:
        flow.group[n] = n
    for n in nodes:
        k = kinds[n]
        if k in ("zero", "channel", "flatten", "mask", "add", "depthwise"):
            for s in inputs(n)[: 2 if k == "add" else 1]:
                if s in flow.alive and n in flow.alive:
                    ra, rb = flow.root(s), flow.root(n)
                    if ra is not rb:
                        flow.group[ra] = rb
    for n in nodes:
        k = kinds[n]
        if k == "input":
            flow.frozen.add(flow.root(n))
        elif k in ("output", "other", "linear"):
            for s in inputs(n):
                if s in flow.alive and not (k == "linear" and _linear_channels(s)):
                    flow.frozen.add(flow.root(s))
            if k == "other" and n in flow.alive:
                flow.frozen.add(flow.root(n))
        if k == "output":
            for s in inputs(n):
                if s in flow.alive:
                    flow.frozen.add(flow.root(s))

    for n in nodes:
        if n not in flow.alive:
            continue
        r = flow.root(n)
        v = flow.alive[n] * flow.needed[n]
        flow.keep[r] = v if r not in flow.keep else torch.maximum(flow.keep[r], v)
    for r in flow.frozen:
        if r in flow.keep:
            flow.keep[r] = torch.ones_like(flow.keep[r])
    return flow


def _linear_channels(node: fx.Node) -> bool:
    shape = _shape(node)
    return shape is not None and len(shape) == 2
