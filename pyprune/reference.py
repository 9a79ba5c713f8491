"""Plain-PyTorch references: the executable form of SPEC section 2.

Every backend is tested against these functions. They favour obviousness over speed: each is a
few lines of eager PyTorch, differentiable by autograd, and exact in float64. They validate
nothing beyond what they need; the public API (`pyprune.kwta`, ...) checks user arguments.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kwta",
    "kwta_mask",
    "sap",
    "sap_keep_probability",
    "gaussian_noise",
    "magnitude_mask",
    "cas",
    "masked_conv2d",
    "chip_z_tilde",
    "chip_z",
    "crispness",
]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _groups(x: Tensor, mode: str) -> Tensor:
    if mode == "sample":
        return x.flatten(1)
    if mode == "channel":
        return x.flatten(2)
    raise ValueError(f"mode must be 'sample' or 'channel', got {mode!r}")


def kth_largest(key: Tensor, k: int) -> Tensor:
    """The k-th largest of key along its last dim (keepdim), NaN counting as largest, as
    torch.topk ranks it on the CPU; without asking topk to rank NaN (CUDA's float64 topk gave
    NaN as the 300th largest of a group of 3000 with one NaN, H200, torch 2.11): NaN as -inf,
    then the (k - #NaN)-th largest of the rest, or NaN where the NaNs alone fill the k."""
    nan = key.isnan()
    n_nan = nan.sum(dim=-1, keepdim=True)
    top = key.masked_fill(nan, float("-inf")).topk(k, dim=-1).values
    rank = (k - 1 - n_nan).clamp(min=0)
    return torch.where(n_nan >= k, torch.full_like(top[..., :1], float("nan")),
                       top.gather(-1, rank))


def kwta_mask(x: Tensor, k: int, mode: str = "sample", absolute: bool = False) -> Tensor:
    """Boolean keep-mask of k-WTA: key >= k-th largest key of the group, NaN kept.

    key = abs(x) if absolute else x; the k-th largest follows torch.topk, where NaN is largest.
    """
    g = _groups(x, mode)
    key = g.abs() if absolute else g
    keep = (key >= kth_largest(key, k)) | key.isnan()
    return torch.empty_like(x, dtype=torch.bool).copy_(keep.view(x.shape))  # in x's layout


def kwta(x: Tensor, k: int, mode: str = "sample", absolute: bool = False) -> Tensor:
    """k-winners-take-all: x where it is among its group's k largest (ties kept), 0 elsewhere.

    Gradient: grad * keep_mask (the mask is a constant for autograd).
    """
    keep = kwta_mask(x.detach(), k, mode, absolute)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def sap_keep_probability(x: Tensor, r: int) -> Tensor:
    """q_j = 1 - (1 - p_j)^r with p = |x| / sum|x| per sample, computed as -expm1(r*log1p(-p))."""
    a = x.detach().flatten(1).to(_acc_dtype(x)).abs()
    total = a.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, a / total, torch.zeros_like(a))
    return (-torch.expm1(r * torch.log1p(-p))).view_as(x)


# torch.multinomial's most categories; larger samples draw by inverse transform.
_MULTINOMIAL_CATEGORIES = 2**24


