"""Negative controls for the ahead-of-time compile check, run in a process of
their own (no TRITON_INTERPRET): kernels that the compiler rejects or that
break a budget must be reported, so the check in test_kernel_compile can fail.

    python -m tests.aot_controls   -> one JSON object on stdout
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl

from fly_vllm.kernels import aot

FLAG = 2  # a plain int global: the interpreter reads it, the compiler refuses


@triton.jit
def _reads_a_global(out_ptr):
    tl.store(out_ptr, FLAG)


@triton.jit
def _runtime_loop(x_ptr, out_ptr, n):
    acc = tl.zeros([16], dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(x_ptr + i * 16 + tl.arange(0, 16))
    tl.store(out_ptr + tl.arange(0, 16), acc)


def _case(fn, kind, args):
    return aot.Case(fn, kind, "control", args, {}, {"num_warps": 4, "num_stages": 1})


def main() -> int:
    out = {}
    for target in ("sm_90a", "gfx950"):
        glob = aot.compile_case(_case(_reads_a_global, "accept", [("out_ptr", "*i32")]), target)
        loop = aot.compile_case(_case(_runtime_loop, "row", [
            ("x_ptr", "*fp32"), ("out_ptr", "*fp32"), ("n", "i32")]), target)
        out[target] = {"global": aot.check(glob), "loop": aot.check(loop),
                       "loop_count": loop.runtime_loops}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
