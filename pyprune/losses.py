"""Losses for robust training with feature-space regularisers: CAS (Bai et al., ICLR 2021) and
prototype conformity (Mustafa et al., ICCV 2019)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate

__all__ = ["cas_loss", "pc_loss"]


def _labels(label: object, n: int, classes: int, name: str = "label") -> Tensor:
    if not isinstance(label, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(label).__name__}")
    if label.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of class indices, got {label.dtype}")
    if label.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(label.shape)}")
    return label


def cas_loss(logits_list: Sequence[Tensor], label: Tensor, beta: float = 2.0) -> Tensor:
    r"""The CAS training term: beta / S * sum_s cross_entropy(logits_s, label).

    ``logits_list`` holds the logits of the S CAS modules of a model (each (N, C)); add the
    result to the model's own cross-entropy (the paper uses beta = 2).

    >>> out1, lg1 = cas1(f1, y); out2, lg2 = cas2(f2, y)
    >>> loss = F.cross_entropy(model_logits, y) + pyprune.cas_loss([lg1, lg2], y)
    """
    if isinstance(logits_list, Tensor) or not isinstance(logits_list, Sequence):
        raise TypeError("logits_list must be a list or tuple of (N, C) logits tensors, "
                        f"got {type(logits_list).__name__}")
    if len(logits_list) == 0:
        raise ValueError("logits_list must hold the logits of at least one CAS module")
    beta = _validate.real(beta, "beta")
    shape = None
    for i, logits in enumerate(logits_list):
        _validate.tensor(logits, f"logits_list[{i}]", dim=2)
        shape = shape or logits.shape
        if logits.shape != shape:
            raise ValueError(f"logits_list[{i}] must have logits_list[0]'s shape {tuple(shape)}, "
                             f"got {tuple(logits.shape)}")
    _labels(label, shape[0], shape[1])
    _validate.same_device(logits=logits_list[0], label=label)
    _validate.label_range(label, shape[1])
    total = sum(F.cross_entropy(logits, label) for logits in logits_list)
    return total * (beta / len(logits_list))


def pc_loss(features: Tensor, centroids: Tensor, label: Tensor) -> Tensor:
    r"""Prototype conformity loss (Mustafa et al., ICCV 2019, "Adversarial Defense by Restricting
    the Hidden Space of Deep Neural Networks"): pulls each feature to its class centroid and
    pushes it from the others. For features f_i (N, D), centroids c_j (C, D), labels y_i:

        loss = 1/N * sum_i [ ||f_i - c_{y_i}||^2 - 1/(C-1) * sum_{j != y_i} ||f_i - c_j||^2 ]

    Differentiable in features and centroids (pass the centroids as a learnable parameter, as
    the paper does). Features of more dims are flattened after the batch dim. Needs C >= 2.
    The push term uses sum_j ||f - c_j||^2 = C ||f - c̄||^2 + sum_j ||c_j - c̄||^2 (c̄ the mean
    centroid), which costs O((N + C) D) memory instead of O(N C D).
    """
    _validate.tensor(features, "features", min_dim=2)
    _validate.tensor(centroids, "centroids", dim=2)
    f = features.flatten(1)
    classes, dim = centroids.shape
    if classes < 2:
        raise ValueError(f"centroids must hold at least 2 classes (the push term averages over the "
                         f"other classes), got shape {tuple(centroids.shape)}")
    if f.shape[1] != dim:
        raise ValueError(f"centroids must have shape (num_classes, {f.shape[1]}) for features "
                         f"of {f.shape[1]} values, got {tuple(centroids.shape)}")
    if centroids.dtype != f.dtype:
        raise TypeError(f"centroids must have features' dtype {f.dtype}, got {centroids.dtype}")
    _labels(label, f.shape[0], classes)
    _validate.same_device(features=features, centroids=centroids, label=label)
    _validate.label_range(label, classes)
    pull = (f - centroids[label]).pow(2).sum(1)
    center = centroids.mean(0)
    spread = (centroids - center).pow(2).sum()
    total = classes * (f - center).pow(2).sum(1) + spread  # sum over all j of ||f - c_j||^2
    push = (total - pull) / (classes - 1)
    return (pull - push).mean()
