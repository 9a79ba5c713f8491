"""Every registered Triton kernel variant compiles ahead of time for sm_80 and sm_90.

The same compile as `python -m pyprune.triton_kernels.aot` (make check-triton), one test per
variant and architecture. No GPU is needed. It must run without TRITON_INTERPRET: the
interpreter replaces the kernels with Python functions that cannot be compiled.
"""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.triton_aot

_SKIP = None
if importlib.util.find_spec("triton") is None:
    _SKIP = "triton is not installed (pip install triton==3.6.0)"
elif os.environ.get("TRITON_INTERPRET", "0") == "1":
    _SKIP = "TRITON_INTERPRET=1 replaces kernels by Python functions; run AOT tests without it"


def _cases():
    if _SKIP is not None:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=_SKIP), id="skipped")]
    from pyprune.triton_kernels import aot

    found, _ = aot.variants()
    return [
        pytest.param(v, arch, id=f"sm_{arch}-{v.describe().replace(' ', '-')}")
        for arch in aot.ARCHS
        for v in found
    ]


@pytest.mark.parametrize("variant, arch", _cases())
def test_compiles(variant, arch):
    from pyprune.triton_kernels import aot

    compiled = aot.compile_variant(variant, arch)
    assert compiled.metadata.target.arch == arch


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_every_kernel_has_aot_entries():
    from pyprune.triton_kernels import aot

    found, missing = aot.variants()
    assert not missing, f"kernels without an entry in their module's AOT list: {missing}"
    assert found, "no Triton kernel variants registered"


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_ones_specialization_is_compiled():
    """A launch turns integer arguments equal to 1 into constants: the "ones" compile does the
    same, so a kernel that calls a tensor method on such an argument fails here, not on a GPU."""
    import triton
    import triton.language as tl

    from pyprune.triton_kernels import aot

    @triton.jit
    def _scale_kernel(x_ptr, L, BLOCK: tl.constexpr):
        lanes = tl.arange(0, BLOCK)
        tl.store(x_ptr + lanes, tl.load(x_ptr + lanes) / L.to(tl.float32))

    @triton.jit
    def _scale_ok_kernel(x_ptr, L, BLOCK: tl.constexpr):
        lanes = tl.arange(0, BLOCK)
        tl.store(x_ptr + lanes, tl.load(x_ptr + lanes) / (L * 1.0))

    for kernel, fails in ((_scale_kernel, True), (_scale_ok_kernel, False)):
        variant = aot.Variant("test", kernel, aot.signature(kernel, "fp32", {"BLOCK": 64}),
                              {"BLOCK": 64}, {"num_warps": 1})
        aot.compile_variant(variant, 90)  # as written: L a tensor
        ones = aot.with_ones(variant)
        assert ones.constexprs["L"] == 1 and ones.signature["L"] == "constexpr"
        if fails:
            with pytest.raises(Exception, match="to"):
                aot.compile_variant(ones, 90)
        else:
            aot.compile_variant(ones, 90)
