"""The one place user arguments are checked, before any kernel runs.

Every message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(x: object, name: str, *, min_dim: int = 0, dim: int | None = None) -> Tensor:
    """x must be a floating-point Tensor with at least min_dim (or exactly dim) dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}"
        )
    return x


def generator(value: object, device: torch.device) -> torch.Generator | None:
    """None or a torch.Generator of device's type."""
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__}")
    if torch.device(value.device).type != device.type:
        raise ValueError(
            f"generator must be on x's device type {device.type}, got a {value.device} generator"
        )
    return value


def same_device(**tensors: Tensor | None) -> None:
    """All given tensors must be on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")


def choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(value: object, name: str) -> int:
    if type(value) is int:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def count_from_ratio_or_k(
    ratio: object, k: object, group_size: int, *, ratio_name: str = "ratio", group: str = "group"
) -> int:
    """Exactly one of ratio and k; k = int(ratio * group_size) or k; k in [1, group_size]."""
    if group_size <= 0:
        raise ValueError(f"x's {group} is empty (size {group_size}); nothing to select from")
    if (ratio is None) == (k is None):
        raise ValueError(f"give exactly one of {ratio_name} and k, got {ratio_name}={ratio!r}, k={k!r}")
    if k is None:
        r = real(ratio, ratio_name)
        if not 0.0 < r < math.inf:
            raise ValueError(f"{ratio_name} must be in (0, 1], got {r}")
        count = torch.sym_int(r * group_size)  # symbolic under dynamic shapes, no guard
        if not 1 <= count <= group_size:  # k's range; a ratio just above 1 may still give k <= size
            bound = f"must be >= {1 / group_size:.3g}" if count < 1 else "must be <= 1"
            raise ValueError(
                f"{ratio_name}={r} keeps int({r} * {group_size}) = {count} elements of a {group} "
                f"of {group_size}; {ratio_name} {bound}"
            )
        return count
    count = integer(k, "k")
    if not 1 <= count <= group_size:
        raise ValueError(f"k must be in [1, {group_size}] (the {group} size), got {count}")
    return count


def host_reads_free(t: Tensor) -> bool:
    """Whether reading t's values on the host costs no synchronisation: on the CPU only. The one
    place argument checks decide between an eager host read and a check on the device."""
    return t.device.type == "cpu"


def label_range(label: Tensor | None, classes: int, name: str = "label") -> None:
    """Class indices in [0, classes). CPU labels are read eagerly (a ValueError naming the bad
    value); elsewhere, and while tracing for torch.compile, the check is an asynchronous assert
    on the device (a RuntimeError when it runs on the CPU, a device assert on CUDA, capturable
    in a CUDA graph), so the host never waits for the labels. Under a functorch transform
    (vmap), the labels of every batch entry at once: the tensor the transform wraps (neither a
    host read nor an assert works on the wrapper)."""
    if label is None or label.numel() == 0:
        return
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (the compiler traces the transforms itself)
        while torch._C._functorch.is_functorch_wrapped_tensor(label):
            label = torch._C._functorch.get_unwrapped(label)
    if compiling or not host_reads_free(label):
        torch._assert_async(((label >= 0) & (label < classes)).all(),
                            f"{name} values must be in [0, {classes})")
        return
    lo, hi = (int(v) for v in torch.aminmax(label))
    if lo < 0 or hi >= classes:
        raise ValueError(f"{name} values must be in [0, {classes}), got {lo if lo < 0 else hi}")
