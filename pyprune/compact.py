"""compact(): a smaller dense model without the channels that hard masks make exactly zero."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from . import _graph
from .nn import ChipMask, MaskedConv2d
from .ops.masked_conv import fold_static_masks


@dataclass(frozen=True)
class Counts:
    """Parameters and forward FLOPs per sample (2 per multiply-add of convs and linears)."""

    params: int
    flops: int


@dataclass(frozen=True)
class CompactReport:
    before: Counts
    after: Counts

    def __str__(self) -> str:
        return (f"params {self.before.params:,} -> {self.after.params:,} "
                f"({self.after.params / max(self.before.params, 1):.1%}), "
                f"FLOPs {self.before.flops:,} -> {self.after.flops:,} "
                f"({self.after.flops / max(self.before.flops, 1):.1%})")


def count(model: nn.Module, example_input: Tensor) -> Counts:
    """Parameters and per-sample forward FLOPs of model on example_input (convs and linears;
    the FLOPs of a masked convolution are those of the work its masks leave)."""
    flops = 0

    def hook(m, args, out):
        nonlocal flops
        if isinstance(m, nn.Conv2d):
            cin, cout = m.in_channels, m.out_channels
            if isinstance(m, MaskedConv2d):
                if m.in_mask is not None and m.in_mask.dtype == torch.bool:
                    cin = float(m.in_mask.float().sum(-1).mean())
                if m.out_mask is not None and m.out_mask.dtype == torch.bool:
                    cout = float(m.out_mask.float().sum(-1).mean())
            k = m.kernel_size[0] * m.kernel_size[1]
            if isinstance(m, MaskedConv2d) and m.weight_mask is not None and m.weight_mask.dtype == torch.bool:
                k *= float(m.weight_mask.float().mean())  # the kept share of the weights
            flops += int(2 * cin / m.groups * k * cout * out.shape[2] * out.shape[3])
        elif isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return Counts(sum(p.numel() for p in model.parameters()), flops)


def _hard_mask(m: ChipMask) -> Tensor:
    return m.hard_mask.float() if m.pruned else torch.ones(m.num_channels)


class _ChannelMask(nn.Module):
    """What is left of a mask that compaction could not fold into a BatchNorm: the kept
    channels, each times its scale where one is given (a soft ChipMask's z after a BatchNorm
    without affine parameters), the others exactly 0."""

    def __init__(self, keep: Tensor, scale: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("keep", keep.clone())
        self.register_buffer("scale", None if scale is None else scale.clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.scale is not None:
            x = x * self.scale.view(shape).to(x.dtype)
        return torch.where(self.keep.view(shape), x, 0.0)


def _conv_weight(m: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
    """The weight and bias with a MaskedConv2d's static masks applied (masked entries 0)."""
    w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
    if isinstance(m, MaskedConv2d):
        w, b = fold_static_masks(w, b, m.groups, m.in_mask, m.out_mask, m.weight_mask)
    return w, b


def _index(keep: Tensor) -> Tensor:
    idx = keep.nonzero().view(-1)
    return idx if idx.numel() > 0 else torch.zeros(1, dtype=torch.long)  # keep one channel


def _new_conv(m: nn.Conv2d, in_idx: Tensor, out_idx: Tensor, depthwise: bool) -> nn.Conv2d:
    w, b = _conv_weight(m)
    groups = len(out_idx) if depthwise else 1
    new = nn.Conv2d(len(in_idx), len(out_idx), m.kernel_size, m.stride, m.padding, m.dilation,
                    groups, b is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[out_idx] if depthwise else w[out_idx][:, in_idx])
        if b is not None:
            new.bias.copy_(b[out_idx])
    return new


