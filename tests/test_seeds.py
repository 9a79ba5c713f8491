"""The seeds of the random ops (SAP, gaussian_noise): drawn on the host for eager CUDA calls,
else by torch.randint on the device (pyprune/ops/_random.py), and the kernels' two ways to take
them (from device memory, or by value from a host seed tensor)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyprune
from pyprune.ops import _random

from .conftest import HAS_CUDA, TRITON_INTERPRET

CUDA0 = torch.device("cuda", 0)


class _Generator:
    """The three methods a host draw calls on a CUDA torch.Generator, on a machine with no GPU."""

    def __init__(self, seed: int, offset: int = 0, device=CUDA0):
        self.device, self.seed, self.offset = device, seed, offset

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        assert offset % 4 == 0, "torch's CUDA generator takes multiples of 4"
        self.offset = offset


@pytest.fixture
def not_capturing():
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
        yield


def test_host_draw_takes_the_generators_seed_and_offset(not_capturing):
    gen = _Generator(seed=2**64 - 5, offset=40)
    first = _random.draw_seed(CUDA0, gen)
    second = _random.draw_seed(CUDA0, gen)
    assert first.device.type == "cpu" and first.dtype == torch.int64 and first.shape == (2,)
    key = _random.host_key(2**64 - 5)
    assert first.tolist() == [key, 40] and second.tolist() == [key, 44]
    assert gen.offset == 48
    # Reseeding reproduces the stream: the same key, the offset back to 0.
    again = _random.draw_seed(CUDA0, _Generator(seed=2**64 - 5))
    assert again.tolist() == [key, 0]


def test_host_key():
    keys = [_random.host_key(s) for s in (0, 1, 2, 42, 2**63, 2**64 - 1)]
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert len(set(keys)) == len(keys)
    assert _random.host_key(42) != 42 and _random.host_key(42) == keys[3]
    # splitmix64 of 0 + the golden-ratio constant: its published first output.
    assert _random.host_key(0) == 0xE220A8397B1DCDAF - 2**64


def test_device_draw_where_the_host_may_not(not_capturing):
    """Capture, dynamo, torch.func transforms, dispatch modes and a generator of another device
    draw on the device (torch.randint), so each sees (and can record) the draw."""
    gen = _Generator(seed=1)
    assert _random._host_draw(CUDA0, gen) and _random._host_draw(CUDA0, None)
    assert not _random._host_draw(CUDA0, _Generator(1, device=torch.device("cuda", 1)))
    # torch.Generator("cuda") has no device index: it serves the current device, on the host.
    assert _random._host_draw(CUDA0, _Generator(1, device=torch.device("cuda")))
    assert not _random._host_draw(CUDA0, _Generator(1, device=torch.device("cpu")))
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True):
        assert not _random._host_draw(CUDA0, gen)
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        assert not _random._host_draw(CUDA0, gen)
    with TorchDispatchMode():
        assert not _random._host_draw(CUDA0, gen)
    seen = []
    torch.func.vmap(lambda t: seen.append(_random._host_draw(CUDA0, gen)) or t)(torch.ones(2))
    torch.func.grad(lambda t: seen.append(_random._host_draw(CUDA0, gen)) or t.sum())(torch.ones(2))
    assert seen == [False, False]
    # The CPU draws with randint on its generator, as before.
    cpu = torch.Generator().manual_seed(3)
    a = _random.draw_seed(torch.device("cpu"), cpu)
    expected = torch.randint(-(2**62), 2**62, (2,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, expected)


SEEDS = [(0, 0), (1, 16), (-5, 2**40 + 3), (-(2**63), 2**63 - 1), (2**31, -(2**31))]


def _interpreter():
    if not TRITON_INTERPRET:
        pytest.skip("needs the Triton interpreter")


@pytest.mark.triton
@pytest.mark.parametrize("seed", SEEDS, ids=str)
def test_triton_noise_seed_by_value(seed):
    """A seed passed by value (as four 32-bit words) gives the values of the same seed read from
    memory, for every bit pattern of key and stream."""
    _interpreter()
    from pyprune.triton_kernels import noise

    x = torch.randn(1001)
    seed = torch.tensor(seed)
    for mult in (False, True):
        memory = noise.gaussian_noise(x, seed, 0.5, mult, _host_seed=False)
        by_value = noise.gaussian_noise(x, seed, 0.5, mult, _host_seed=True)
        assert torch.equal(memory, by_value)
        torch.testing.assert_close(by_value, torch.ops.pyprune.gaussian_noise(x, seed, 0.5, mult),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("seed", SEEDS, ids=str)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_triton_sap_seed_by_value(seed, exact):
    _interpreter()
    from pyprune.triton_kernels import sap

    x = torch.randn(3, 700).abs()
    grad = torch.randn(3, 700)
    seed = torch.tensor(seed)
    for src in (x, grad):  # forward, backward
        memory = sap.sap_forward(src, x, seed, 300, exact, _host_seed=False)
        by_value = sap.sap_forward(src, x, seed, 300, exact, _host_seed=True)
        assert torch.equal(memory, by_value)
        kept = memory != 0
        assert kept.any() and not kept.all()
    # The same kept set as the CPU kernel (bernoulli: the uniforms agree bit for bit).
    if not exact:
        assert torch.equal(memory != 0, torch.ops.pyprune.sap(x, seed, 300, False) != 0)


# On a GPU: eager calls seed on the host, both backends alike.

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_eager_seed_on_the_host(backend):
    x = torch.rand(4, 5000, device="cuda") + 0.1
    gen = torch.Generator("cuda").manual_seed(11)
    with pyprune.use_backend(backend):
        start = gen.get_offset()
        a = pyprune.gaussian_noise(x, 0.5, generator=gen)
        b = pyprune.sap(x, generator=gen)
        assert gen.get_offset() == start + 8  # 4 a call, no kernel drew it
        gen.manual_seed(11)
        assert torch.equal(a, pyprune.gaussian_noise(x, 0.5, generator=gen))
        assert torch.equal(b, pyprune.sap(x, generator=gen))
    # What each backend drew from seed 11: the same stream.
    seed = torch.tensor([_random.host_key(11), 0])
    noise = torch.ops.pyprune.gaussian_noise(x.flatten(), seed, 0.5, False)
    torch.testing.assert_close(a.flatten(), noise, rtol=1e-5, atol=1e-5)
