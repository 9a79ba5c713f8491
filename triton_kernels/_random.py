"""Counter-based randomness for the Triton kernels: the stream of csrc/random.h, value for value.

Value i of a call comes from word i & 3 of Philox4x32-10(key, counter = (i >> 2, stream)), with
(key, stream) the call's int64 seed tensor: read from device memory, or, for a seed tensor on
the host (an eager call's, drawn without a kernel: pyprune/ops/_random.py), passed as four
32-bit kernel arguments (``seed_args``). tl.philox is the same
Philox4x32-10 as csrc/random.h, so uniforms (top 24 bits, exact in float32) and keep decisions
match the CPU and CUDA kernels bit for bit; exponentials (-log(1 - u)) match to a few ulps
(libm vs libdevice), normals to ~1e-6 (libm there; polynomials of log1p and of cos / sin here,
cheaper than libdevice's general functions: _radius, _cos_sin_2pi).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The seed words of a kernel: the 32-bit halves of (key, stream), passed by value (never
# specialized: each call has its own).
SEED_WORDS = ("seed_k0", "seed_k1", "seed_s0", "seed_s1")
_ZEROS: dict[torch.device, torch.Tensor] = {}
_CPU = torch.device("cpu")


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def seed_args(seed: torch.Tensor, device: torch.device, op: str,
              host: bool | None = None) -> tuple:
    """The kernel arguments (seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1) of ``op``'s seed
    tensor, checked: an int64 (2,) tensor on ``device`` (the launch's) or the CPU. The kernels
    read (key, stream) = the pair at seed_ptr XOR the words. A seed on ``device`` is read there
    (words 0); one on the host (``host``: default, a CPU seed for a GPU launch) goes by value,
    as 32-bit words (always typed i32, so one compiled kernel serves every seed), with seed_ptr
    a cached pair of zeros on the device (made outside any CUDA graph capture: captured calls
    draw their seed on the device)."""
    if seed.dtype != torch.int64 or seed.shape != (2,) or seed.device not in (device, _CPU):
        raise ValueError(f"{op} (triton): seed must be an int64 (2,) tensor on x's device or "
                         "the CPU")
    if host is None:
        host = seed.device.type == "cpu" and device.type != "cpu"
    if not host:
        return seed, 0, 0, 0, 0
    key, stream = seed.tolist()
    zeros = _ZEROS.get(device)
    if zeros is None:
        zeros = _ZEROS[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return (zeros, _signed32(key), _signed32(key >> 32), _signed32(stream),
            _signed32(stream >> 32))


@triton.jit
def _join64(lo, hi):
    return (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def load_seed(seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1):
    """(key, stream) of the call: the pair at seed_ptr XOR the words (``seed_args``)."""
    key = tl.load(seed_ptr) ^ _join64(seed_k0, seed_k1)
    stream = tl.load(seed_ptr + 1) ^ _join64(seed_s0, seed_s1)
    return key, stream


@triton.jit
def philox4(key, stream, evaluation, WIDENING: tl.constexpr = True):
    """The four words of Philox4x32-10(key, counter = (evaluation, stream)) for a block of
    evaluation indices (int64, or int32 where every one is below 2^31). WIDENING: the rounds
    of _philox (widening multiplies), else tl.philox's; the same words either way (a kernel
    whose registers ptxas allocates worse with the former takes the latter)."""
    if evaluation.dtype == tl.int64:
        c0 = (evaluation & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((evaluation >> 32) & 0xFFFFFFFF).to(tl.uint32)
    else:
        c0 = evaluation.to(tl.uint32, bitcast=True)
        c1 = c0 * 0
    s0 = c0 * 0 + (stream & 0xFFFFFFFF).to(tl.uint32)
    s1 = c0 * 0 + ((stream >> 32) & 0xFFFFFFFF).to(tl.uint32)
    if WIDENING:
        return _philox(c0, c1, s0, s1, (key & 0xFFFFFFFF).to(tl.uint32),
                       ((key >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return tl.philox(key, c0, c1, s0, s1)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (tl.philox's rounds and constants, so the same words): each round's two
    32 x 32 -> 64-bit products as one widening multiply each (IMAD.WIDE.U32, its high and low
    words the register pair's halves) where tl.philox takes the high word (umulhi) and the low
    word (a multiply) apart: 4 lane instructions a round (2 multiplies, 2 three-way XORs), not
    6; the key's additions are uniform."""
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (p2 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p2.to(tl.uint32)
        c3 = p0.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _words(key, stream, idx):
    """The four Philox words of the evaluation holding value ``idx`` (int64 block), and idx & 3."""
    w0, w1, w2, w3 = philox4(key, stream, idx >> 2)
    return w0, w1, w2, w3, (idx & 3).to(tl.int32)


@triton.jit
def _to_uniform(bits):
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def uniform(key, stream, idx):
    """u in [0, 1) for value idx."""
    w0, w1, w2, w3, lane = _words(key, stream, idx)
    bits = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return _to_uniform(bits)


@triton.jit
def exponential(key, stream, idx):
    """Exp(1) for value idx: -log(1 - u)."""
    return -tl.log(1.0 - uniform(key, stream, idx))


@triton.jit
def _radius(bits):
    """sqrt(-2 log(1 - u)) for the uniform u of ``bits`` (uint32), within ~2e-7 relative.

    1 - u = m / 2^24 with m = 2^24 - (bits >> 8) in [1, 2^24], exact as a float. Its log is
    (e - 24) ln 2 + log1p(f), with m = 2^e (1 + f) and f in [-1/3, 1/3) taken from the float's
    bits (the mantissa around 2/3, as the usual float log reduction). -2 log1p(f) is f times a
    degree-8 polynomial (least-squares fit of float32 coefficients, relative error <= 2e-7 on
    [-1/3, 1/3]: f = -u exactly for small u, so a tiny radius keeps its relative accuracy).
    Cheaper than tl.log (libdevice), which handles zero, denormals and infinities that 1 - u
    never is. The square root is tl.sqrt (approximate, one MUFU)."""
    m = (16777216 - (bits >> 8)).to(tl.int32)
    mb = m.to(tl.float32).to(tl.int32, bitcast=True)
    d = mb - (0x3F2AAAAB + (24 << 23))  # 0x3F2AAAAB: 2/3; exponent e - 24 in the high bits
    e = (d >> 23).to(tl.float32)  # arithmetic shift
    f = ((d & 0x7FFFFF) + 0x3F2AAAAB).to(tl.float32, bitcast=True) - 1.0
    p = -0.29174235463142395
    p = 0.3125314712524414 + f * p
    p = -0.27733293175697327 + f * p
    p = 0.3273172080516815 + f * p
    p = -0.4004093408584595 + f * p
    p = 0.500219464302063 + f * p
    p = -0.6666598916053772 + f * p
    p = 0.999997615814209 + f * p
    p = -2.0 + f * p
    return tl.sqrt(e * -1.3862943611198906 + f * p)  # -2 ln 2 per unit of e


@triton.jit
def _cos_sin_2pi(bits):
    """(cos, sin)(2 pi u) for the uniform u of ``bits`` (uint32), within 6e-7. The signed
    word's top 24 bits give t = u or u - 1 (t in [-1/2, 1/2), exact), the same angle; the
    polynomials in t^2 (least-squares fits of float32 coefficients over the whole turn) need no
    quadrant selection."""
    t = (bits.to(tl.int32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)
    z = t * t
    s = -12.240636825561523
    s = 41.186065673828125 + z * s
    s = -76.57569885253906 + z * s
    s = 81.59574890136719 + z * s
    s = -41.34140396118164 + z * s
    s = 6.283182621002197 + z * s
    c = 6.559455394744873
    c = -25.991901397705078 + z * c
    c = 60.1749267578125 + z * c
    c = -85.451171875 + z * c
    c = 64.9391860961914 + z * c
    c = -19.739206314086914 + z * c
    c = 1.0 + z * c
    return c, t * s


@triton.jit
def normal(key, stream, idx):
    """N(0, 1) for value idx: Box-Muller on the word pair (0, 1) or (2, 3) of its evaluation."""
    w0, w1, w2, w3, lane = _words(key, stream, idx)
    first = lane < 2
    cos, sin = _cos_sin_2pi(tl.where(first, w1, w3))
    radius = _radius(tl.where(first, w0, w2))
    return tl.where((lane & 1) == 0, radius * cos, radius * sin)


@triton.jit
def normal4(key, stream, evaluation, scale, WIDENING: tl.constexpr = True):
    """The four N(0, 1) values 4 e .. 4 e + 3 of evaluation e (an int32 or int64 tensor; int32
    when every evaluation is below 2^31), times ``scale``: one Philox evaluation (philox4's
    WIDENING), one radius and one (cos, sin) per Box-Muller pair, the scale applied to the
    radius."""
    w0, w1, w2, w3 = philox4(key, stream, evaluation, WIDENING)
    r01 = scale * _radius(w0)
    r23 = scale * _radius(w2)
    cos01, sin01 = _cos_sin_2pi(w1)
    cos23, sin23 = _cos_sin_2pi(w3)
    return r01 * cos01, r01 * sin01, r23 * cos23, r23 * sin23
