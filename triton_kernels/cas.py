"""CAS Triton kernels and launchers (contract: csrc/ops.cpp, csrc/cpu/cas.cpp).

x is an (N, K, L) view with any strides (L = H * W); weight (C, K).

Forward, one launch, one program per sample, in three phases:
  1. the channel means (stored to ``mean``); in training (a label given) the same pass writes
     out = x * weight[label];
  2. logits = mean @ weight.T + bias, in blocks of classes, stored in x's dtype; in inference the
     running argmax over the stored (rounded) logits, first index on ties, NaN largest;
  3. inference only: out = x * weight[argmax].
A sample whose (K, L) tile fits in registers (ONE_BLOCK: up to 16384 padded elements, e.g.
512x4x4 or 256x8x8) is loaded once and kept for all three phases; a larger one is streamed in
(BLOCK_K, BLOCK_L) tiles, and phase 3 rereads it (from L2, as the program just read it).

Backward, one launch over (sample, block of channels): grad_x = grad_out * weight[index] +
(grad_logits @ weight) / L, and the channel sums t of grad_out * x, from one pass over both.
The launcher then forms grad_weight = grad_logits.T @ mean + t scatter-added into the index rows,
and grad_bias = grad_logits.sum(0) (tiny (C, K) / (C,) work).

`train` and `has_bias` are runtime int32 flags, not constexprs: they cost a uniform branch, and
keep the variants to compile (and the AOT list) small. Loops over runtime bounds are `while`
loops (Triton 3.6's interpreter cannot take a runtime bound in range() with numpy >= 2.4).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .aot import signature

# Spatial tile widths: the smallest of these >= min(L, 256); channel tile = _TILE // BLOCK_L.
_BLOCK_LS = (16, 64, 256)
_TILE = 4096
# A sample whose padded (K, L) tile has at most this many elements stays in registers.
_ONE_BLOCK_MAX = 16384
_MIN_BLOCK_K = 16
# Elements of the forward's weight tile (BLOCK_C, BLOCK_K): its class block. Each class's logit
# is one sum over K whatever the block, so the block sets only the registers it takes.
_CLASS_TILE = 2048
_BWD_NUM_WARPS = 8
# Registers per thread of every CAS and masked-convolution launch (Triton's maxnreg): 128 keeps
# a block of any size at >= 25% occupancy on sm_80 / sm_90, and an explicit cap also keeps ptxas
# from spilling to reach a smaller register count of its own choosing. The tiles and warps of
# the launchers fit it without spills (make gpu-report: benchmarks/results/sm_90-resources.md).
MAX_REGS = 128
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _round(v, dtype: tl.constexpr):
    """float32 v in dtype, rounded to nearest even: the interpreter truncates float32 to
    bfloat16, so bfloat16 is rounded by hand (the same on the GPU)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)
    else:
        return v.to(dtype)


@triton.jit
def _class_block(c0, w_ptr, w_sc, w_sk, C, BLOCK_C: tl.constexpr):
    cc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    return cc, cc < C, w_ptr + cc * w_sc


