"""convert(): swap or insert pyprune layers in an existing model."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

from torch import Tensor, nn

from . import _validate
from .nn import CAS, KWTA, SAP, ChipMask, MaskedConv2d

Factory = Callable[[], nn.Module]
_ACTIVATIONS: dict[str, Factory] = {
    "kwta": lambda: KWTA(ratio=0.1),
    "sap": lambda: SAP(ratio=1.0),
}


@dataclass
class ConvertReport:
    """What convert() did: (qualified name, old layer, new layer) per change."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        if not self.replaced:
            return "nothing replaced"
        width = max(len(n) for n, _, _ in self.replaced)
        return "\n".join(f"{n:<{width}}  {old} -> {new}" for n, old, new in self.replaced)


class CASStage(nn.Module):
    """A stage followed by CAS (see ``pyprune.nn.CAS``), for models whose forward takes x
    alone: the label comes from ``pyprune.set_cas_label(model, label)`` before the
    forward, and the logits are kept in ``.logits`` for ``pyprune.cas_loss`` (collect them with
    ``pyprune.cas_logits(model)``)."""

    def __init__(self, stage: nn.Module, cas: CAS) -> None:
        super().__init__()
        self.stage, self.cas = stage, cas
        self.label: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        out, self.logits = self.cas(self.stage(x), self.label if self.training else None)
        return out


def set_cas_label(model: nn.Module, label: Optional[Tensor]) -> None:
    """Give every CASStage of the model the labels of the next training batch."""
    for m in model.modules():
        if isinstance(m, CASStage):
            m.label = label


def cas_logits(model: nn.Module) -> list[Tensor]:
    """The logits of every CASStage from the last forward, in module order."""
    return [m.logits for m in model.modules() if isinstance(m, CASStage) and m.logits is not None]


def _out_channels(module: nn.Module) -> int:
    """The channels a stage outputs: those of its last Conv2d / BatchNorm2d."""
    last = None
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            last = m
    if last is None:
        raise ValueError("cannot tell the output channels of a stage without Conv2d or BatchNorm2d")
    return last.out_channels if isinstance(last, nn.Conv2d) else last.num_features


