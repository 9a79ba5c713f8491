from __future__ import annotations

from torch import Tensor, nn

from .. import _validate
from ..ops.kwta import MODES, kwta


class KWTA(nn.Module):
    """k-winners-take-all activation, a drop-in replacement for nn.ReLU (see pyprune.kwta).

    >>> act = KWTA(ratio=0.1)                   # keep the 10% largest of each sample
    >>> act = KWTA(k=4, mode="channel")         # keep the 4 largest of each feature map
    """

    def __init__(
        self, ratio: float | None = None, k: int | None = None, mode: str = "sample",
        absolute: bool = False,
    ) -> None:
        super().__init__()
        if (ratio is None) == (k is None):
            raise ValueError(f"give exactly one of ratio and k, got ratio={ratio!r}, k={k!r}")
        if ratio is not None:
            ratio = _validate.real(ratio, "ratio")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        else:
            k = _validate.integer(k, "k")
            if k < 1:
                raise ValueError(f"k must be >= 1, got {k}")
        self.ratio, self.k = ratio, k
        self.mode = _validate.choice(mode, "mode", MODES)
        self.absolute = _validate.flag(absolute, "absolute")

    def forward(self, x: Tensor) -> Tensor:
        return kwta(x, self.ratio, k=self.k, mode=self.mode, absolute=self.absolute)

    def extra_repr(self) -> str:
        amount = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        return f"{amount}, mode={self.mode!r}, absolute={self.absolute}"
