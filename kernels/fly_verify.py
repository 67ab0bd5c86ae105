"""FLy verification in two Triton kernels (the GPU path; CUDA and ROCm).

1. ``_row_stats_kernel``, one program per draft token (row of the logits):
   a single pass over the V logits that keeps, together, the running max and
   sum of exponentials (log-sum-exp), the argmax (first index of the max, as
   ``torch.argmax``), and the top-k logits (k <= 8) for the entropy gate. It
   also reads the draft token's logit, for the -inf guard and the margin gate
   (max logit - draft logit).
2. ``_accept_kernel``, one program per request: native match, strict prefix,
   gate (entropy and/or margin), deferred window, guard, and vLLM's output
   row, for ragged drafts (``cu_num_draft_tokens``).

Decisions equal the torch reference (``fly_vllm.verifier.fly_verify``) bit for
bit; the entropy is the same quantity summed in another order (float
tolerance). Nothing here is CUDA-specific; block sizes are constexpr and the
warp counts suit AMD's 64-wide wavefronts as well as NVIDIA's 32-wide warps.

Backend choices (``num_stages=1`` on AMD, ``V`` a constexpr) and why: see
kernels/common.py. ``row_stats_launch`` and ``accept_launch`` are what the
wrappers launch and what ``fly_vllm.kernels.aot`` compiles ahead of time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fly_vllm.kernels.common import (emit_row, load_drafts, new_outputs, stage_options,
                                    torch_backend)
from fly_vllm.verifier import FlyVerifyOutput, token_layout

# Per-draft flag bits. Triton kernels may read only constexpr globals, so the
# bits are tl.constexpr; the wrapper reads ``.value``.
NATIVE, UNCERTAIN, RESCUED, IN_PREFIX, GATED, VETOED, RULE_VETOED, PREFIX_EXACT = (
    tl.constexpr(1 << i) for i in range(8))
ROW_WARPS, ACCEPT_WARPS = 8, 4


@triton.jit
def _row_stats_kernel(
    logits_ptr,  # [T, V] fp32/bf16/fp16
    stride_row,
    draft_ptr,  # [T] int
    lse_ptr,  # [T] fp32 out
    argmax_ptr,  # [T] int64 out
    entropy_ptr,  # [T] fp32 out
    draft_logit_ptr,  # [T] fp32 out
    margin_ptr,  # [T] fp32 out: max logit - draft logit (+inf if draft is -inf)
    V: tl.constexpr,  # constexpr: a compile-time trip count (see common.py)
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    kk = tl.arange(0, K_PAD)
    neg_inf = float("-inf")
    # Slots >= TOP_K hold +inf so they are never the minimum to replace.
    topk = tl.where(kk < TOP_K, neg_inf, float("inf")).to(tl.float32)
    run_max = tl.full([], neg_inf, tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    best = tl.full([], neg_inf, tl.float32)
    best_idx = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=neg_inf).to(tl.float32)
        blk_max = tl.max(x, axis=0)
        # Online log-sum-exp (guarding the all -inf prefix).
        new_max = tl.maximum(run_max, blk_max)
        safe_max = tl.where(new_max == neg_inf, 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
        run_max = new_max
        # Argmax: first index of the max.
        blk_idx = tl.min(tl.where(x == blk_max, idx, V), axis=0).to(tl.int64)
        take = blk_max > best
        best_idx = tl.where(take, blk_idx, best_idx)
        best = tl.where(take, blk_max, best)
        # Top-k: only blocks whose max beats the current k-th value matter.
        if blk_max > tl.min(topk, axis=0):
            xb = x
            for _ in tl.static_range(TOP_K):
                m = tl.max(xb, axis=0)
                slot = tl.min(tl.where(topk == tl.min(topk, axis=0), kk, K_PAD), axis=0)
                topk = tl.where(kk == slot, tl.maximum(topk, m), topk)
                first = tl.min(tl.where(xb == m, idx, V), axis=0)
                xb = tl.where(idx == first, neg_inf, xb)
    lse = run_max + tl.log(run_sum)
    logp = topk - lse
    p = tl.exp(logp)
    terms = tl.where((kk < TOP_K) & (p > 0), p * logp, 0.0)
    entropy = tl.where(run_max == neg_inf, 0.0, -tl.sum(terms, axis=0))
    d = tl.load(draft_ptr + row).to(tl.int64)
    ok = (d >= 0) & (d < V)
    dl = tl.load(base + tl.where(ok, d, 0), mask=ok, other=neg_inf).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(argmax_ptr + row, best_idx)
    tl.store(entropy_ptr + row, entropy)
    tl.store(draft_logit_ptr + row, dl)
    tl.store(margin_ptr + row, tl.where(dl == neg_inf, float("inf"), best - dl))


@triton.jit
def _accept_kernel(
    out_ptr,  # [B, S + 1] int32 out
    num_accepted_ptr,  # [B] int64 out
    flags_ptr,  # [T] int32 out
    cu_ptr,  # [B] inclusive cumsum
    draft_ptr,  # [T]
    argmax_ptr,  # [T] int64
    entropy_ptr,  # [T] fp32
    draft_logit_ptr,  # [T] fp32
    margin_ptr,  # [T] fp32
    bonus_ptr,  # [B]
    thr_ptr,  # [B] fp32
    max_margin_ptr,  # [B] fp32, +inf = no margin test
    loose_from_ptr,  # [B] int64, strict prefix: first position allowed loose
    window_ptr,  # [B] int64
    span_ptr,  # [B] int64
    is_greedy_ptr,  # [B] bool (HAS_RANDOM)
    p_ptr,  # [T] fp32 target prob of the draft (HAS_RANDOM)
    q_ptr,  # [T] fp32 draft prob of the draft (HAS_RANDOM)
    u_ptr,  # [T] fp64 or fp32 uniforms (HAS_RANDOM)
    recovered_ptr,  # [T] (HAS_RANDOM)
    veto_ptr,  # [T] bool (HAS_VETO)
    V,
    S,
    HAS_RANDOM: tl.constexpr,
    HAS_VETO: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    n, pos, live, t, d, amax, valid, native = load_drafts(
        cu_ptr, draft_ptr, argmax_ptr, b, V, BLOCK_S)
    ent = tl.load(entropy_ptr + t, mask=live, other=0.0)
    dl = tl.load(draft_logit_ptr + t, mask=live, other=float("-inf"))
    finite = valid & (dl > float("-inf"))
    correction = amax
    if HAS_RANDOM:
        if not tl.load(is_greedy_ptr + b):
            p = tl.load(p_ptr + t, mask=live, other=0.0)
            q = tl.load(q_ptr + t, mask=live, other=0.0)
            u = tl.load(u_ptr + t, mask=live, other=1.0)
            native = valid & (q > 0) & ((p / q).to(u.dtype) >= u)
            finite = valid & (p > 0) & (q > 0)
            correction = tl.load(recovered_ptr + t, mask=live, other=0).to(tl.int64)
    thr = tl.load(thr_ptr + b)
    max_margin = tl.load(max_margin_ptr + b)
    loose_from = tl.load(loose_from_ptr + b)
    w = tl.load(window_ptr + b)
    span = tl.load(span_ptr + b)
    gap = tl.load(margin_ptr + t, mask=live, other=float("inf"))
    mismatch = live & (native == 0)
    # The wrapper drops prefix and gated flags of strict rows (thr = inf).
    prefix_exact = mismatch & (pos < loose_from)
    considered = mismatch & (pos >= loose_from)
    passes = (ent >= thr) & (gap <= max_margin)
    open_gate = considered & passes
    gated = considered & (passes == 0)
    fits = (pos + w) < n
    uncertain = open_gate & finite & fits
    vetoed = open_gate & valid & fits & (finite == 0)
    rule_vetoed = uncertain & (pos < 0)
    if HAS_VETO:
        v = tl.load(veto_ptr + t, mask=live, other=0) != 0
        rule_vetoed = uncertain & v
        uncertain = uncertain & (v == 0)
    # Mismatches in (i, i + span], as a [BLOCK_S, BLOCK_S] masked count.
    j = pos[None, :]
    i = pos[:, None]
    in_win = (j > i) & (j <= i + span) & (mismatch[None, :] != 0)
    broken = tl.sum(in_win.to(tl.int32), axis=1)
    rescued = uncertain & (broken == 0)
    accepted = native | rescued
    in_prefix = emit_row(out_ptr, num_accepted_ptr, bonus_ptr, b, pos, live, n, accepted,
                         d, correction, S, BLOCK_S)
    flags = (native.to(tl.int32) * NATIVE + uncertain.to(tl.int32) * UNCERTAIN
             + rescued.to(tl.int32) * RESCUED + in_prefix.to(tl.int32) * IN_PREFIX
             + gated.to(tl.int32) * GATED + vetoed.to(tl.int32) * VETOED
             + rule_vetoed.to(tl.int32) * RULE_VETOED
             + prefix_exact.to(tl.int32) * PREFIX_EXACT)
    tl.store(flags_ptr + t, flags, mask=live)


def _block_v(vocab: int) -> int:
    return min(4096, triton.next_power_of_2(max(vocab, 16)))


def row_stats_launch(vocab: int, top_k: int, block_v: int | None = None,
                     backend: str | None = None) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``_row_stats_kernel`` as the wrapper
    launches it; the ahead-of-time compile check uses the same."""
    return (dict(V=vocab, TOP_K=top_k, K_PAD=triton.next_power_of_2(max(top_k, 2)),
                 BLOCK_V=block_v or _block_v(vocab)),
            dict(num_warps=ROW_WARPS, **stage_options(backend or torch_backend())))