def convert(
    model: nn.Module,
    *,
    relu: Union[str, Factory, None] = None,
    conv: bool = False,
    chip_masks: Union[bool, Iterable[str], Callable[[str, nn.Module], bool]] = False,
    cas: Iterable[str] = (),
    num_classes: Optional[int] = None,
    inplace: bool = False,
) -> tuple[nn.Module, ConvertReport]:
    """Swap layers of an existing model for pyprune's, or insert pyprune layers.

    Args:
        relu: every ``nn.ReLU`` module becomes ``relu()`` (a factory), or ``"kwta"``
            (KWTA(ratio=0.1)) / ``"sap"`` (SAP(ratio=1.0)); every ``nn.ReLU6`` (MobileNetV2)
            becomes ``nn.Sequential(relu(), nn.Hardtanh(-inf, 6))``: the new activation with
            ReLU6's cap at 6 kept, as ReLU6 = min(ReLU, 6) (k-WTA's winners pass unchanged,
            so without the cap they would be unbounded where the model was trained bounded).
            SAP's kept values are x / q, which the cap limits too: its output is unbiased only
            where x / q <= 6. Only these two exact types are replaced: other activations
            (Hardswish, SiLU, GELU, ...) are not ReLU, whose replacement k-WTA and SAP are
            defined as (to swap one anyway, setattr the module yourself). Activations called
            as functions in a forward (``F.relu``) are not modules and stay. With relu given,
            a model with neither module raises a ValueError that lists the activation types
            it has.
        conv: every ``nn.Conv2d`` becomes a ``MaskedConv2d`` sharing its parameters. A weight
            pruned with ``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``) becomes
            the weight (the same parameter) and a bool weight mask, which pyprune's CPU backend
            runs as a sparse convolution where few weights are kept; the pruning hook does not
            carry over.
        chip_masks: ``nn.BatchNorm2d`` layers to follow with a ``ChipMask`` (the BatchNorm
            becomes ``nn.Sequential(bn, ChipMask)``, so its state_dict keys gain ``.0``): True
            for all, or their qualified names, or a predicate ``(name, bn) -> bool``. In a
            ResNet, masking only the BatchNorms inside the blocks (``bn1``) prunes channels
            that compaction can remove one for one; a channel of the residual path stays as
            long as any block that adds into it keeps it.
        cas: qualified names of stages to follow with CAS (``CASStage``); needs num_classes.
        inplace: change ``model`` itself; else a deep copy.

    Returns:
        (model, report): the converted model and what was replaced, e.g.
        ``print(report)`` lists ``layer1.0.relu  ReLU -> KWTA`` lines.

    >>> model, report = pyprune.convert(resnet, relu="kwta", conv=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(relu, str):
        relu = _ACTIVATIONS[_validate.choice(relu, "relu", tuple(_ACTIVATIONS))]
    elif relu is not None and not callable(relu):
        raise TypeError(f"relu must be 'kwta', 'sap', a factory of modules or None, got {relu!r}")
    if chip_masks is True or chip_masks is False:
        want_mask = (lambda name, m: True) if chip_masks else None
    elif callable(chip_masks):
        want_mask = chip_masks
    else:
        mask_names = set(chip_masks)
        want_mask = lambda name, m: name in mask_names  # noqa: E731
    cas = list(cas)
    if cas and num_classes is None:
        raise ValueError("cas stages need num_classes")
    if not (relu or conv or want_mask or cas):
        raise ValueError("nothing to convert: give relu, conv, chip_masks or cas")
    if not inplace:
        model = copy.deepcopy(model, _pruned_tensors(model))
    names = dict(model.named_modules())
    for name in cas:
        if name not in names or name == "":
            raise ValueError(f"cas stage {name!r} is not a submodule of the model")
    report = ConvertReport()

    def swap(name: str, new: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, child)
        setattr(owner, child, new)
        report.replaced.append((name, type(old).__name__, _describe(new)))

    for name, m in list(model.named_modules()):
        if not name:
            continue
        if relu is not None and type(m) is nn.ReLU:
            swap(name, relu())
        elif relu is not None and type(m) is nn.ReLU6:
            swap(name, nn.Sequential(relu(), nn.Hardtanh(float("-inf"), 6.0)))
        elif conv and type(m) is nn.Conv2d:
            swap(name, _masked_conv(name, m))
        elif want_mask is not None and type(m) is nn.BatchNorm2d and want_mask(name, m):
            mask = ChipMask(m.num_features).to(m.weight.device if m.affine else "cpu")
            swap(name, nn.Sequential(m, mask))
    for name in cas:
        stage = model.get_submodule(name)
        swap(name, CASStage(stage, CAS(_out_channels(stage), num_classes)))
    if relu is not None and not any(type(m) in (nn.ReLU, nn.ReLU6) for m in names.values()):
        raise ValueError(f"the model has none of the layers to convert: relu={_name(relu)} "
                         f"replaces nn.ReLU and nn.ReLU6 modules and found none of them; "
                         f"{_activations(model)}")
    if not report.replaced:
        raise ValueError("the model has none of the layers to convert: conv=True replaces "
                         "nn.Conv2d and chip_masks follow nn.BatchNorm2d; found none of them")
    return model, report


def _name(relu) -> str:
    for key, factory in _ACTIVATIONS.items():
        if relu is factory:
            return repr(key)
    return getattr(relu, "__name__", type(relu).__name__)


def _activations(model: nn.Module) -> str:
    """The activation module types of a model, for an error message."""
    found = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__module__ == "torch.nn.modules.activation"})
    if not found:
        return ("the model has no activation modules (activations called as functions, "
                "e.g. F.relu, are not modules and cannot be swapped)")
    return (f"the model has: {', '.join(found)} (k-WTA and SAP are defined as ReLU's "
            f"replacement, so convert leaves other activations alone; to swap one anyway, "
            f"setattr the module yourself)")


def _pruned_tensors(model: nn.Module) -> dict:
    """A deepcopy memo for a model pruned with torch.nn.utils.prune, whose pruned tensors
    (`name` computed from `name_orig` and `name_mask`) are not graph leaves, which deepcopy
    refuses: each is taken detached (the copy's pruning hook recomputes it at its next forward)."""
    memo = {}
    for m in model.modules():
        for attr, value in vars(m).items():
            if isinstance(value, Tensor) and not value.is_leaf and hasattr(m, attr + "_orig"):
                memo[id(value)] = value.detach()
    return memo


def _masked_conv(name: str, m: nn.Conv2d) -> MaskedConv2d:
    """A MaskedConv2d sharing m's parameters; torch.nn.utils.prune's weight reparametrization
    (weight = weight_orig * weight_mask, recomputed by a forward pre-hook) becomes the weight
    weight_orig with the bool mask weight_mask != 0."""
    orig, mask = getattr(m, "weight_orig", None), getattr(m, "weight_mask", None)
    if hasattr(m, "bias_orig"):
        raise ValueError(f"{name}: a bias pruned with torch.nn.utils.prune has no MaskedConv2d "
                         f"equivalent; call torch.nn.utils.prune.remove(module, 'bias') first")
    if not (isinstance(orig, nn.Parameter) and isinstance(mask, Tensor)):
        return MaskedConv2d.from_conv(m)
    new = MaskedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                       m.dilation, m.groups, m.bias is not None, m.padding_mode, device="meta")
    new.weight = orig
    new.bias = m.bias
    new.set_masks(weight_mask=(mask != 0).detach().clone())
    new.train(m.training)
    return new


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Sequential):
        return " + ".join(type(c).__name__ for c in m)
    if isinstance(m, CASStage):
        return f"{type(m.stage).__name__} + CAS"
    return type(m).__name__
