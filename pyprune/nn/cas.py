from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops.cas import cas


class CAS(nn.Module):
    """Channel-wise activation suppressing (Bai et al., ICLR 2021), see pyprune.cas.

    An auxiliary classifier (``.weight`` (num_classes, in_channels), ``.bias`` (num_classes,),
    initialised like nn.Linear) on the channel means; its weight row of a class rescales the
    channels. ``forward(x, label=None) -> (out, logits)``: in training mode the row of the true
    label (required), in eval mode the row of the predicted class (argmax of the logits; a
    label passed in eval mode is ignored), as in the paper's code. Train with
    ``pyprune.cas_loss`` on the logits of every CAS module.

    >>> cas = CAS(256, 10)
    >>> out, logits = cas(features, label)        # training
    >>> out, _ = cas.eval()(features)             # inference
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = _validate.integer(in_channels, "in_channels")
        self.num_classes = _validate.integer(num_classes, "num_classes")
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, "
                             f"{num_classes}")
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_channels))
        self.bias = nn.Parameter(torch.empty(self.num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_channels)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training:
            if label is None:
                raise ValueError("CAS in training mode needs the labels: call cas(x, label) "
                                 "(or switch to eval mode to use the predicted class)")
            return cas(x, self.weight, self.bias, label)
        return cas(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}"
