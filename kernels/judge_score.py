"""The learned judge's logit in one Triton pass per draft (the GPU path).

The judge (fly_vllm.judge) scores draft t with ``z_t = w' . x_t + b'``, where
x_t concatenates, in the head's feature order, the target's hidden states
``h_post = hidden[rows[t] + 1]`` and/or ``h_pre = hidden[rows[t]]`` (H values
each) and a few scalars read from the logits. The torch path gathers those
rows into a [T, D] float32 copy and multiplies; here ``_judge_score_kernel``,
one program per draft, streams the one or two hidden rows in BLOCK_H chunks
straight from ``sample_hidden_states`` (fp32, bf16 or fp16), multiplies them
by the matching slices of the folded weight, accumulates in fp32, and adds the
bias and the scalars' part ``s[t]``, which the caller computes in torch (a
handful of columns, from the logits it already has). It writes z[t], fp32.

As ``features.assemble`` does, a hidden value that is NaN counts as 0 and
+-inf as +-1e4, so both paths score every input alike.

Backend choices (``num_stages=1`` on AMD) and why: see kernels/common.py. The
same rule holds here for the loop: H is a constexpr, so the loop over the
hidden row has a compile-time trip count (a model's hidden size is fixed: one
compile per engine). ``judge_score_launch`` is what the wrapper launches and
what ``fly_vllm.kernels.aot`` compiles ahead of time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fly_vllm.kernels.common import stage_options, torch_backend

JUDGE_WARPS = 4
MAX_BLOCK_H = 1024


@triton.jit
def _finite(x):
    """fp32 ``x`` with NaN as 0 and +-inf as +-1e4 (torch.nan_to_num in
    features.assemble)."""
    x = tl.where(x != x, 0.0, x)
    x = tl.where(x == float("inf"), 1e4, x)
    return tl.where(x == float("-inf"), -1e4, x)


@triton.jit
def _judge_score_kernel(
    hidden_ptr,  # [R, H] fp32/bf16/fp16, sample_hidden_states
    stride_row,
    rows_ptr,  # [T] int, target_logits_indices
    w_post_ptr,  # [H] fp32, the folded weight's h_post slice (HAS_POST)
    w_pre_ptr,  # [H] fp32, the folded weight's h_pre slice (HAS_PRE)
    s_ptr,  # [T] fp32, the scalar features' part (HAS_S)
    z_ptr,  # [T] fp32 out: the logit
    bias,  # fp32, the folded bias
    H: tl.constexpr,  # constexpr: a compile-time trip count (see common.py)
    HAS_POST: tl.constexpr,
    HAS_PRE: tl.constexpr,
    HAS_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + t).to(tl.int64)
    pre = hidden_ptr + row * stride_row  # hidden[rows[t]]
    post = pre + stride_row  # hidden[rows[t] + 1]
    offs = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        idx = start + offs
        inside = idx < H
        if HAS_POST:
            x = tl.load(post + idx, mask=inside, other=0.0).to(tl.float32)
            w = tl.load(w_post_ptr + idx, mask=inside, other=0.0)
            acc += _finite(x) * w
        if HAS_PRE:
            x = tl.load(pre + idx, mask=inside, other=0.0).to(tl.float32)
            w = tl.load(w_pre_ptr + idx, mask=inside, other=0.0)
            acc += _finite(x) * w
    z = tl.sum(acc, axis=0) + bias
    if HAS_S:
        z += tl.load(s_ptr + t)
    tl.store(z_ptr + t, z)


def _block_h(hidden_size: int) -> int:
    return min(MAX_BLOCK_H, triton.next_power_of_2(max(hidden_size, 16)))


def judge_score_launch(hidden_size: int, has_post: bool, has_pre: bool, has_s: bool,
                       block_h: int | None = None, backend: str | None = None
                       ) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``_judge_score_kernel`` as the wrapper
    launches it; the ahead-of-time compile check uses the same."""
    return (dict(H=hidden_size, HAS_POST=has_post, HAS_PRE=has_pre, HAS_S=has_s,
                 BLOCK_H=block_h or _block_h(hidden_size)),
            dict(num_warps=JUDGE_WARPS, **stage_options(backend or torch_backend())))


def judge_score_triton(
    hidden: torch.Tensor,  # [R, H] fp32/bf16/fp16
    rows: torch.Tensor,  # [T] int
    w_post: torch.Tensor | None,  # [H] fp32, or None: no h_post in the spec
    w_pre: torch.Tensor | None,  # [H] fp32, or None: no h_pre in the spec
    bias: float,
    scalar_part: torch.Tensor | None = None,  # [T] fp32, or None: no scalars
    block_h: int | None = None,
) -> torch.Tensor:
    """z [T] fp32: ``w_post . hidden[rows + 1] + w_pre . hidden[rows] + bias
    + scalar_part``, the hidden terms each present when its weight is given
    (at least one must be). Rows are not bounds-checked: as in vLLM's layout,
    ``rows[t] + 1`` must be a row of ``hidden`` when h_post is read."""
    if w_post is None and w_pre is None:
        raise ValueError("judge_score_triton needs w_post, w_pre or both")
    T = rows.shape[0]
    H = hidden.shape[1]
    z = torch.empty(T, dtype=torch.float32, device=hidden.device)
    if T == 0:
        return z
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    for w in (w_post, w_pre):
        if w is not None and (w.dtype != torch.float32 or w.shape != (H,)):
            raise ValueError(f"judge weights must be float32 [{H}]; got {w.dtype} "
                             f"{tuple(w.shape)}")
    constexprs, options = judge_score_launch(H, w_post is not None, w_pre is not None,
                                             scalar_part is not None, block_h)
    placeholder = w_post if w_post is not None else w_pre
    _judge_score_kernel[(T,)](
        hidden, hidden.stride(0), rows.contiguous(),
        (w_post if w_post is not None else placeholder).contiguous(),
        (w_pre if w_pre is not None else placeholder).contiguous(),
        scalar_part.float().contiguous() if scalar_part is not None else z, z, float(bias),
        **constexprs, **options,
    )
    return z
