"""Gaussian noise Triton kernel and launcher (contract: csrc/cpu/noise.cpp, csrc/random.h).

x is a 1-D view with any stride; value i of the seed's Philox stream perturbs element i.
One elementwise launch: out = x + std * n, or x * (1 + std * n) when multiplicative.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._random import load_seed, normal
from .cas import on_device

_BLOCK = 1024
_NUM_WARPS = 4
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# `multiplicative` is an int32 flag (a bool cannot be passed: the interpreter mis-converts it).
@triton.jit(do_not_specialize=["multiplicative"])
def _noise_kernel(
    x_ptr, out_ptr, seed_ptr,
    numel, x_s, out_s, std, multiplicative,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    key, stream = load_seed(seed_ptr)
    e = std * normal(key, stream, idx)
    v = tl.load(x_ptr + idx * x_s, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(multiplicative != 0, v * (1.0 + e), v + e)
    tl.store(out_ptr + idx * out_s, y.to(out_ptr.dtype.element_ty), mask=mask)


def gaussian_noise(x: torch.Tensor, seed: torch.Tensor, std: float, multiplicative: bool) -> torch.Tensor:
    """x + std * n (or x * (1 + std * n)), n ~ N(0, 1) from the seed's stream, element i value i."""
    if x.dim() != 1:
        raise ValueError(f"gaussian_noise (triton): x must be a 1-D view, got shape {tuple(x.shape)}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"gaussian_noise (triton): x must be float32, float16 or bfloat16, got {x.dtype}")
    if seed.dtype != torch.int64 or seed.shape != (2,) or seed.device != x.device:
        raise ValueError("gaussian_noise (triton): seed must be an int64 (2,) tensor on x's device")
    if not std >= 0:
        raise ValueError(f"gaussian_noise (triton): std must be >= 0, got {std}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid = (triton.cdiv(x.numel(), _BLOCK),)
    with on_device(x):
        _noise_kernel[grid](x, out, seed, x.numel(), x.stride(0), out.stride(0), float(std),
                            int(multiplicative), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out


def _aot_variants() -> list[tuple]:
    variants = []
    for dtype in _TL_DTYPES.values():
        signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "seed_ptr": "*i64", "numel": "i32",
                     "x_s": "i32", "out_s": "i32", "std": "fp32", "multiplicative": "i32",
                     "BLOCK": "constexpr"}
        variants.append((_noise_kernel, signature, {"BLOCK": _BLOCK}, {"num_warps": _NUM_WARPS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
