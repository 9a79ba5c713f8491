"""CHIPNet (Tiwari et al., ICLR 2021): continuous Heaviside channel masks trained against a budget.

``ChipMask`` modules (after each BatchNorm, see ``pyprune.convert(..., chip_masks=True)``) hold
the soft masks; ``crispness_loss`` pushes them to 0 or 1, ``budget_loss`` holds the cost of the
kept channels at a budget, ``schedule`` raises beta and gamma over the epochs, and ``prune``
runs the whole soft-then-hard pruning on a data loader.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _graph, _validate
from .nn import ChipMask

KINDS = ("channels", "params", "flops", "volume")

__all__ = ["crispness_loss", "budget_loss", "budget", "schedule", "set_beta_gamma", "prune", "KINDS"]


def _masks(model: nn.Module) -> list[ChipMask]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    masks = [m for m in model.modules() if isinstance(m, ChipMask)]
    if not masks:
        raise ValueError("model has no prunable layers (no pyprune.nn.ChipMask); insert them "
                         "with pyprune.convert(model, chip_masks=True)")
    return masks


def crispness_loss(model: nn.Module, reduction: str = "sum") -> Tensor:
    r"""CHIPNet's crispness loss ||z~ - z||^2 over every ChipMask channel of the model.

    reduction="sum" is the formula; "mean" divides by the number of channels, as CHIPNet's
    published training code does (``pyprune.chipnet.prune`` uses it, so that its default weight
    10 does not grow with the model).
    """
    _validate.choice(reduction, "reduction", ("sum", "mean"))
    masks = _masks(model)
    total = sum(((m.z_tilde() - m.z()) ** 2).sum() for m in masks)
    if reduction == "mean":
        total = total / sum(m.num_channels for m in masks)
    return total


# Traced graphs for the params / flops / volume budgets, per model (its modules are shared).
_PLANS: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def budget(model: nn.Module, kind: str = "channels", example_input: Optional[Tensor] = None,
           steepness: float = 10.0) -> Tensor:
    r"""V(z): the fraction of the model's cost that the masks keep, in [0, 1], differentiable.

    A channel counts with weight ``sigmoid(steepness * (z - 0.5))`` (``ChipMask.soft_count``),
    as CHIPNet's published code counts remaining channels, 0 or 1 once its mask is pruned.

    * channels: kept mask channels / all mask channels (the sum of those weights);
    * params: conv weights, sum over convs of (kept inputs x kept outputs x kernel) / total;
    * flops: the same weighted by each conv's output size (H_out x W_out);
    * volume: activation volume, sum over masks of kept channels x H x W / total.

    Kept channels are the masks' counts followed through the model's graph, as
    ``pyprune.compact`` would keep them: a conv's inputs are the channels alive after the masks
    before it, its outputs the ones a mask after it keeps, and tensors joined by a residual sum
    keep the union of their branches. params, flops and volume trace the
    model with torch.fx once, on example_input (needed the first time).
    """
    _validate.choice(kind, "kind", KINDS)
    masks = _masks(model)
    if kind == "channels":
        kept = sum(m.soft_count(steepness).sum() for m in masks)
        return kept / sum(m.num_channels for m in masks)
    plan = _PLANS.get(model)
    if plan is None:
        if example_input is None:
            raise ValueError(f"budget kind {kind!r} needs example_input the first time (to trace "
                             "the model's layer shapes)")
        plan = _graph.trace(model, example_input)
        _PLANS[model] = plan
    like = masks[0].psi
    flow = _graph.analyse(plan, lambda m: m.soft_count(steepness), like=like)
    modules = dict(plan.named_modules())
    kept = like.new_zeros(())
    total = 0.0
    for n in plan.graph.nodes:
        k = _graph.kind(n, modules)
        shape = _graph._shape(n)
        if kind == "volume":
            if k == "mask":
                hw = math.prod(shape[2:]) if len(shape) > 2 else 1
                kept = kept + flow.alive[n].sum() * hw
                total += shape[1] * hw
            continue
        if k in ("conv", "depthwise", "other") and isinstance(modules.get(n.target), nn.Conv2d):
            m = modules[n.target]
            # weights (or multiply-adds) per (input, output) channel pair of a group
            per_pair = m.kernel_size[0] * m.kernel_size[1] * (
                shape[2] * shape[3] if kind == "flops" else 1)
            # the channels compaction would keep: a residual sum keeps the union of its branches
            cout = flow.kept(n).sum()
            if k == "depthwise":  # one input channel per output channel
                kept = kept + cout * per_pair
                total += m.out_channels * per_pair
                continue
            src = n.args[0]
            cin = flow.kept(src).sum() if src in flow.alive else m.in_channels
            kept = kept + cin * cout * per_pair / m.groups
            total += m.in_channels * m.out_channels * per_pair / m.groups
    return kept / total


_budget = budget  # under a name that budget_loss's and prune's ``budget`` argument does not shadow


def budget_loss(model: nn.Module, budget: float, kind: str = "channels",
                example_input: Optional[Tensor] = None, steepness: float = 10.0) -> Tensor:
    """CHIPNet's budget loss (V(z) - budget)^2, V from ``pyprune.chipnet.budget``; budget in
    (0, 1] is the fraction of the cost to keep."""
    value = _validate.real(budget, "budget")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {value}")
    return (_budget(model, kind, example_input, steepness) - value) ** 2


def schedule(epoch: int, beta0: float = 1.0, gamma0: float = 2.0) -> tuple[float, float]:
    """(beta, gamma) for an epoch, as CHIPNet's code raises them: beta by 0.02 per epoch up to
    6, gamma by a factor sqrt(2) per epoch up to 256."""
    epoch = _validate.integer(epoch, "epoch")
    return min(6.0, beta0 + 0.02 * epoch), min(256.0, gamma0 * 2.0 ** (epoch / 2))


def set_beta_gamma(model: nn.Module, beta: float, gamma: float) -> None:
    for m in _masks(model):
        m.set_beta_gamma(beta, gamma)


def _tqdm():
    """tqdm's progress bar, which pyprune itself does not require (its kernels need only torch)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "pyprune.chipnet.prune(progress=True) draws its progress bar with tqdm, which is not "
            "installed: pip install tqdm (or pyprune[bench]), or pass progress=False") from error
    return tqdm


