"""Backend registry: which implementations exist, which can run here, and which one an op uses.

Backends:
  reference  eager PyTorch (pyprune.reference), every device and dtype
  cpu        C++ kernels in csrc/cpu, CPU tensors
  cuda       CUDA kernels in csrc/cuda, CUDA tensors (when pyprune was built with CUDA)
  triton     Triton kernels in triton_kernels/, CUDA tensors, or CPU tensors under
             TRITON_INTERPRET=1 (correctness only)

Choice, highest priority first: the innermost ``with pyprune.use_backend(name)``, then the
``PYPRUNE_BACKEND`` environment variable (read at import), then ``auto``: the fastest measured
backend for the op and device (``AUTO``). A forced backend that cannot run the call raises; none
falls back silently.

The forced backend is per thread and per asyncio task (a ContextVar): ``use_backend`` in one
thread or task does not change another's. The choice is made in Python when an op is called, so
under torch.compile it is fixed at trace time; dynamo cannot read a ContextVar, so traced code
reads a per-thread mirror of it (dynamo guards on it, so a compiled function called under
another ``use_backend`` recompiles). The mirror follows ``use_backend`` blocks and every eager
call; asyncio tasks that interleave inside ``use_backend`` blocks on one thread should call
their compiled functions from within their own block.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
from typing import Iterator

import torch

NAMES = ("reference", "cpu", "cuda", "triton")

# Fastest measured backend first, per (op, device type); see benchmarks/results/ and README.
# CUDA rows from benchmarks/results/nvidia-h200 (float32, forward and forward + backward):
# cuda is the fastest backend for kwta, sap, gaussian_noise's forward and cas in most cases.
# Triton is faster in the k-WTA forward of 128x512x4x4 and of the channel mode (cuda's
# forward + backward is 1.9-2.7x faster there) and in SAP exact at 128x64x32x32 (3.91x eager
# against 3.56x forward, 2.10x against 1.91x with backward) and 128x256x8x8 forward (but 0.73x
# against 1.63x with backward), so cuda stays first; for masked_conv2d eager PyTorch
# (the reference backend: cuDNN on the masked weight) beat both the cuda kernels (0.29-0.99x
# of it forward) and the Triton ones (0.05-0.47x) in every case measured, so it comes first.
AUTO: dict[tuple[str, str], tuple[str, ...]] = {
    ("kwta", "cpu"): ("cpu", "reference"),
    ("kwta", "cuda"): ("cuda", "triton", "reference"),
    ("sap", "cpu"): ("cpu", "reference"),
    ("sap", "cuda"): ("cuda", "triton", "reference"),
    ("gaussian_noise", "cpu"): ("cpu", "reference"),
    ("gaussian_noise", "cuda"): ("cuda", "triton", "reference"),
    ("magnitude_mask", "cpu"): ("cpu", "reference"),
    ("magnitude_mask", "cuda"): ("cuda", "triton", "reference"),
    ("cas", "cpu"): ("cpu", "reference"),
    ("cas", "cuda"): ("cuda", "triton", "reference"),
    ("masked_conv2d", "cpu"): ("cpu", "reference"),
    ("masked_conv2d", "cuda"): ("reference", "cuda", "triton"),
}

# Dtypes each compiled backend handles; reference handles all floating dtypes.
DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}

_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _read_env() -> str:
    name = os.environ.get("PYPRUNE_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in NAMES:
        raise ValueError(
            f"PYPRUNE_BACKEND must be 'auto' or one of {NAMES}, got {name!r}"
        )
    return name


_DEFAULT = _read_env()
# The innermost forced backend of this thread / asyncio task.
_forced: contextvars.ContextVar[str] = contextvars.ContextVar("pyprune_backend", default=_DEFAULT)


class _Mirror(threading.local):
    """The ContextVar's value for this thread, which dynamo can trace and guard on."""

    name = _DEFAULT


_mirror = _Mirror()


from . import _C  # noqa: E402,F401  (loading the extension registers the ops)

# Read once: dynamo cannot trace this query, and the answer is fixed by the build.
_CUDA_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("pyprune::kwta", "CUDA")


def unavailable_reason(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (a device type), or None if it can."""
    if name not in NAMES:
        return f"unknown backend {name!r}; expected one of {NAMES}"
    if name == "reference":
        return None
    if name == "cpu":
        return None if device == "cpu" else f"the cpu backend runs CPU tensors, got {device}"
    if name == "cuda":
        if device != "cuda":
            return f"the cuda backend runs CUDA tensors, got {device}"
        if not _CUDA_BUILT:
            return "pyprune was built without CUDA kernels (CPU-only torch or no nvcc at build)"
        return None
    if not _HAS_TRITON:
        return "triton is not installed"
    if device == "cuda":
        return None
    if device == "cpu":
        return None if _TRITON_INTERPRET else "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"triton does not run on {device} tensors"


def backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends usable for tensors on ``device``.

    >>> pyprune.backends("cpu")
    ['reference', 'cpu']
    """
    kind = torch.device(device).type
    return [n for n in NAMES if unavailable_reason(n, kind) is None]


def cpu_isa() -> str:
    """The instruction set pyprune's CPU kernels run with: 'avx2' (AVX2 + FMA, chosen when the
    processor has it) or 'baseline'. ``PYPRUNE_CPU_ISA=baseline`` forces the baseline kernels;
    both give the same results (elementwise bit for bit, the same random streams)."""
    return torch.ops.pyprune._cpu_isa()


def backend_status(device: str | torch.device = "cpu") -> dict[str, str]:
    """Every backend with 'ok' or the reason it cannot run on ``device``."""
    kind = torch.device(device).type
    return {n: unavailable_reason(n, kind) or "ok" for n in NAMES}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every pyprune op called inside the block onto backend ``name`` ('auto' restores
    the automatic choice).

    >>> with pyprune.use_backend("reference"):
    ...     y = pyprune.kwta(x, 0.1)
    """
    if name != "auto" and name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    token = _forced.set(name)
    _mirror.name = name
    try:
        yield
    finally:
        _forced.reset(token)
        _mirror.name = _forced.get()


def current() -> str:
    """The backend forced by the innermost use_backend of this thread or task, or
    PYPRUNE_BACKEND, or 'auto'."""
    if torch.compiler.is_compiling():
        return _mirror.name
    name = _mirror.name = _forced.get()
    return name


def select(op: str, x: torch.Tensor) -> str:
    """The backend that runs ``op`` on ``x``: forced, or the first usable one in AUTO.

    Raises RuntimeError when a forced backend cannot run on x's device or dtype.
    """
    device = x.device.type
    name = current()
    if name == "auto":
        for candidate in AUTO.get((op, device), ("reference",)):
            if unavailable_reason(candidate, device) is None and (
                candidate == "reference" or x.dtype in DTYPES[candidate]
            ):
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"pyprune.{op}: backend {name!r} cannot run here: {reason}")
    if name != "reference" and x.dtype not in DTYPES[name]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in DTYPES[name])
        raise RuntimeError(
            f"pyprune.{op}: backend {name!r} supports dtypes {allowed}; got {x.dtype}"
        )
    return name
