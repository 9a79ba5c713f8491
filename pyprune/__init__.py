"""pyprune: fused kernels for k-WTA, stochastic activation pruning, CAS and masked convolution.

Public ops are plain functions (``pyprune.kwta``), modules live in ``pyprune.nn``, and every op
runs on one of the backends listed by ``pyprune.backends(device)``.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the torch.ops.pyprune operators; raises its real error)
from . import nn, reference
from ._backend import backend_status, backends, cpu_isa, use_backend
from .analysis import channel_activation_frequency
from .losses import cas_loss, pc_loss
from . import chipnet
from .chipnet import budget_loss, crispness_loss
from .compact import compact, count, mask_convolutions
from .convert import cas_logits, convert, set_cas_label
from .ops import cas, kwta, masked_conv2d
from .ops import gaussian_noise, magnitude_mask, sap

__version__ = "0.1.0"

__all__ = [
    "kwta", "cas", "masked_conv2d", "sap", "gaussian_noise", "magnitude_mask",
    "cas_loss", "pc_loss", "channel_activation_frequency",
    "chipnet", "crispness_loss", "budget_loss", "compact", "count", "mask_convolutions",
    "convert", "set_cas_label", "cas_logits",
    "backends", "backend_status", "cpu_isa", "use_backend", "nn", "reference",
]