def prune(
    model: nn.Module,
    loader: Iterable,
    budget: float,
    kind: str = "channels",
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    mask_lr: Optional[float] = None,
    weight_decay: float = 1e-3,
    crispness_weight: float = 10.0,
    budget_weight: float = 30.0,
    threshold: float = 0.5,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    log: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
) -> list[dict]:
    """Soft pruning (loss_fn + 10 * crispness + 30 * budget by default, AdamW, beta and gamma
    raised every epoch, the budget's count steepness from 10 by 5 per epoch up to 60, as
    CHIPNet's code) then hard pruning (channels with z <= threshold removed).

    ``mask_lr`` is the masks' learning rate (default ``lr``); short runs on small data sets need
    a larger one, since psi must travel a few units for z to reach 0.

    ``loader`` yields (x, label) batches. Returns one dict per epoch (loss, accuracy on the
    training batches, the soft budget V(z), and V after a trial hard pruning), also passed to
    ``log`` (default: print a line). The model is left hard-pruned; ``pyprune.compact`` then
    builds the smaller model.
    """
    value = _validate.real(budget, "budget")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {value}")
    _validate.choice(kind, "kind", KINDS)
    epochs = _validate.integer(epochs, "epochs")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    tqdm = _tqdm() if progress else None
    masks = _masks(model)
    for m in masks:
        m.unprune()
    psi = {id(m.psi) for m in masks}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if id(p) not in psi], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in psi], "weight_decay": 0.0,
         "lr": lr if mask_lr is None else mask_lr},
    ], lr=lr)
    log = log or (lambda r: print(
        f"epoch {r['epoch']}: loss {r['loss']:.4f}, accuracy {r['accuracy']:.2%}, "
        f"budget {r['budget']:.3f} (hard {r['hard_budget']:.3f}), beta {r['beta']:.2f}, "
        f"gamma {r['gamma']:.1f}"))
    history = []
    example = None
    for epoch in range(epochs):
        beta, gamma = schedule(epoch)
        steepness = min(60.0, 10.0 + 5.0 * epoch)
        set_beta_gamma(model, beta, gamma)
        model.train()
        total, correct, seen, batches = 0.0, 0, 0, 0
        bar = (tqdm(loader, desc=f"chipnet epoch {epoch + 1}/{epochs}", leave=False)
               if progress else loader)
        for x, y in bar:
            if example is None:
                example = x[:1]
            out = model(x)
            loss = (loss_fn(out, y) + crispness_weight * crispness_loss(model, "mean")
                    + budget_weight * budget_loss(model, value, kind, example, steepness))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            if progress:
                bar.set_postfix(loss=total / batches)
        with torch.no_grad():
            soft = float(_budget(model, kind, example, steepness))
            for m in masks:
                m.prune(threshold)
            hard = float(_budget(model, kind, example))
            if epoch + 1 < epochs:
                for m in masks:
                    m.unprune()
        record = dict(epoch=epoch + 1, loss=total / max(batches, 1),
                      accuracy=correct / max(seen, 1), budget=soft, hard_budget=hard,
                      beta=beta, gamma=gamma)
        history.append(record)
        log(record)
    return history


