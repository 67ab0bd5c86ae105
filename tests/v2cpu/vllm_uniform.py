"""vLLM V2's own uniform, ``tl_rand32(seed, pos)``, per row: the reference
for fly_vllm.kernels.v2_uniform (harness only: imports vLLM's Triton code)."""

import triton
import triton.language as tl
from vllm.v1.worker.gpu.sample.gumbel import tl_rand32


@triton.jit
def vllm_uniform_kernel(u_ptr, seed_ptr, state_ptr, pos_ptr):
    i = tl.program_id(0)
    seed = tl.load(seed_ptr + tl.load(state_ptr + i).to(tl.int64))
    tl.store(u_ptr + i, tl_rand32(seed, tl.load(pos_ptr + i), includes_zero=False))
