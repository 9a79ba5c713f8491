"""Triton kernels and their launchers, one module per op (installed as pyprune.triton_kernels).

Each module declares the variants its launchers can launch in a list ``AOT``, which
``python -m pyprune.triton_kernels.aot`` compiles for sm_80 and sm_90 without a GPU. On CPU
tensors the kernels run only under TRITON_INTERPRET=1, set before triton is imported.
"""
