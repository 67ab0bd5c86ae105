"""Triton kernels for FLy verification (installed as ``fly_vllm.kernels``)."""
