"""Builds pyprune._C from csrc/: CPU kernels always, CUDA kernels when torch has CUDA and nvcc
is found. PYPRUNE_CUDA=0/1 overrides the detection (1 fails loudly when CUDA cannot be built)."""
import glob
import os

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


cuda = want_cuda()
# csrc/cpu/avx2/ holds the AVX2 builds of the CPU kernels (csrc/cpu/isa.h).
sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/cpu/avx2/*.cpp"))
cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
extra = {"cxx": cxx}
if cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
Extension = CUDAExtension if cuda else CppExtension

setup(
    name="pyprune",
    version="0.1.0",
    description="Fused kernels for k-WTA, stochastic activation pruning, CAS and masked convolution",
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
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],  # the oldest torch check-cuda builds against
)
