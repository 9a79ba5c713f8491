from __future__ import annotations


import torch
from torch import Tensor, nn

from .. import _validate


class ChipMask(nn.Module):
    r"""CHIPNet's per-channel soft mask (Tiwari et al., ICLR 2021), placed after a BatchNorm.

    Each channel has a parameter ``psi``; with the logistic ``z~ = sigmoid(beta * (psi - psi0))``
    and the continuous Heaviside ``z = 1 - exp(-gamma * z~) + z~ * exp(-gamma)``, the forward
    multiplies channel c of x (N, C, ...) by z_c. Training raises beta and gamma (see
    ``pyprune.chipnet.schedule``) while ``pyprune.crispness_loss`` pushes z to 0 or 1 and
    ``pyprune.budget_loss`` holds the cost of the kept channels at a budget. ``prune(threshold)``
    then makes the mask hard: channels with z > threshold pass unchanged, the rest are exactly
    zero (and ``pyprune.compact`` removes them).

    >>> bn_mask = ChipMask(64)
    >>> y = bn_mask(bn(conv(x)))
    """

    def __init__(self, num_channels: int, beta: float = 1.0, gamma: float = 2.0,
                 psi0: float = 0.0) -> None:
        super().__init__()
        num_channels = _validate.integer(num_channels, "num_channels")
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = num_channels
        self.psi0 = _validate.real(psi0, "psi0")
        # Small positive start, as CHIPNet's code: every channel starts at z~ ~ 0.5.
        self.psi = nn.Parameter(torch.rand(num_channels) * 0.01)
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.register_buffer("gamma", torch.tensor(float(gamma)))
        self.register_buffer("hard_mask", None)
        self.set_beta_gamma(beta, gamma)

    def set_beta_gamma(self, beta: float, gamma: float) -> None:
        beta, gamma = _validate.real(beta, "beta"), _validate.real(gamma, "gamma")
        if beta <= 0 or gamma <= 0:
            raise ValueError(f"beta and gamma must be > 0, got {beta}, {gamma}")
        self.beta.fill_(beta)
        self.gamma.fill_(gamma)

    def z_tilde(self) -> Tensor:
        """The logistic z~ = sigmoid(beta * (psi - psi0)), shape (C,)."""
        return torch.sigmoid(self.beta * (self.psi - self.psi0))

    def z(self) -> Tensor:
        """The soft mask z = 1 - exp(-gamma z~) + z~ exp(-gamma), shape (C,)."""
        zt = self.z_tilde()
        return 1 - torch.exp(-self.gamma * zt) + zt * torch.exp(-self.gamma)

    @property
    def pruned(self) -> bool:
        return self.hard_mask is not None

    def prune(self, threshold: float = 0.5) -> Tensor:
        """Hard pruning: keep the channels with z > threshold. Returns the bool mask (C,)."""
        threshold = _validate.real(threshold, "threshold")
        with torch.no_grad():
            self.hard_mask = self.z() > threshold
        self.psi.requires_grad_(False)
        return self.hard_mask

    def unprune(self) -> None:
        """Back to the soft mask (psi trainable again)."""
        self.hard_mask = None
        self.psi.requires_grad_(True)

    def mask(self) -> Tensor:
        """The mask in use: the hard mask (as 0/1 in psi's dtype) once pruned, else z."""
        return self.hard_mask.to(self.psi.dtype) if self.pruned else self.z()

    def soft_count(self, steepness: float = 10.0) -> Tensor:
        """Per-channel keep weights for budgets: sigmoid(steepness * (z - 0.5)), a sharpened z
        (CHIPNet's code counts channels this way, so that z ~ 0.7 counts as nearly kept), or the
        hard mask once pruned."""
        if self.pruned:
            return self.hard_mask.to(self.psi.dtype)
        return torch.sigmoid(steepness * (self.z() - 0.5))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"x must have {self.num_channels} channels in dim 1, got shape "
                             f"{tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.pruned:  # removed channels are exactly 0, as after compaction
            return torch.where(self.hard_mask.view(shape), x, 0.0)
        return x * self.z().to(x.dtype).view(shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "hard_mask"
        self._buffers["hard_mask"] = state_dict[key].clone() if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kept = f", kept={int(self.hard_mask.sum())}" if self.pruned else ""
        return (f"{self.num_channels}, beta={float(self.beta):g}, gamma={float(self.gamma):g}, "
                f"psi0={self.psi0:g}{kept}")