@triton.jit(do_not_specialize=["train", "has_bias"])
def _cas_forward_kernel(
    x_ptr, w_ptr, b_ptr, label_ptr, out_ptr, logits_ptr, index_ptr, mean_ptr,
    K, L, C, train, has_bias,
    x_sn, x_sk, x_sl,
    out_sn, out_sk, out_sl,
    w_sc, w_sk,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    ls = tl.arange(0, BLOCK_L).to(tl.int64)
    x_base = x_ptr + n * x_sn
    out_base = out_ptr + n * out_sn
    mean_base = mean_ptr + n * K
    # Not training: label_ptr is index_ptr (unwritten yet), so nothing is read from it.
    label = tl.load(label_ptr + n, mask=train != 0, other=0)
    if train != 0:
        tl.device_assert((label >= 0) & (label < C), "cas: label out of range")
    label = tl.where(train != 0, label, 0)
    inv_l = 1.0 / L.to(tl.float32)

    # Phase 1: channel means (and the training output).
    if ONE_BLOCK:
        kmask = ks < K
        tile_mask = kmask[:, None] & (ls < L)[None, :]
        raw = tl.load(x_base + ks[:, None] * x_sk + ls[None, :] * x_sl, mask=tile_mask, other=0.0)
        s = tl.sum(raw.to(tl.float32), 1) * inv_l
        tl.store(mean_base + ks, s, mask=kmask)
        if train != 0:
            m = tl.load(w_ptr + label * w_sc + ks * w_sk, mask=kmask, other=0.0).to(tl.float32)
            tl.store(out_base + ks[:, None] * out_sk + ls[None, :] * out_sl,
                     _round(raw.to(tl.float32) * m[:, None], raw.dtype), mask=tile_mask)
    else:
        k0 = 0
        while k0 < K:
            kk = k0 + ks
            kmask = kk < K
            m = tl.load(w_ptr + label * w_sc + kk * w_sk, mask=kmask & (train != 0), other=0.0)
            acc = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)
            l0 = 0
            while l0 < L:
                ll = l0 + ls
                tile_mask = kmask[:, None] & (ll < L)[None, :]
                raw = tl.load(x_base + kk[:, None] * x_sk + ll[None, :] * x_sl, mask=tile_mask,
                              other=0.0)
                acc += raw.to(tl.float32)
                if train != 0:
                    tl.store(out_base + kk[:, None] * out_sk + ll[None, :] * out_sl,
                             _round(raw.to(tl.float32) * m.to(tl.float32)[:, None], raw.dtype),
                             mask=tile_mask)
                l0 += BLOCK_L
            tl.store(mean_base + kk, tl.sum(acc, 1) * inv_l, mask=kmask)
            k0 += BLOCK_K
        tl.debug_barrier()  # phase 2 reads the means other threads of the program stored

    # Phase 2: logits, and their running argmax (blocks come in increasing class order).
    best_v = -float("inf")
    best_i = tl.zeros([], dtype=tl.int64)
    found_nan = tl.zeros([], dtype=tl.int32)
    c0 = 0
    while c0 < C:
        cc, cmask, w_rows = _class_block(c0, w_ptr, w_sc, w_sk, C, BLOCK_C)
        if ONE_BLOCK:
            w = tl.load(w_rows[:, None] + ks[None, :] * w_sk, mask=cmask[:, None] & kmask[None, :],
                        other=0.0)
            lg = tl.sum(w.to(tl.float32) * s[None, :], 1)
        else:
            lg = tl.zeros([BLOCK_C], dtype=tl.float32)
            k0 = 0
            while k0 < K:
                kk = k0 + ks
                kmask = kk < K
                sv = tl.load(mean_base + kk, mask=kmask, other=0.0)
                w = tl.load(w_rows[:, None] + kk[None, :] * w_sk,
                            mask=cmask[:, None] & kmask[None, :], other=0.0)
                lg += tl.sum(w.to(tl.float32) * sv[None, :], 1)
                k0 += BLOCK_K
        lg += tl.load(b_ptr + cc, mask=cmask & (has_bias != 0), other=0.0).to(tl.float32)
        rounded = _round(lg, logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + n * C + cc, rounded, mask=cmask)
        v = rounded.to(tl.float32)
        is_nan = (v != v) & cmask
        nan_i = tl.min(tl.where(is_nan, cc, C), 0)
        vals = tl.where(cmask & (v == v), v, -float("inf"))
        v_max = tl.max(vals, 0)
        max_i = tl.min(tl.where(cmask & (vals == v_max), cc, C), 0)
        block_nan = nan_i < C
        take = (found_nan == 0) & (block_nan | (v_max > best_v))
        best_i = tl.where(take, tl.where(block_nan, nan_i, max_i), best_i)
        best_v = tl.where(take, v_max, best_v)
        found_nan = tl.where(block_nan, 1, found_nan)
        c0 += BLOCK_C
    index = tl.where(train != 0, label, best_i)
    tl.store(index_ptr + n, index)

    # Phase 3 (inference): scale by the predicted class's row.
    if train == 0:
        if ONE_BLOCK:
            m = tl.load(w_ptr + index * w_sc + ks * w_sk, mask=kmask, other=0.0).to(tl.float32)
            tl.store(out_base + ks[:, None] * out_sk + ls[None, :] * out_sl,
                     _round(raw.to(tl.float32) * m[:, None], raw.dtype), mask=tile_mask)
        else:
            k0 = 0
            while k0 < K:
                kk = k0 + ks
                kmask = kk < K
                m = tl.load(w_ptr + index * w_sc + kk * w_sk, mask=kmask, other=0.0).to(tl.float32)
                l0 = 0
                while l0 < L:
                    ll = l0 + ls
                    tile_mask = kmask[:, None] & (ll < L)[None, :]
                    raw = tl.load(x_base + kk[:, None] * x_sk + ll[None, :] * x_sl,
                                  mask=tile_mask, other=0.0)
                    tl.store(out_base + kk[:, None] * out_sk + ll[None, :] * out_sl,
                             _round(raw.to(tl.float32) * m[:, None], raw.dtype), mask=tile_mask)
                    l0 += BLOCK_L
                k0 += BLOCK_K


