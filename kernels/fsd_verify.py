"""FSD verification in two Triton kernels (the GPU path; CUDA and ROCm).

1. ``_fsd_row_kernel``, one program per draft token: a single pass over the
   target's and the draft's probability rows ([V] each) that computes,
   together, the divergence D(p, q) (Jensen-Shannon, either KL, or total
   variation), the target's argmax (first index of the max, as
   ``torch.argmax``), and p(d) and q(d) for the draft token d.
2. ``_fsd_accept_kernel``, one program per request: the divergence test, the
   native test (greedy match, or vLLM's p/q test for sampled rows), the
   ``exact`` rows, the guards, and vLLM's output row, for ragged drafts.

Decisions equal the torch reference (``fly_vllm.fsd.fsd_verify``) bit for bit
except where a divergence lies within float rounding of the threshold: the
kernel sums D in another order than torch, so ``D <= T`` can differ when
|D - T| is about 1e-7 relative. Nothing here is CUDA-specific; block sizes are
constexpr and the warp counts suit AMD's 64-wide wavefronts.

The launches follow kernels/common.py's per-backend rules; the AOT check
(``fly_vllm.kernels.aot``) compiles the ``fsd_*_launch`` settings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fly_vllm.fsd import DIVERGENCES, VARIANTS
from fly_vllm.kernels.common import (emit_row, load_drafts, new_outputs, stage_options,
                                    torch_backend)
from fly_vllm.verifier import FlyVerifyOutput, token_layout

# Flag bits, tl.constexpr as in fly_verify.py (a plain int global compiles
# under the interpreter only).
NATIVE, LOOSE, IN_PREFIX, GATED, VETOED, RULE_VETOED, PREFIX_EXACT = (
    tl.constexpr(v) for v in (1, 2, 8, 16, 32, 64, 128))
ROW_WARPS, ACCEPT_WARPS = 8, 4


@triton.jit
def _kl_terms(a, b):
    """Elementwise a * log(a / b), 0 where a == 0 (torch.xlogy's convention)."""
    return tl.where(a > 0, a * (tl.log(a) - tl.log(b)), 0.0)


@triton.jit
def _fsd_row_kernel(
    p_ptr,  # [T, V] target probabilities (fp32/bf16/fp16)
    stride_p,
    q_ptr,  # [T, V] draft probabilities
    stride_q,
    draft_ptr,  # [T] int
    div_ptr,  # [T] fp32 out
    argmax_ptr,  # [T] int64 out
    pd_ptr,  # [T] fp32 out: p(d)
    qd_ptr,  # [T] fp32 out: q(d)
    V: tl.constexpr,  # constexpr: a compile-time trip count (see common.py)
    KIND: tl.constexpr,  # 0 js, 1 kl(q||p), 2 kl(p||q), 3 tv
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pb = p_ptr + row * stride_p
    qb = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    best = tl.full([], -1.0, tl.float32)
    best_idx = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        m = idx < V
        p = tl.load(pb + idx, mask=m, other=0.0).to(tl.float32)
        q = tl.load(qb + idx, mask=m, other=0.0).to(tl.float32)
        if KIND == 0:
            mid = 0.5 * (p + q)
            acc += 0.5 * _kl_terms(p, mid) + 0.5 * _kl_terms(q, mid)
        elif KIND == 1:
            acc += _kl_terms(q, p)
        elif KIND == 2:
            acc += _kl_terms(p, q)
        else:
            acc += 0.5 * tl.abs(p - q)
        # Argmax of p: masked lanes read -1, below any probability.
        pm = tl.where(m, p, -1.0)
        blk_max = tl.max(pm, axis=0)
        blk_idx = tl.min(tl.where(pm == blk_max, idx, V), axis=0).to(tl.int64)
        take = blk_max > best
        best_idx = tl.where(take, blk_idx, best_idx)
        best = tl.where(take, blk_max, best)
    div = tl.sum(acc, axis=0)
    if KIND != 3:
        div = tl.maximum(div, 0.0)
    d = tl.load(draft_ptr + row).to(tl.int64)
    safe = tl.minimum(tl.maximum(d, 0), V - 1)
    tl.store(div_ptr + row, div)
    tl.store(argmax_ptr + row, best_idx)
    tl.store(pd_ptr + row, tl.load(pb + safe).to(tl.float32))
    tl.store(qd_ptr + row, tl.load(qb + safe).to(tl.float32))


@triton.jit
def _fsd_accept_kernel(
    out_ptr,  # [B, S + 1] int32 out (prefilled with PLACEHOLDER)
    num_accepted_ptr,  # [B] int64 out
    flags_ptr,  # [T] int32 out
    cu_ptr,  # [B] inclusive cumsum
    draft_ptr,  # [T]
    argmax_ptr,  # [T] int64
    div_ptr,  # [T] fp32
    pd_ptr,  # [T] fp32 p(d)
    qd_ptr,  # [T] fp32 q(d) for the native p/q test
    bonus_ptr,  # [B]
    thr_ptr,  # [B] fp32 or fp64
    exact_ptr,  # [B] bool
    loose_from_ptr,  # [B] int64, strict prefix
    is_greedy_ptr,  # [B] bool (HAS_RANDOM)
    u_ptr,  # [T] fp32 or fp64 uniforms (HAS_RANDOM)
    recovered_ptr,  # [T] native correction (HAS_RANDOM)
    resampled_ptr,  # [T] token sampled from p (HAS_RANDOM)
    veto_ptr,  # [T] bool (HAS_VETO)
    V,
    S,
    FALLBACK: tl.constexpr,
    HAS_RANDOM: tl.constexpr,
    HAS_VETO: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    n, pos, live, t, d, amax, valid, native = load_drafts(
        cu_ptr, draft_ptr, argmax_ptr, b, V, BLOCK_S)
    div = tl.load(div_ptr + t, mask=live, other=0.0)
    p = tl.load(pd_ptr + t, mask=live, other=0.0)
    exact_row = tl.load(exact_ptr + b) != 0
    in_strict_prefix = pos < tl.load(loose_from_ptr + b)
    exact = exact_row | in_strict_prefix
    correction = amax
    if HAS_RANDOM:
        if not tl.load(is_greedy_ptr + b):
            q = tl.load(qd_ptr + t, mask=live, other=0.0)
            u = tl.load(u_ptr + t, mask=live, other=1.0)
            native = valid & (q > 0) & ((p / q).to(u.dtype) >= u)
            rec = tl.load(recovered_ptr + t, mask=live, other=0).to(tl.int64)
            res = tl.load(resampled_ptr + t, mask=live, other=0).to(tl.int64)
            correction = tl.where(exact | FALLBACK, rec, res)
    thr = tl.load(thr_ptr + b)
    passed = valid & (div <= thr) & (exact == 0)
    loose = passed & (native == 0)
    vetoed = loose & (p <= 0)
    loose = loose & (p > 0)
    rule_vetoed = loose & (pos < 0)
    if HAS_VETO:
        v = tl.load(veto_ptr + t, mask=live, other=0) != 0
        rule_vetoed = loose & v
        loose = loose & (v == 0)
    accepted = (passed & native) | loose
    if FALLBACK:
        accepted = accepted | native
    else:
        accepted = accepted | (native & exact)
    gated = valid & (native == 0) & (passed == 0) & (exact == 0)
    in_prefix = emit_row(out_ptr, num_accepted_ptr, bonus_ptr, b, pos, live, n, accepted,
                         d, correction, S, BLOCK_S)
    flags = (native.to(tl.int32) * NATIVE + loose.to(tl.int32) * LOOSE
             + in_prefix.to(tl.int32) * IN_PREFIX + gated.to(tl.int32) * GATED
             + vetoed.to(tl.int32) * VETOED + rule_vetoed.to(tl.int32) * RULE_VETOED
             + (valid & (native == 0) & in_strict_prefix & (exact_row == 0)).to(tl.int32)
             * PREFIX_EXACT)
    tl.store(flags_ptr + t, flags, mask=live)


def _block_v(vocab: int) -> int:
    return min(2048, triton.next_power_of_2(max(vocab, 16)))


def fsd_row_launch(vocab: int, kind: str, block_v: int | None = None,
                   backend: str | None = None) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``_fsd_row_kernel`` as the wrapper
    launches it; the ahead-of-time compile check uses the same."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")
    return (dict(V=vocab, KIND=DIVERGENCES.index(kind), BLOCK_V=block_v or _block_v(vocab)),
            dict(num_warps=ROW_WARPS, **stage_options(backend or torch_backend())))


def fsd_accept_launch(max_spec_len: int, fallback: bool, has_random: bool, has_veto: bool,
                      backend: str | None = None) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``_fsd_accept_kernel``."""
    return (dict(FALLBACK=fallback, HAS_RANDOM=has_random, HAS_VETO=has_veto,
                 BLOCK_S=triton.next_power_of_2(max(max_spec_len, 2))),
            dict(num_warps=ACCEPT_WARPS, **stage_options(backend or torch_backend())))


def fsd_row_stats(
    target_probs: torch.Tensor, draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor, kind: str = "js", block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over [T, V] p and q: (divergence, argmax of p, p(d), q(d))."""
    T, V = target_probs.shape
    constexprs, options = fsd_row_launch(V, kind, block_v)
    dev = target_probs.device
    div = torch.empty(T, dtype=torch.float32, device=dev)
    amax = torch.empty(T, dtype=torch.int64, device=dev)
    pd = torch.empty(T, dtype=torch.float32, device=dev)
    qd = torch.empty(T, dtype=torch.float32, device=dev)
    if T == 0:
        return div, amax, pd, qd
    p = target_probs if target_probs.stride(-1) == 1 else target_probs.contiguous()
    q = draft_probs if draft_probs.stride(-1) == 1 else draft_probs.contiguous()
    _fsd_row_kernel[(T,)](
        p, p.stride(0), q, q.stride(0), draft_token_ids.contiguous(), div, amax, pd, qd,
        **constexprs, **options,
    )
    return div, amax, pd, qd


def fsd_verify_triton(
    draft_token_ids: torch.Tensor,  # [T]
    cu_num_draft_tokens: torch.Tensor,  # [B]
    target_probs: torch.Tensor,  # [T, V]
    draft_probs: torch.Tensor,  # [T, V]
    bonus_token_ids: torch.Tensor,  # [B, 1]
    max_spec_len: int,
    *,
    threshold: torch.Tensor,  # [B]
    kind: str = "js",
    variant: str = "resample",
    is_greedy: torch.Tensor | None = None,
    exact: torch.Tensor | None = None,
    uniform_probs: torch.Tensor | None = None,
    draft_token_probs: torch.Tensor | None = None,
    recovered_token_ids: torch.Tensor | None = None,
    resampled_token_ids: torch.Tensor | None = None,
    veto: torch.Tensor | None = None,
    loose_from: torch.Tensor | None = None,
    block_v: int | None = None,
) -> FlyVerifyOutput:
    """Same contract and results as ``fly_vllm.fsd.fsd_verify``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FSD variant {variant!r}; choose from {VARIANTS}")
    T, V = target_probs.shape
    B = cu_num_draft_tokens.shape[0]
    dev = target_probs.device
    draft = draft_token_ids.contiguous()
    div, amax, pd, qd = fsd_row_stats(target_probs, draft_probs, draft, kind, block_v)
    if draft_token_probs is not None:
        qd = draft_token_probs.float().contiguous()
    has_random = is_greedy is not None
    if has_random:
        # The reference's defaults: no uniforms means no native accept in a
        # sampled row (p/q >= inf only for q that underflows, there as here);
        # no recovered or resampled tokens means the argmax.
        u = (uniform_probs.contiguous() if uniform_probs is not None
             else torch.full((T,), float("inf"), dtype=torch.float64, device=dev))
        rec = amax if recovered_token_ids is None else recovered_token_ids.contiguous()
        res = amax if resampled_token_ids is None else resampled_token_ids.contiguous()
    thr = threshold if threshold.dtype in (torch.float32, torch.float64) else threshold.float()
    exact_b = (torch.zeros(B, dtype=torch.bool, device=dev) if exact is None
               else exact.contiguous())
    if loose_from is None:
        loose_from = torch.zeros(B, dtype=torch.int64, device=dev)
    out, num_acc, flags = new_outputs(B, max_spec_len, T, dev)
    if B > 0:
        constexprs, options = fsd_accept_launch(max_spec_len, variant == "fallback",
                                                has_random, veto is not None)
        _fsd_accept_kernel[(B,)](
            out, num_acc, flags, cu_num_draft_tokens.contiguous(), draft, amax, div, pd, qd,
            bonus_token_ids.reshape(B).contiguous(), thr.contiguous(), exact_b,
            loose_from.long().contiguous(), is_greedy.contiguous() if has_random else exact_b,
            u if has_random else div, rec if has_random else amax,
            res if has_random else amax,
            veto.contiguous() if veto is not None else exact_b, V, max_spec_len,
            **constexprs, **options,
        )
    _, pos, _ = token_layout(cu_num_draft_tokens, T)
    bit = lambda m: (flags & m.value) != 0  # noqa: E731
    loose = bit(LOOSE)
    return FlyVerifyOutput(
        output_token_ids=out, num_accepted=num_acc, native=bit(NATIVE), uncertain=loose,
        rescued=loose, in_prefix=bit(IN_PREFIX), loose_accepted=loose & bit(IN_PREFIX),
        gated=bit(GATED), guard_vetoed=bit(VETOED), rule_vetoed=bit(RULE_VETOED),
        positions=pos, prefix_exact=bit(PREFIX_EXACT), divergence=div,
    )
