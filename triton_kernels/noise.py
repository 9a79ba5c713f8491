"""Gaussian noise Triton kernel and launcher (contract: csrc/cpu/noise.cpp, csrc/random.h).

x is a 1-D view with any stride; value i of the seed's Philox stream perturbs element i.
One elementwise launch: out = x + std * n, or x * (1 + std * n) when multiplicative.

A program takes BLOCK Philox evaluations, i.e. 4 * BLOCK consecutive elements: one Philox per
four values (_random.normal4), one radius (a log1p polynomial and a square root) and one
(cos, sin) pair of polynomials per Box-Muller pair, std folded into the radius; the four normals
of an evaluation are joined into a (BLOCK, 4) tile, so a thread holds four consecutive elements
and a unit-stride x moves in 16-byte (float32) or 8-byte (16-bit types) vectors. Triton
specializes unit strides and 16-byte aligned pointers itself. Offsets are int32 unless one
reaches 2^31 (WIDE: int64); additive and multiplicative are separate variants (a constexpr).
About 39 instructions an element in the sm_90 SASS of the unit-stride float32 variant.

Bytes: one pass, numel * itemsize read + numel * itemsize written (plus the 16-byte seed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._random import SEED_WORDS, load_seed, normal4, seed_args
from .cas import _round, cdiv, on_device

_BLOCK = 512  # Philox evaluations per program: 2048 elements
_NUM_WARPS = 4
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INT32_END = 2**31  # element offsets below this: int32 index arithmetic


@triton.jit(do_not_specialize=SEED_WORDS)
def _noise_kernel(
    x_ptr, out_ptr, seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1,
    numel, x_s, out_s, std,
    BLOCK: tl.constexpr,
    MULTIPLICATIVE: tl.constexpr,
    WIDE: tl.constexpr,
):
    if WIDE:  # offsets past 2^31 - 1
        evaluation = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        evaluation = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, stream = load_seed(seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1)
    # std * n: std scales each pair's radius (one multiply per two values).
    # int64 offsets: tl.philox's rounds (with the widening multiplies ptxas spills a register
    # of the 16-bit additive kernel).
    n0, n1, n2, n3 = normal4(key, stream, evaluation, std, not WIDE)
    # join(a, b) stacks on a new last axis: ((n0, n2), (n1, n3)) -> (B, 2, 2) = n0 n1 n2 n3.
    e = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK, 4])
    idx = evaluation[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = idx < numel
    v = tl.load(x_ptr + idx * x_s, mask=mask, other=0.0).to(tl.float32)
    if MULTIPLICATIVE:
        y = v * (1.0 + e)  # as the CPU and CUDA kernels: x = inf with std = 0 stays inf
    else:
        y = v + e
    tl.store(out_ptr + idx * out_s, _round(y, out_ptr.dtype.element_ty), mask=mask)


def _wide_offsets(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether an element offset of the launch (masked lanes of the last program included)
    reaches 2^31: the kernel then indexes in int64."""
    end = cdiv(x.numel(), 4 * _BLOCK) * 4 * _BLOCK
    return end * max(1, abs(x.stride(0)), abs(out.stride(0))) >= _INT32_END


def gaussian_noise(x: torch.Tensor, seed: torch.Tensor, std: float, multiplicative: bool, *,
                   _wide: bool | None = None, _host_seed: bool | None = None) -> torch.Tensor:
    """x + std * n (or x * (1 + std * n)), n ~ N(0, 1) from the seed's stream, element i value i;
    the seed on x's device or the host (_random.seed_args). Tests force the int64 index path with
    ``_wide=True`` and the seed's path with ``_host_seed``."""
    if x.dim() != 1:
        raise ValueError(f"gaussian_noise (triton): x must be a 1-D view, got shape {tuple(x.shape)}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"gaussian_noise (triton): x must be float32, float16 or bfloat16, got {x.dtype}")
    seed = seed_args(seed, x.device, "gaussian_noise", _host_seed)
    if not std >= 0:
        raise ValueError(f"gaussian_noise (triton): std must be >= 0, got {std}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid = (cdiv(x.numel(), 4 * _BLOCK),)
    wide = _wide_offsets(x, out) if _wide is None else _wide
    with on_device(x):
        _noise_kernel[grid](x, out, *seed, x.numel(), x.stride(0), out.stride(0), float(std),
                            BLOCK=_BLOCK, MULTIPLICATIVE=bool(multiplicative), WIDE=bool(wide),
                            num_warps=_NUM_WARPS)
    return out


def _aot_variants() -> list[tuple]:
    """The launcher's variants: per dtype, any strides and unit strides (a contiguous x; the JIT
    also specializes its 16-byte alignment and a numel divisible by 16, which the vector accesses
    need and this list cannot express), additive and multiplicative, int32 and int64 offsets."""
    variants = []
    for dtype in _TL_DTYPES.values():
        for unit in (False, True):  # the JIT turns int arguments equal to 1 into constexprs
            for multiplicative in (False, True):
                for wide in (False, True):
                    stride = "constexpr" if unit else "i32"
                    signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "seed_ptr": "*i64",
                                 **dict.fromkeys(SEED_WORDS, "i32"),
                                 "numel": "i64" if wide else "i32", "x_s": stride, "out_s": stride,
                                 "std": "fp32", "BLOCK": "constexpr", "MULTIPLICATIVE": "constexpr",
                                 "WIDE": "constexpr"}
                    constexprs = {"BLOCK": _BLOCK, "MULTIPLICATIVE": multiplicative, "WIDE": wide,
                                  **({"x_s": 1, "out_s": 1} if unit else {})}
                    variants.append((_noise_kernel, signature, constexprs, {"num_warps": _NUM_WARPS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