def sap(
    x: Tensor,
    r: int,
    exact: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Stochastic activation pruning with r draws per sample (Dhillon et al., 2018).

    exact=True: r indices drawn with replacement from p = |x|/sum|x| (torch.multinomial; by
    inverse transform of float64 uniforms above its 2^24 categories), the drawn ones kept.
    exact=False: each element kept independently with probability q.
    Kept elements are scaled by 1/q, so E[out] = x; an all-zero sample gives zeros, and a sample
    with a NaN or inf (p undefined) keeps nothing: x * 0, NaN at its non-finite elements.
    """
    if x.shape[0] == 0:
        return x.clone()
    flat = x.detach().flatten(1)
    q = sap_keep_probability(x, r).flatten(1)
    if exact:
        a = flat.abs().to(_acc_dtype(x))
        total = a.sum(dim=1, keepdim=True)
        live = (total > 0) & total.isfinite()
        # Rows with nothing to draw from draw from dummy weights and keep nothing (no
        # data-dependent branch, so vmap can batch this).
        weights = torch.where(live, a, 1.0)
        if weights.shape[1] <= _MULTINOMIAL_CATEGORIES:
            idx = torch.multinomial(weights, r, replacement=True, generator=generator)
        else:  # the same draw by inverse transform: element j where cdf_{j-1} <= u < cdf_j
            cdf = weights.double().cumsum(1)
            u = torch.rand(weights.shape[0], r, dtype=torch.float64, device=weights.device,
                           generator=generator) * cdf[:, -1:]
            idx = torch.searchsorted(cdf, u, right=True).clamp_max(weights.shape[1] - 1)
        kept = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True) & live
    else:
        u = torch.rand(q.shape, dtype=q.dtype, device=q.device, generator=generator)
        kept = u < q
    scale = torch.where(kept, 1.0 / q, torch.zeros_like(q))
    return (x.flatten(1).to(q.dtype) * scale).to(x.dtype).view_as(x)


def gaussian_noise(
    x: Tensor,
    std: float,
    multiplicative: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RNA/RNW: x + N(0, std^2); RSA/RSW (multiplicative): x * N(1, std^2)."""
    # generator only where given: randn_like's generator overload skips vmap's randomness
    # checks ("same" would draw per sample, "error" would not raise).
    drawn = {} if generator is None else {"generator": generator}
    noise = torch.randn_like(x, memory_format=torch.contiguous_format, **drawn) * std
    return x * (1 + noise) if multiplicative else x + noise


def magnitude_mask(w: Tensor, keep_ratio: float) -> Tensor:
    """DWP mask: keep the int(keep_ratio * numel) largest |w| over the whole tensor, ties kept."""
    k = int(keep_ratio * w.numel())
    if k == 0:
        return torch.zeros_like(w, dtype=torch.bool)
    key = w.detach().abs().flatten()
    return ((key >= kth_largest(key, k)) | key.isnan()).view_as(w)


def cas(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    label: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Channel-wise activation suppressing (Bai et al., 2021).

    logits = mean_hw(x) @ weight.T + bias; m = weight[label] (or weight[argmax(logits)]);
    out = x * m[:, :, None, None]. Returns (out, logits).
    """
    logits = F.linear(x.mean(dim=(2, 3)), weight, bias)
    index = label if label is not None else logits.detach().argmax(dim=1)
    m = weight[index]
    return x * m[:, :, None, None], logits


def _apply_mask(t: Tensor, mask: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    if mask is None:
        return t
    m = mask.reshape(shape)
    if m.dtype == torch.bool:
        return torch.where(m, t, torch.zeros((), dtype=t.dtype, device=t.device))
    return t * m


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
    weight_mask: Tensor | None = None,
) -> Tensor:
    """F.conv2d(x * in_mask, weight * weight_mask, bias, ...) * out_mask.

    Masks of shape (C,) apply to every sample, (N, C) per sample. A boolean mask is structural
    (masked entries take no part, even if they hold inf or NaN); a float mask multiplies.
    """
    def channel_shape(mask: Tensor) -> tuple[int, ...]:
        return (1, -1, 1, 1) if mask.dim() == 1 else (*mask.shape, 1, 1)

    if x.shape[1] == 0:
        # No input channels: the bias (or 0) everywhere. F.conv2d returns no output channels
        # there, so each group gets one zero input channel (a zero weight column, a masked-out
        # mask entry), which adds exactly nothing and keeps every input's gradient flowing.
        def pad(t: Tensor | None, dim: int, count: int) -> Tensor | None:
            if t is None:
                return None
            shape = list(t.shape)
            shape[dim] = count
            return torch.cat([t, t.new_zeros(shape)], dim)

        x, weight = pad(x, 1, groups), pad(weight, 1, 1)
        in_mask, weight_mask = pad(in_mask, -1, groups), pad(weight_mask, 1, 1)

    if in_mask is not None:
        x = _apply_mask(x, in_mask, channel_shape(in_mask))
    if weight_mask is not None:
        weight = _apply_mask(weight, weight_mask, tuple(weight.shape))
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if out_mask is not None:
        y = _apply_mask(y, out_mask, channel_shape(out_mask))
    return y


def chip_z_tilde(psi: Tensor, beta: float, psi0: float = 0.0) -> Tensor:
    """CHIPNet logistic: z~ = sigmoid(beta * (psi - psi0))."""
    return torch.sigmoid(beta * (psi - psi0))


def chip_z(psi: Tensor, beta: float, gamma: float, psi0: float = 0.0) -> Tensor:
    """CHIPNet continuous Heaviside: z = 1 - exp(-gamma * z~) + z~ * exp(-gamma)."""
    zt = chip_z_tilde(psi, beta, psi0)
    return 1 - torch.exp(-gamma * zt) + zt * math.exp(-gamma)


def crispness(psi: Tensor, beta: float, gamma: float, psi0: float = 0.0) -> Tensor:
    """CHIPNet crispness loss ||z~ - z||^2."""
    zt = chip_z_tilde(psi, beta, psi0)
    return (zt - chip_z(psi, beta, gamma, psi0)).pow(2).sum()