def accept_launch(max_spec_len: int, has_random: bool, has_veto: bool,
                  backend: str | None = None) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``_accept_kernel``."""
    return (dict(HAS_RANDOM=has_random, HAS_VETO=has_veto,
                 BLOCK_S=triton.next_power_of_2(max(max_spec_len, 2))),
            dict(num_warps=ACCEPT_WARPS, **stage_options(backend or torch_backend())))


def row_stats(
    logits: torch.Tensor, draft_token_ids: torch.Tensor, top_k: int,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over [T, V] logits: (lse, argmax, top-k entropy, draft logit,
    margin = max logit - draft logit), each [T]."""
    T, V = logits.shape
    dev = logits.device
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    amax = torch.empty(T, dtype=torch.int64, device=dev)
    ent = torch.empty(T, dtype=torch.float32, device=dev)
    dl = torch.empty(T, dtype=torch.float32, device=dev)
    gap = torch.empty(T, dtype=torch.float32, device=dev)
    if T == 0:
        return lse, amax, ent, dl, gap
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    constexprs, options = row_stats_launch(V, top_k, block_v)
    _row_stats_kernel[(T,)](
        logits, logits.stride(0), draft_token_ids, lse, amax, ent, dl, gap,
        **constexprs, **options,
    )
    return lse, amax, ent, dl, gap