def _new_bn(m: nn.BatchNorm2d, idx: Tensor, scale: Tensor | None) -> nn.Module:
    like = m.weight if m.affine else m.running_mean
    new = type(m)(len(idx), m.eps, m.momentum, m.affine, m.track_running_stats,
                  device=None if like is None else like.device,
                  dtype=None if like is None else like.dtype)
    with torch.no_grad():
        if m.affine:
            new.weight.copy_(m.weight[idx])
            new.bias.copy_(m.bias[idx])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[idx])
            new.running_var.copy_(m.running_var[idx])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        if scale is not None:  # a following mask folded in: masked channels give exactly 0
            if not m.affine:  # no weight to fold it into: the scale after the BatchNorm
                return nn.Sequential(new, _ChannelMask(scale[idx] != 0, scale[idx]))
            s = scale[idx].to(new.weight.dtype)
            new.weight.mul_(s)
            new.bias.mul_(s)
    return new


def compact(model: nn.Module, example_input: Tensor, *, fold_batchnorm: bool = True,
            channels_last: bool = True, leaf_modules: _graph.LeafModules = ()) -> fx.GraphModule:
    """A new, smaller dense model without the channels that hard masks make exactly zero.

    Hard masks are pruned ``ChipMask``s (after a BatchNorm) and boolean static masks of
    ``MaskedConv2d``. Channels are followed through sequential layers, depthwise convolutions,
    residual additions (a channel shared by a sum is kept unless every branch masks it),
    products with a per-channel scale (squeeze-and-excitation: the scale's convolution or Linear
    loses the same channels), concatenations along the channels (``torch.cat``: a channel
    removed from an input is removed from the concatenation and from the inputs of the layers
    that read it; DenseNet, Inception), BatchNorm and the activations, pooling, flatten and
    Linear; ops the analysis does not know (k-WTA over a whole sample, SAP, CAS, grouped
    convolutions, leaf modules) keep all the channels they touch. The result (a
    ``torch.fx.GraphModule`` of plain Conv2d, BatchNorm2d and Linear layers, masks folded into
    the BatchNorms, pyprune's other layers kept as they are) gives the masked model's eval-mode
    outputs. A channel that a BatchNorm gives a constant (its bias) is not exactly zero, so it
    stays unless a mask after that BatchNorm removes it too (in a MobileNetV2 block, mask after
    the expansion's and the depthwise convolution's BatchNorms alike).

    The model is traced with torch.fx. A model that fx cannot trace (Python control flow on
    tensor values, functions that check their arguments' types) raises a ValueError naming the
    innermost module whose forward failed; pass its qualified name (or its type) in
    ``leaf_modules`` to keep it whole: it runs as it is and keeps every channel it touches.

    The result is an inference model. With ``fold_batchnorm`` (default) each BatchNorm that
    follows a convolution alone is folded into its weight and bias (eval-mode statistics); with
    ``channels_last`` (default) the convolution weights are stored channels_last, the layout
    oneDNN and cuDNN's tensor-core kernels run natively, so the convolutions run and return
    channels_last whatever the input's layout. Values do not depend on either. On this
    project's CPU the two together make a compacted ResNet about 1.5x faster than compaction
    alone; ``benchmarks.end_to_end`` reports the dense model with the same two as well, so the
    part that pruning buys is visible. (pyprune's random layers, SAP and GaussianNoise, draw
    per memory position: under channels_last a given seed gives them other draws than the
    original model's, from the same distribution; pass channels_last=False to reproduce them.)

    The parameter and FLOP counts before and after are in ``result.compact_report``.

    >>> small = pyprune.compact(model, torch.randn(1, 3, 32, 32))
    >>> print(small.compact_report)   # params 11,173,962 -> 5,012,554 (44.9%), FLOPs ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    before = count(model, example_input)
    model = copy.deepcopy(model)
    gm = _graph.trace(model, example_input, leaf_modules)
    flow = _graph.analyse(gm, _hard_mask)
    modules = dict(gm.named_modules())
    replaced: dict[str, nn.Module] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = modules[n.target]
        k = _graph.kind(n, modules)
        if k in ("conv", "depthwise"):
            in_idx = _index(flow.kept(n.args[0]))
            out_idx = _index(flow.kept(n))
            replaced[n.target] = _new_conv(m, in_idx, out_idx, k == "depthwise")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and n in flow.alive:
            users = list(n.users)
            scale = None
            if len(users) == 1 and users[0].op == "call_module" and isinstance(
                    modules[users[0].target], ChipMask):
                chip = modules[users[0].target]
                scale = chip.hard_mask.float() if chip.pruned else chip.z().detach()
                replaced[users[0].target] = nn.Identity()
            replaced[n.target] = _new_bn(m, _index(flow.kept(n)), scale)
        elif isinstance(m, ChipMask) and n.target not in replaced:
            idx = _index(flow.kept(n))
            if m.pruned:
                replaced[n.target] = _ChannelMask(m.hard_mask[idx])
            else:
                raise ValueError(f"ChipMask {n.target!r} is not pruned and follows no "
                                 "BatchNorm: call prune() first")
        elif k == "linear" and _graph.linear_channels(n):
            in_idx, out_idx = _index(flow.kept(n.args[0])), _index(flow.kept(n))
            new = nn.Linear(len(in_idx), len(out_idx), m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(m.weight[out_idx][:, in_idx])
                if m.bias is not None:
                    new.bias.copy_(m.bias[out_idx])
            replaced[n.target] = new
    for target, new in replaced.items():
        parent, _, name = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, new)
    gm.recompile()
    gm.eval()
    if fold_batchnorm:
        from torch.fx.experimental.optimization import fuse

        # no_trace: the graph is already traced (with pyprune's modules kept whole; fuse's own
        # symbolic_trace would trace into them and fail)
        gm = fuse(gm, inplace=True, no_trace=True)
    if channels_last:
        for m in gm.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    gm.compact_report = CompactReport(before, count(gm, example_input))
    return gm


def mask_convolutions(model: nn.Module, example_input: Tensor, *, channels_last: bool = True,
                      leaf_modules: _graph.LeafModules = ()) -> nn.Module:
    """A copy of model whose convolutions skip what the hard masks remove, shapes unchanged.

    Every groups-1 ``nn.Conv2d`` becomes a ``MaskedConv2d`` with static bool masks: in_mask
    drops the input channels that are exactly zero (a pruned ChipMask before it), out_mask the
    output channels that a later hard mask zeroes anyway. A pruned ChipMask right after a
    BatchNorm is folded into it (its weight and bias zeroed on the removed channels, which the
    convolution before already zeroed), saving the mask's pass. Eval-mode outputs equal the
    model's; the convolutions do only the kept work
    (see ``pyprune.masked_conv2d``). ``compact`` goes further and removes the channels from
    every layer.

    With ``channels_last`` (the default) the copy's 4-D parameters are stored channels_last, so
    activations follow that layout after the first convolution: the channel gathers and
    scatters of MaskedConv2d then move whole rows of channels per pixel instead of converting
    each convolution's input layout (about 1.1x on the example ResNet; the values are the same).

    Channels are followed as by ``compact`` (``leaf_modules`` likewise); depthwise and grouped
    convolutions stay dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    model = copy.deepcopy(model)
    gm = _graph.trace(model, example_input, leaf_modules)
    flow = _graph.analyse(gm, _hard_mask)
    modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op != "call_module" or _graph.kind(n, modules) != "conv":
            continue
        m = modules[n.target]
        if type(m) is not nn.Conv2d:
            continue
        device = m.weight.device
        in_keep = (flow.alive[n.args[0]] > 0).to(device) if n.args[0] in flow.alive else None
        out_keep = ((flow.alive[n] * flow.needed[n]) > 0).to(device)
        new = MaskedConv2d.from_conv(m)
        new.set_masks(in_mask=None if in_keep is None or bool(in_keep.all()) else in_keep,
                      out_mask=None if bool(out_keep.all()) else out_keep)
        _set(model, n.target, new)
    for n in gm.graph.nodes:  # hard masks right after a BatchNorm: into the BatchNorm
        if n.op != "call_module" or not isinstance(modules[n.target], ChipMask):
            continue
        chip, src = modules[n.target], n.args[0]
        if (chip.pruned and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[src.target], nn.BatchNorm2d) and modules[src.target].affine):
            bn = modules[src.target]
            with torch.no_grad():
                keep = chip.hard_mask.to(bn.weight.dtype)
                bn.weight.mul_(keep)
                bn.bias.mul_(keep)
            _set(model, n.target, nn.Identity())
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _set(model: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
