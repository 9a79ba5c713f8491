from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, _validate
from ..ops.kwta import kwta
from ..ops.masked_conv import masked_conv2d

_MASKS = ("in_mask", "out_mask", "weight_mask")
_UNCHANGED = object()


class MaskedConv2d(nn.Conv2d):
    """nn.Conv2d whose masks skip work (see pyprune.masked_conv2d).

    Buffers ``in_mask`` ((C_in,) or (N, C_in)), ``out_mask`` ((C_out,) or (N, C_out)) and
    ``weight_mask`` (weight's shape) are None by default and set by assignment or
    ``set_masks``; they are saved in the state_dict. Bool masks are structural (a 25% channel
    keep does a quarter of the convolution), float masks multiply and receive gradients.

    With static bool channel masks and no gradient needed (inference), each call runs just the
    smaller convolution on the kept rows and columns of the weight, gathered anew (a copy of
    the kept weights, so in-place, ``.data`` and dtype changes of the parameters are always
    seen). The kept channel indices are recomputed per call on the CPU; on other devices, where
    that would synchronize with the host, they are cached per mask (storage, version, layout,
    dtype): a mask assigned anew or changed in place is seen, one changed in place through
    ``.data`` (which bypasses the version counter) is not.

    A sparse bool ``weight_mask`` (unstructured pruning) runs on the CPU as a direct sparse
    convolution over the kept weights, forward and backward, where few enough are kept to pay
    (``pyprune.convert(model, conv=True)`` makes these from ``torch.nn.utils.prune``'s masks);
    the Triton backend skips the 16x16 channel tiles it empties (block pruning).

    >>> conv = MaskedConv2d.from_conv(model.layer1[0].conv1)
    >>> conv.out_mask = conv.weight.detach().abs().sum((1, 2, 3)) > 0.1    # channel pruning
    >>> conv.weight_mask = pyprune.magnitude_mask(conv.weight, 0.1)        # or 90% of the weights
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in _MASKS:
            self.register_buffer(name, None)
        self._kept_cache: dict[str, tuple] = {}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "MaskedConv2d":
        """A MaskedConv2d sharing ``conv``'s parameters (no copy), with no masks."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def set_masks(self, in_mask=_UNCHANGED, out_mask=_UNCHANGED, weight_mask=_UNCHANGED) -> "MaskedConv2d":
        """Set any of the masks (None removes one); the others stay. Returns self."""
        for name, value in zip(_MASKS, (in_mask, out_mask, weight_mask)):
            if value is _UNCHANGED:
                continue
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
            setattr(self, name, value)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Masks are None until set: take them from the state dict whatever they were here.
        for name in _MASKS:
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = state_dict[key].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _compact_path(self, x: Tensor) -> bool:
        if (torch.compiler.is_compiling() or self.groups != 1 or self.weight_mask is not None
                or self.in_channels == 0 or self.out_channels == 0):
            return False
        if self.in_mask is None and self.out_mask is None:
            return False
        for m in (self.in_mask, self.out_mask):
            if m is not None and (m.dtype != torch.bool or m.dim() != 1):
                return False
        if torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        ):
            return False
        return _backend.select("masked_conv2d", x) in ("cpu", "cuda")

    def _kept(self, name: str) -> Tensor | None:
        mask = getattr(self, name)
        if mask is None:
            return None
        if _validate.host_reads_free(mask):
            return mask.nonzero().view(-1)
        storage = mask.untyped_storage()
        key = (storage.data_ptr(), mask.storage_offset(), mask._version, tuple(mask.shape),
               mask.stride(), mask.dtype, mask.device)
        cached = self._kept_cache.get(name)
        if cached is None or cached[0] != key:
            # The entry holds the storage, so no later mask can be allocated at its address
            # and match the key.
            cached = (key, storage, mask.nonzero().view(-1))
            self._kept_cache[name] = cached
        return cached[2]

    def _compacted(self) -> tuple:
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        in_idx, out_idx = self._kept("in_mask"), self._kept("out_mask")
        if out_idx is not None:
            w = w.index_select(0, out_idx)
            b = None if b is None else b.index_select(0, out_idx)
        if in_idx is not None:
            w = w.index_select(1, in_idx)
        return w, b, in_idx, out_idx

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if self._compact_path(_validate.tensor(x, "x", dim=4)):
            if x.shape[1] != self.in_channels:
                raise ValueError(f"x must have {self.in_channels} channels, got shape "
                                 f"{tuple(x.shape)}")
            if x.dtype != self.weight.dtype:
                raise TypeError(f"x must have the weight's dtype {self.weight.dtype}, got {x.dtype}")
            w, b, in_idx, out_idx = self._compacted()
            if padding == 0:
                padding = (0, 0)
            pad = padding if isinstance(padding, tuple) and len(padding) == 2 else None
            if pad is not None:  # (a 'same' / 'valid' padding string takes the general path)
                return torch.ops.pyprune._channel_conv(x, w, b, list(self.stride), list(pad),
                                                       list(self.dilation), in_idx, out_idx,
                                                       self.out_channels)
        return masked_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                             self.groups, in_mask=self.in_mask, out_mask=self.out_mask,
                             weight_mask=self.weight_mask)

    def extra_repr(self) -> str:
        masks = [f"{n}={tuple(getattr(self, n).shape)}" for n in _MASKS if getattr(self, n) is not None]
        return super().extra_repr() + ("" if not masks else ", " + ", ".join(masks))


class ChannelGate(nn.Module):
    """Per-sample output-channel gating as in Feature Boosting and Suppression (Gao et al., 2019).

    ``forward(x) -> (out_mask, scale)``: the channel saliency ``s = relu(fc(mean_hw(|x|)))``
    of shape (N, out_channels), the top ``k = max(1, int(keep_ratio * out_channels))`` channels
    of each sample kept by the k-WTA kernel (ties kept). ``out_mask`` is the bool (N,
    out_channels) mask for ``masked_conv2d`` and ``scale`` the kept saliencies (zero elsewhere),
    which FBS multiplies into the output and through which the gate learns:

    >>> gate = ChannelGate(128, 128, keep_ratio=0.25)
    >>> mask, scale = gate(x)
    >>> y = pyprune.masked_conv2d(x, w, padding=1, out_mask=mask) * scale[:, :, None, None]
    """

    def __init__(self, in_channels: int, out_channels: int, keep_ratio: float) -> None:
        super().__init__()
        in_channels = _validate.integer(in_channels, "in_channels")
        out_channels = _validate.integer(out_channels, "out_channels")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, "
                             f"{out_channels}")
        keep_ratio = _validate.real(keep_ratio, "keep_ratio")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.in_channels, self.out_channels, self.keep_ratio = in_channels, out_channels, keep_ratio
        self.k = max(1, int(keep_ratio * out_channels))
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.kaiming_uniform_(self.fc.weight, a=math.sqrt(5))
        nn.init.constant_(self.fc.bias, 1.0)  # every channel salient at the start, as FBS

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _validate.tensor(x, "x", dim=4)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got {x.shape[1]}")
        saliency = F.relu(self.fc(x.abs().mean((2, 3))))
        scale = kwta(saliency, k=self.k)
        return scale != 0, scale

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, keep_ratio={self.keep_ratio}"
