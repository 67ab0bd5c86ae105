"""Where fly-vllm runs among vLLM's ranks.

With tensor parallelism every rank of the last pipeline stage runs the
rejection sampler on the same batch (the logits are gathered to each rank)
and each feeds its own sampled tokens into its next step. So:

- *Counting*: one rank's counts are the engine's. TP rank 0 of the last
  pipeline stage records (counters, per-request totals, the verifier-path
  gauge, the judge recorder's rows, the start-up line); the other ranks
  verify and count nothing (``records_here``). Model runner V2's
  batch-sharded sampling is the exception: each TP rank samples its own
  requests, so each records its own.
- *Deciding*: every rank must decide the same way, or the ranks' sequences
  part silently. Which verifier path runs (Triton or torch) is agreed once,
  when it is checked: a failure on any rank moves every rank to torch
  (``any_rank``). A failure that only one rank could see later, at a step,
  stops the engine with an error instead of falling back on that rank alone.

Data-parallel ranks are separate engines with their own requests: each
records its own, and the front end sums them. Outside a vLLM worker (tests,
``fly-vllm selftest``) there is one rank, which records.
"""

from __future__ import annotations

from typing import Any


def tp_group() -> Any | None:
    """vLLM's tensor-parallel group of this process, or None without one
    (not a vLLM worker, or a TP size of 1)."""
    try:
        from vllm.distributed import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return None
        group = ps.get_tp_group()
    except Exception:  # no vLLM, or its parallel state is not set up here
        return None
    return group if group.world_size > 1 else None


def records_here(batch_sharded: bool = False) -> bool:
    """Whether this rank's counts are the engine's: TP rank 0 of the last
    pipeline stage, or every TP rank there when sampling is batch-sharded."""
    try:
        from vllm.distributed import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return True
        if not ps.get_pp_group().is_last_rank:
            return False
        return batch_sharded or ps.get_tp_group().rank_in_group == 0
    except Exception:
        return True


def any_rank(flag: bool) -> bool:
    """``flag`` or'ed over the tensor-parallel group (one small collective
    on its CPU group; every rank must call it at the same point). Without a
    group, ``flag``."""
    group = tp_group()
    if group is None:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.cpu_group)
    return bool(t.item())
