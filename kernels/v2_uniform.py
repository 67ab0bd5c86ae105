"""The uniforms of vLLM V2's probability-ratio test, for every draft row.

vLLM's model runner V2 tests a sampled draft d at position ``pos`` of a
request seeded ``seed`` as ``p(d) > u * q(d)`` with ``u = tl_rand32(seed,
pos)``: Triton's Philox ``tl.rand`` on (seed, pos), floored at the smallest
positive value it produces (``vllm/v1/worker/gpu/sample/gumbel.py``). Its
kernel stops drawing at the first rejection; FLy's deferred window reads the
native test past it, so this kernel draws the same u for every draft: the
same call on the same seed and position, with the same dtypes (int64 seeds
and positions, as vLLM stores them). One program per draft row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Smallest positive value of Triton's fp32 tl.rand (vLLM's _TL_RAND_MIN).
RAND_MIN = tl.constexpr(4.6566127342e-10)


@triton.jit
def _v2_uniform_kernel(
    u_ptr,  # [N] fp32 out
    seed_ptr,  # [max_num_reqs] int64, the requests' seeds by state index
    state_ptr,  # [N] the state index of each row's request
    pos_ptr,  # [N] int64, each row's position
):
    row = tl.program_id(0)
    state = tl.load(state_ptr + row).to(tl.int64)
    seed = tl.load(seed_ptr + state)
    pos = tl.load(pos_ptr + row)
    u = tl.maximum(tl.rand(seed, pos), RAND_MIN)
    tl.store(u_ptr + row, u)


def v2_uniforms(seeds: torch.Tensor, states: torch.Tensor, positions: torch.Tensor
                ) -> torch.Tensor:
    """[N] float32: u for each row, as vLLM V2's rejection kernel draws it.
    ``seeds`` [max_num_reqs] int64; ``states`` [N]; ``positions`` [N] int64."""
    n = positions.shape[0]
    u = torch.empty(n, dtype=torch.float32, device=positions.device)
    if n:
        _v2_uniform_kernel[(n,)](u, seeds, states.contiguous(), positions.contiguous(),
                                 num_warps=1)
    return u
