"""Analysis tools for robust models' features."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate

__all__ = ["channel_activation_frequency"]


@torch.no_grad()
def channel_activation_frequency(x: Tensor, threshold: float = 0.01) -> Tensor:
    r"""How often each channel is active: the analysis the CAS paper (Bai et al., 2021, Fig. 1)
    uses to show that adversarial examples activate channels that natural ones leave suppressed.

    With a[n, k] the mean activation of channel k in sample n (over the spatial dims of an
    (N, K, H, W) x; x itself when x is (N, K)):

        freq[k] = 1/N * #{n : a[n, k] > threshold * max_k' a[n, k']}

    Returns freq (K,) in float32 (float64 for float64 x), values in [0, 1]. Pass post-ReLU
    features, as the paper does (for signed features, pass ``x.abs()`` to count magnitudes).
    """
    _validate.tensor(x, "x", min_dim=2)
    threshold = _validate.real(threshold, "threshold")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must hold at least one sample and one channel, got shape {tuple(x.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = x.to(acc).flatten(2).mean(2) if x.dim() > 2 else x.to(acc)
    active = a > threshold * a.amax(dim=1, keepdim=True)
    return active.to(acc).mean(0)
