"""Helpers shared by the FLy and FSD acceptance kernels and their wrappers.

Per-backend launch choices live here (``stage_options``), so the wrappers and
the ahead-of-time compile check (``fly_vllm.kernels.aot``) use the same ones.

AMD (ROCm, gfx942 / gfx950): every kernel launches with ``num_stages=1``.
Triton's AMD software pipeliner has crashed the compiler and silently
miscompiled loops on gfx950 (AMD's own Triton kernels force ``num_stages=1``
on the affected loops as the workaround). Our only loops are the row kernels'
streaming passes over the vocabulary; they are memory-bound reductions with
one program per row and many rows in flight, so latency is hidden by
occupancy, not by prefetching the next block. NVIDIA keeps Triton's default.

Every backend: the row kernels take the vocabulary size ``V`` as a constexpr,
so their loop over V has a compile-time trip count. Loops with a runtime trip
count have been miscompiled by Triton's AMD backend (a range analysis that
took one possible trip count for all, triton-lang/triton#11312 and #11313; a
runtime-bound loop giving wrong results and faults, #11378). A model's
vocabulary is fixed, so this costs one compile per engine. ``static_range``
would also give a constant bound, but it unrolls the loop: up to 38 blocks for
a 151936-token vocabulary, each with the top-k update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fly_vllm.verifier import PLACEHOLDER_TOKEN_ID


def stage_options(backend: str) -> dict:
    """Launch options that depend on the backend ("cuda" or "hip")."""
    return {"num_stages": 1} if backend == "hip" else {}


def torch_backend() -> str:
    """"hip" on ROCm builds of torch, else "cuda" (also under the CPU
    interpreter, which ignores launch options)."""
    return "hip" if getattr(torch.version, "hip", None) else "cuda"


def new_outputs(batch: int, max_spec_len: int, num_tokens: int, device):
    """The acceptance kernels' outputs: vLLM's rows [B, S + 1] int32 filled
    with PLACEHOLDER, accepted counts [B] int64, per-draft flags [T] int32."""
    out = torch.full((batch, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32,
                     device=device)
    return (out, torch.zeros(batch, dtype=torch.int64, device=device),
            torch.zeros(num_tokens, dtype=torch.int32, device=device))


@triton.jit
def request_span(cu_ptr, b):
    """(start, n) of request ``b``'s drafts from the inclusive cumsum."""
    end = tl.load(cu_ptr + b).to(tl.int64)
    start = tl.where(b == 0, 0, tl.load(cu_ptr + b - 1, mask=b > 0, other=0).to(tl.int64))
    return start, end - start


@triton.jit
def load_drafts(cu_ptr, draft_ptr, argmax_ptr, b, V, BLOCK_S: tl.constexpr):
    """Request ``b``'s drafts as [BLOCK_S] lanes: (pos, live, t, d, argmax,
    valid, greedy native match), with ``t`` the token index of each lane."""
    start, n = request_span(cu_ptr, b)
    pos = tl.arange(0, BLOCK_S)
    live = pos < n
    t = start + pos
    d = tl.load(draft_ptr + t, mask=live, other=-1).to(tl.int64)
    amax = tl.load(argmax_ptr + t, mask=live, other=0)
    valid = live & (d >= 0) & (d < V)
    return n, pos, live, t, d, amax, valid, valid & (d == amax)


@triton.jit
def emit_row(out_ptr, num_accepted_ptr, bonus_ptr, b, pos, live, n, accepted, d,
             correction, S, BLOCK_S: tl.constexpr):
    """Write request ``b``'s vLLM output row from its [BLOCK_S] accept flags:
    the accepted prefix of drafts ``d``, then ``correction`` at the first
    rejection, or the bonus token when every draft was accepted; the rest
    stays PLACEHOLDER (the caller fills the row with -1). Returns in_prefix."""
    first_reject = tl.min(tl.where(live & (accepted == 0), pos, BLOCK_S), axis=0)
    num_acc = tl.minimum(first_reject, n)
    in_prefix = live & (pos < num_acc)
    row = out_ptr + b.to(tl.int64) * (S + 1)
    val = tl.where(in_prefix, d, tl.where(live & (pos == num_acc), correction, -1))
    tl.store(row + pos, val.to(tl.int32), mask=pos < S + 1)
    bonus = tl.load(bonus_ptr + b).to(tl.int32)
    tl.store(row + n, bonus, mask=num_acc == n)
    tl.store(num_accepted_ptr + b, num_acc)
    return in_prefix
