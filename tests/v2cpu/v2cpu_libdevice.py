"""Interpretable stand-ins for libdevice calls vLLM's V2 kernels make (test
harness only; see sitecustomize.py)."""

import triton
import triton.language as tl


@triton.jit
def log1p(x):
    return tl.log(1.0 + x)
