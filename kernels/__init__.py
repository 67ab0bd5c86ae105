"""Triton kernels for FLy and FSD verification, installed as ``fly_vllm.kernels``.

On CPU they run only under ``TRITON_INTERPRET=1`` (set it before importing
this package); vLLM on CPU uses the torch path instead. ``python -m
fly_vllm.kernels.aot`` compiles them ahead of time for H100, MI300X and MI355X
on any machine and checks what the binaries use (tests/test_kernel_compile.py).
"""

from fly_vllm.kernels.fly_verify import fly_verify_triton, row_stats
from fly_vllm.kernels.fsd_verify import fsd_row_stats, fsd_verify_triton

__all__ = ["fly_verify_triton", "fsd_row_stats", "fsd_verify_triton", "row_stats"]
