"""Builds pyprune._C from csrc/: CPU kernels always, CUDA kernels when torch has CUDA and nvcc
is found. PYPRUNE_CUDA=0/1 overrides the detection (1 fails loudly when CUDA cannot be built).
PYPRUNE_COMPILE_CHECK=1 compiles the C++ host code at -O0: a build that is only compiled, loaded
and read (make check-cuda), never run; its CPU sources compile in about half the time. The device
code's SASS is the same (nvcc's -O is the host's; the device code is optimised unless -G).

The project's metadata is in pyproject.toml; this file holds what depends on the torch that
builds: the extension, and the torch requirement. pyprune._C links against that torch's C++ ABI
and loads only with the same torch release (a 2.13 build under 2.11: undefined symbol), so a
built package requires torch==<major>.<minor>.* of its build torch and records that torch in
pyprune/_build_info.py, which pyprune/__init__.py checks before loading _C. Build without
isolation (pip install --no-build-isolation .) so that the build torch is the installed one."""
import glob
import os
import re

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def want_cuda() -> bool:
    flag = os.environ.get("PYPRUNE_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not possible:
        raise RuntimeError(
            "PYPRUNE_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return possible if flag is None else flag == "1"


def torch_requirement() -> str:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return f"torch=={major}.{minor}.*"


class BuildExtensionRecordingTorch(BuildExtension):
    """Writes pyprune/_build_info.py (the build torch's version) next to the built _C. In-place
    builds (make build, make gpu) write nothing: they run with the torch that built them, and
    the source tree stays free of generated files (MANIFEST.in keeps it out of the sdist too)."""

    def run(self):
        super().run()
        if self.inplace:
            return
        path = os.path.join(self.build_lib, "pyprune", "_build_info.py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write('"""Written by setup.py when pyprune._C was built; checked on import."""\n'
                    f"TORCH_VERSION = {str(torch.__version__)!r}\n"
                    f"TORCH_CUDA = {torch.version.cuda!r}\n")

    def get_outputs(self):
        outputs = super().get_outputs()
        if not self.inplace:
            outputs.append(os.path.join(self.build_lib, "pyprune", "_build_info.py"))
        return outputs


cuda = want_cuda()
# csrc/cpu/avx2/ holds the AVX2 builds of the CPU kernels (csrc/cpu/isa.h).
sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/cpu/avx2/*.cpp"))
# py_limited_api=True makes torch's BuildExtension define Py_LIMITED_API as its oldest supported
# CPython (0x030A0000, 3.10, in torch 2.11 to 2.14) for every unit; the wheel's abi3 tag below
# names the same version. _C uses only PyModule_Create from Python's C API.
# -g0 overrides the -g of Python's own CFLAGS: debug info of torch's headers doubles the compile
# time and makes a 28 MB library (1.5 MB without).
opt = "-O0" if os.environ.get("PYPRUNE_COMPILE_CHECK") == "1" else "-O3"
cxx = [opt, "-g0", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
extra = {"cxx": cxx}
if cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = [opt, "--expt-relaxed-constexpr", "-lineinfo"]
Extension = CUDAExtension if cuda else CppExtension

setup(
    packages=["pyprune", "pyprune.ops", "pyprune.nn", "pyprune.triton_kernels"],
    package_dir={"pyprune.triton_kernels": "triton_kernels"},
    ext_modules=[
        Extension(
            "pyprune._C",
            sources,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtensionRecordingTorch},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    install_requires=[torch_requirement()],
)