@triton.jit
def _cas_backward_kernel(
    g_ptr, x_ptr, w_ptr, gl_ptr, index_ptr, gx_ptr, t_ptr,
    K, L, C, k_blocks,
    g_sn, g_sk, g_sl,
    x_sn, x_sk, x_sl,
    gx_sn, gx_sk, gx_sl,
    w_sc, w_sk,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // k_blocks
    kk = (pid % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    kmask = kk < K
    ls = tl.arange(0, BLOCK_L).to(tl.int64)
    index = tl.load(index_ptr + n)
    tl.device_assert((index >= 0) & (index < C), "cas backward: index out of range")
    m = tl.load(w_ptr + index * w_sc + kk * w_sk, mask=kmask, other=0.0).to(tl.float32)

    # a = (grad_logits[n] @ weight[:, kk]) / L: the logits' gradient, spread over the channel.
    a = tl.zeros([BLOCK_K], dtype=tl.float32)
    c0 = 0
    while c0 < C:
        cc, cmask, w_rows = _class_block(c0, w_ptr, w_sc, w_sk, C, BLOCK_C)
        gl = tl.load(gl_ptr + n * C + cc, mask=cmask, other=0.0)
        w = tl.load(w_rows[:, None] + kk[None, :] * w_sk, mask=cmask[:, None] & kmask[None, :],
                    other=0.0)
        a += tl.sum(gl[:, None] * w.to(tl.float32), 0)
        c0 += BLOCK_C
    a = a / L.to(tl.float32)

    t = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)
    l0 = 0
    while l0 < L:
        ll = l0 + ls
        mask = kmask[:, None] & (ll < L)[None, :]
        g = tl.load(g_ptr + n * g_sn + kk[:, None] * g_sk + ll[None, :] * g_sl, mask=mask,
                    other=0.0)
        x = tl.load(x_ptr + n * x_sn + kk[:, None] * x_sk + ll[None, :] * x_sl, mask=mask,
                    other=0.0).to(tl.float32)
        g32 = g.to(tl.float32)
        t += g32 * x
        tl.store(gx_ptr + n * gx_sn + kk[:, None] * gx_sk + ll[None, :] * gx_sl,
                 _round(g32 * m[:, None] + a[:, None], g.dtype), mask=mask)
        l0 += BLOCK_L
    tl.store(t_ptr + n * K + kk, tl.sum(t, 1), mask=kmask)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context every launcher launches in: Triton launches on the current CUDA device, not
    on its arguments', so t's device is made current (CPU tensors, under the interpreter, need
    nothing)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _blocks(K: int, L: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_L) of the streamed tiles for (K, L)."""
    block_l = next((b for b in _BLOCK_LS if b >= min(L, _BLOCK_LS[-1])), _BLOCK_LS[-1])
    return _TILE // block_l, block_l


def _class_block_size(block_k: int, tile: int) -> int:
    """Classes per block for weight tiles (BLOCK_C, block_k) of about ``tile`` elements."""
    return max(2, min(64, tile // block_k))


def _forward_config(K: int, L: int) -> tuple[int, int, int, bool, int]:
    """(BLOCK_K, BLOCK_L, BLOCK_C, ONE_BLOCK, num_warps) of the forward for (K, L): 4 warps up
    to 2048 tile elements, then one per 512, at most 16 (16 to 32 elements per thread)."""
    block_k, block_l = _blocks(K, L)
    one_k = max(triton.next_power_of_2(K), _MIN_BLOCK_K)
    one_block = L <= block_l and one_k * block_l <= _ONE_BLOCK_MAX
    if one_block:
        block_k = one_k
    num_warps = min(16, max(4, block_k * block_l // 512))
    return block_k, block_l, _class_block_size(block_k, _CLASS_TILE), one_block, num_warps


def _backward_config(K: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_L, BLOCK_C) of the backward for (K, L): the streamed tiles, the channel
    block cut so that the weight tile (BLOCK_C, BLOCK_K) holds at most _TILE elements. (Each
    channel's sums are the same for any channel block; the class block orders the sum over the
    classes, so it stays as it was.)"""
    block_k, block_l = _blocks(K, L)
    block_c = _class_block_size(block_k, 2 * _TILE)
    return min(block_k, _TILE // block_c), block_l, block_c


def _check(x: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{what} (triton): expected x (N, K, L) and weight (C, K), got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype not in _TL_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"{what} (triton): x and weight must share a dtype among float32, float16, "
                        f"bfloat16, got {x.dtype} and {weight.dtype}")


def cas_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, label: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, logits, index, mean) as the pyprune::cas schema says."""
    _check(x, weight, "cas")
    N, K, L = x.shape
    C = weight.shape[0]
    out = torch.empty_like(x)
    logits = x.new_empty((N, C))
    index = x.new_empty((N,), dtype=torch.int64)
    mean = x.new_empty((N, K), dtype=torch.float32)
    if N == 0:
        return out, logits, index, mean
    if label is not None and (label.dtype != torch.int64 or label.shape != (N,)):
        raise ValueError(f"cas (triton): label must be int64 of shape ({N},)")
    # The kernel reads label[n] and bias[c] at unit stride.
    bias = bias.contiguous() if bias is not None else weight
    label = label.contiguous() if label is not None else None
    block_k, block_l, block_c, one_block, num_warps = _forward_config(K, L)
    with on_device(x):
        _cas_forward_kernel[(N,)](
            x, weight, bias, label if label is not None else index,
            out, logits, index, mean,
            K, L, C, int(label is not None), int(bias is not weight),
            *x.stride(), *out.stride(), *weight.stride(),
            BLOCK_K=block_k, BLOCK_L=block_l, BLOCK_C=block_c, ONE_BLOCK=one_block,
            num_warps=num_warps, maxnreg=MAX_REGS,
        )
    return out, logits, index, mean


def cas_backward(
    grad_out: torch.Tensor, grad_logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    index: torch.Tensor, mean: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) as the pyprune::_cas_backward schema says."""
    _check(x, weight, "cas backward")
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError("cas backward (triton): grad_out must match x's shape and dtype")
    N, K, L = x.shape
    C = weight.shape[0]
    gl = grad_logits.float().contiguous()
    grad_x = torch.empty_like(x)
    t = x.new_empty((N, K), dtype=torch.float32)
    if N > 0:
        block_k, block_l, block_c = _backward_config(K, L)
        k_blocks = triton.cdiv(K, block_k)
        with on_device(x):
            _cas_backward_kernel[(N * k_blocks,)](
                grad_out, x, weight, gl, index, grad_x, t,
                K, L, C, k_blocks,
                *grad_out.stride(), *x.stride(), *grad_x.stride(), *weight.stride(),
                BLOCK_K=block_k, BLOCK_L=block_l, BLOCK_C=block_c,
                num_warps=_BWD_NUM_WARPS, maxnreg=MAX_REGS,
            )
    grad_weight = (gl.t() @ mean).index_add_(0, index, t)
    return grad_x, grad_weight.to(weight.dtype), gl.sum(0).to(weight.dtype)


_POINTERS = {
    "label_ptr": "*i64", "index_ptr": "*i64", "mean_ptr": "*fp32", "t_ptr": "*fp32",
    "gl_ptr": "*fp32",
}


def _aot_variants() -> list[tuple]:
    """Every (kernel, signature, constexprs, options) the launchers above can launch: configs
    change only at powers of two of K and L, so sampling those covers them all."""
    sizes = [1 << i for i in range(15)]
    forward = {_forward_config(k, l) for k in sizes for l in sizes}
    backward = {_backward_config(k, l) for k in sizes for l in sizes}
    variants = []
    for dtype in _TL_DTYPES.values():
        for block_k, block_l, block_c, one_block, num_warps in sorted(forward):
            constexprs = {"BLOCK_K": block_k, "BLOCK_L": block_l, "BLOCK_C": block_c,
                          "ONE_BLOCK": one_block}
            variants.append((_cas_forward_kernel, signature(_cas_forward_kernel, dtype, constexprs, _POINTERS),
                             constexprs, {"num_warps": num_warps, "maxnreg": MAX_REGS}))
        for block_k, block_l, block_c in sorted(backward):
            constexprs = {"BLOCK_K": block_k, "BLOCK_L": block_l, "BLOCK_C": block_c}
            variants.append((_cas_backward_kernel, signature(_cas_backward_kernel, dtype, constexprs, _POINTERS),
                             constexprs, {"num_warps": _BWD_NUM_WARPS, "maxnreg": MAX_REGS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
