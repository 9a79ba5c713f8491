from __future__ import annotations

from torch import Tensor, nn

from .. import _validate
from ..ops.sap import MAX_DRAWS, sap


class SAP(nn.Module):
    """Stochastic activation pruning (see pyprune.sap), active in training and in eval mode
    (it is a test-time defense). Usually placed after each ReLU. It draws from torch's default
    generator: under DDP/FSDP call ``pyprune.seed_per_rank(seed)`` once per process, or every
    rank draws the same masks for the same local batch positions.

    >>> act = SAP()                          # r = group_size draws per sample
    >>> act = SAP(samples=1000, exact=False)
    """

    def __init__(self, ratio: float = 1.0, samples: int | None = None, exact: bool = True) -> None:
        super().__init__()
        ratio = _validate.real(ratio, "ratio")
        if not ratio > 0.0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        if samples is not None:
            samples = _validate.integer(samples, "samples")
            if not 1 <= samples <= MAX_DRAWS:
                raise ValueError(f"samples must be in [1, {MAX_DRAWS}], got {samples}")
        self.ratio, self.samples = ratio, samples
        self.exact = _validate.flag(exact, "exact")

    def forward(self, x: Tensor) -> Tensor:
        return sap(x, self.ratio, samples=self.samples, exact=self.exact)

    def extra_repr(self) -> str:
        amount = f"samples={self.samples}" if self.samples is not None else f"ratio={self.ratio}"
        return f"{amount}, exact={self.exact}"
