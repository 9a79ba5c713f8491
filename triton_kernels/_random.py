"""Counter-based randomness for the Triton kernels: the stream of csrc/random.h, value for value.

Value i of a call comes from word i & 3 of Philox4x32-10(key, counter = (i >> 2, stream)), with
(key, stream) the call's int64 seed tensor, read from device memory. tl.philox is the same
Philox4x32-10 as csrc/random.h, so uniforms (top 24 bits, exact in float32) and keep decisions
match the CPU and CUDA kernels bit for bit; values that go through log/cos (exponentials,
normals) match to a few ulps (libm vs libdevice, and cos/sin by polynomial: _cos_sin_2pi).
"""
import triton
import triton.language as tl


@triton.jit
def load_seed(seed_ptr):
    """(key, stream) of the call."""
    return tl.load(seed_ptr), tl.load(seed_ptr + 1)


@triton.jit
def _words(key, stream, idx):
    """The four Philox words of the evaluation holding value ``idx`` (int64 block), and idx & 3."""
    block = idx >> 2
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s0 = c0 * 0 + (stream & 0xFFFFFFFF).to(tl.uint32)
    s1 = c0 * 0 + ((stream >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(key, c0, c1, s0, s1)
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
def _cos_sin_2pi(u):
    """(cos, sin)(2 pi u) for u in [0, 1), within 1e-7. tl.cos and tl.sin (libdevice) carry a
    large-argument reduction that keeps a 32-byte local array on the GPU; here the quarter turn
    q = round(4 u) and r = u - q / 4 in [-1/8, 1/8] are exact, and the polynomials of cos and sin
    at 2 pi r (|2 pi r| <= pi / 4) are their Taylor series to 1e-10."""
    q = (u * 4.0 + 0.5).to(tl.int32)
    a = (u - q.to(tl.float32) * 0.25) * 6.283185307179586
    a2 = a * a
    s = a + a * a2 * (-1.0 / 6 + a2 * (1.0 / 120 + a2 * (-1.0 / 5040 + a2 * (1.0 / 362880))))
    c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24 + a2 * (-1.0 / 720 + a2 * (1.0 / 40320
                                                                    + a2 * (-1.0 / 3628800)))))
    q = q & 3
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos, sin


@triton.jit
def normal(key, stream, idx):
    """N(0, 1) for value idx: Box-Muller on the word pair (0, 1) or (2, 3) of its evaluation."""
    w0, w1, w2, w3, lane = _words(key, stream, idx)
    first = lane < 2
    u0 = _to_uniform(tl.where(first, w0, w2))
    u1 = _to_uniform(tl.where(first, w1, w3))
    radius = tl.sqrt(-2.0 * tl.log(1.0 - u0))
    cos, sin = _cos_sin_2pi(u1)
    return tl.where((lane & 1) == 0, radius * cos, radius * sin)


@triton.jit
def normal4(key, stream, evaluation):
    """The four N(0, 1) values 4 e .. 4 e + 3 of evaluation e (int64 tensor): one Philox
    evaluation, one log, one square root and one (cos, sin) per Box-Muller pair."""
    c0 = (evaluation & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((evaluation >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s0 = c0 * 0 + (stream & 0xFFFFFFFF).to(tl.uint32)
    s1 = c0 * 0 + ((stream >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(key, c0, c1, s0, s1)
    r01 = tl.sqrt(-2.0 * tl.log(1.0 - _to_uniform(w0)))
    r23 = tl.sqrt(-2.0 * tl.log(1.0 - _to_uniform(w2)))
    cos01, sin01 = _cos_sin_2pi(_to_uniform(w1))
    cos23, sin23 = _cos_sin_2pi(_to_uniform(w3))
    return r01 * cos01, r01 * sin01, r23 * cos23, r23 * sin23