def fly_verify_triton(
    draft_token_ids: torch.Tensor,  # [T]
    cu_num_draft_tokens: torch.Tensor,  # [B]
    target_logits: torch.Tensor,  # [T, V]
    bonus_token_ids: torch.Tensor,  # [B, 1]
    max_spec_len: int,
    *,
    entropy_threshold: torch.Tensor,  # [B]
    window: torch.Tensor,  # [B]
    window_span: torch.Tensor,  # [B]
    entropy_top_k: int = 3,
    is_greedy: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    uniform_probs: torch.Tensor | None = None,
    recovered_token_ids: torch.Tensor | None = None,
    veto: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    loose_from: torch.Tensor | None = None,
    block_v: int | None = None,
) -> FlyVerifyOutput:
    """Same contract and results as ``fly_vllm.verifier.fly_verify``."""
    T, V = target_logits.shape
    B = cu_num_draft_tokens.shape[0]
    S = max_spec_len
    dev = target_logits.device
    draft = draft_token_ids.contiguous()
    lse, amax, ent, dl, gap = row_stats(target_logits, draft, entropy_top_k, block_v)
    if margin is None:
        margin = torch.full((B,), float("inf"), device=dev)
    if loose_from is None:
        loose_from = torch.zeros(B, dtype=torch.int64, device=dev)
    has_random = is_greedy is not None
    p = q = u = rec = None
    if has_random:
        safe = draft.long().clamp(0, V - 1).unsqueeze(-1)
        p = target_probs.gather(-1, safe).squeeze(-1).float().contiguous()
        q = (torch.ones_like(p) if draft_probs is None
             else draft_probs.gather(-1, safe).squeeze(-1).float().contiguous())
        u = uniform_probs.contiguous()
        rec = recovered_token_ids.contiguous()
    out, num_acc, flags = new_outputs(B, S, T, dev)
    if B > 0:
        constexprs, options = accept_launch(S, has_random, veto is not None)
        _accept_kernel[(B,)](
            out, num_acc, flags, cu_num_draft_tokens.contiguous(), draft, amax, ent, dl,
            gap, bonus_token_ids.reshape(B).contiguous(),
            entropy_threshold.float().contiguous(), margin.float().contiguous(),
            loose_from.long().contiguous(), window.long().contiguous(),
            window_span.long().contiguous(),
            is_greedy if has_random else flags, p if has_random else ent,
            q if has_random else ent, u if has_random else ent,
            rec if has_random else amax,
            veto.contiguous() if veto is not None else flags, V, S,
            **constexprs, **options,
        )
    req, pos, _ = token_layout(cu_num_draft_tokens, T)
    bit = lambda m: (flags & m.value) != 0  # noqa: E731
    loose_ok = torch.isfinite(entropy_threshold)[req]
    # The gate reads the entropy of mismatches only; the reference reports
    # 0 at native matches, and so do we.
    ent = torch.where(bit(NATIVE), torch.zeros((), device=ent.device), ent)
    return FlyVerifyOutput(
        output_token_ids=out, num_accepted=num_acc, native=bit(NATIVE),
        uncertain=bit(UNCERTAIN), rescued=bit(RESCUED), in_prefix=bit(IN_PREFIX),
        loose_accepted=bit(RESCUED) & bit(IN_PREFIX),
        gated=bit(GATED) & loose_ok,
        guard_vetoed=bit(VETOED), rule_vetoed=bit(RULE_VETOED), positions=pos,
        prefix_exact=bit(PREFIX_EXACT) & loose_ok, entropy=ent, margin=gap,
    )
