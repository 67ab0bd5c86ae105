"""FSD (Fuzzy Speculative Decoding, Holsman et al. 2025) as a pure function.

Position i is accepted iff D(p_i, q_i) <= T, where p is the target's
processed distribution and q the draft's. D is one of

    "js"               Jensen-Shannon divergence, natural log, in [0, ln 2]
                       (the authors' README default)
    "kl_draft_target"  KL(q || p)  (the authors' ``kl_div``)
    "kl_target_draft"  KL(p || q)  (``kl_div_reversed``)
    "tv"               total variation, 1/2 |p - q|_1, in [0, 1]

Variants:
    "resample"  the authors' code: acceptance is the divergence test alone; at
                the first rejection the correction is a token sampled from the
                target's processed p (greedy rows: its argmax), not from the
                residual (p - q)+.
    "fallback"  where D > T, vLLM's standard p/q test decides, with vLLM's
                recovered (residual) token as the correction; so T -> -inf is
                exact speculative decoding.

One deliberate departure from the authors' code, for vLLM's sake: a loose
accept (divergence test passed, native test failed) needs p(d) > 0 in the
processed distribution, since vLLM's grammar, bad-words and allowed-token
masks arrive as zeros there. fly-vllm's quality guards (``veto``) apply to
loose accepts only, as with FLy. In vLLM, q is the drafter's softmax at temperature 1
(captured by fly-vllm's drafter patch, see plugin.py) and the drafter stays
greedy, as in the authors' code.
"""

from __future__ import annotations

import torch

from fly_vllm.rule_names import FSD_DIVERGENCES, FSD_VARIANTS
from fly_vllm.verifier import FlyVerifyOutput, emit, token_layout

DIVERGENCES = FSD_DIVERGENCES
VARIANTS = FSD_VARIANTS


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row; +inf where a has mass that b lacks."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def _entropy(a: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(a).sum(-1)


def _divergence_rows(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    p, q = p.float(), q.float()
    if kind == "js":
        # H(m) - (H(p) + H(q)) / 2, the same sum as the two KLs to m, in
        # three elementwise passes instead of four.
        return (_entropy(0.5 * (p + q)) - 0.5 * (_entropy(p) + _entropy(q))).clamp_min(0.0)
    if kind == "kl_draft_target":
        return _kl(q, p).clamp_min(0.0)
    if kind == "kl_target_draft":
        return _kl(p, q).clamp_min(0.0)
    return 0.5 * (p - q).abs().sum(-1)  # tv


# Rows per chunk on the CPU: a few rows of a 150k vocabulary stay in cache
# across the elementwise passes, where whole [B*K, V] temporaries go through
# memory each pass (measured: benchmarks/results/qwen-pair/fsd-cpu-divergence).
# Other devices take all rows at once.
CPU_ROWS = 8


def divergence(p: torch.Tensor, q: torch.Tensor, kind: str = "js") -> torch.Tensor:
    """[N, V] x [N, V] probabilities -> [N] divergence (float32)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")
    n = p.shape[0]
    rows = CPU_ROWS if p.device.type == "cpu" else max(n, 1)
    out = torch.empty(n, dtype=torch.float32, device=p.device)
    for i in range(0, n, rows):
        out[i:i + rows] = _divergence_rows(p[i:i + rows], q[i:i + rows], kind)
    return out


def fsd_verify(
    draft_token_ids: torch.Tensor,  # [T]
    cu_num_draft_tokens: torch.Tensor,  # [B] inclusive cumsum
    target_probs: torch.Tensor,  # [T, V] processed p
    draft_probs: torch.Tensor,  # [T, V] q
    bonus_token_ids: torch.Tensor,  # [B, 1]
    max_spec_len: int,
    *,
    threshold: torch.Tensor,  # [B]
    kind: str = "js",
    variant: str = "resample",
    is_greedy: torch.Tensor | None = None,  # [B] bool; None = all greedy
    exact: torch.Tensor | None = None,  # [B] bool: verify these rows exactly
    uniform_probs: torch.Tensor | None = None,  # [T] (native test, sampled rows)
    draft_token_probs: torch.Tensor | None = None,  # [T] q(d) for the native test
    recovered_token_ids: torch.Tensor | None = None,  # [T] (native correction)
    resampled_token_ids: torch.Tensor | None = None,  # [T] from p (resample)
    veto: torch.Tensor | None = None,  # [T] bool, quality guards
    loose_from: torch.Tensor | None = None,  # [B] int64, strict prefix; None = 0
) -> FlyVerifyOutput:
    """FSD verification for a batch with ragged drafts, in vLLM's layout.

    A draft is *loose* when the divergence test accepts it while the native
    test alone would not; ``veto`` and the -inf guard apply to loose accepts
    only. ``exact`` rows (per-request ``strict``) use the native test alone,
    as do positions ``i < loose_from`` (the request's strict prefix).
    ``draft_token_probs`` is q(d) for the native p/q test: 1 for a greedy
    drafter (vLLM treats its draft as one-hot), by default ``q`` at d.

    Returns a :class:`FlyVerifyOutput` whose ``divergence`` holds D per draft
    ([T] float32); ``uncertain`` marks drafts that passed the divergence test
    without matching natively, ``gated`` native mismatches with D > T.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown FSD variant {variant!r}; choose from {VARIANTS}")
    device = target_probs.device
    T, V = target_probs.shape
    req, pos, n = token_layout(cu_num_draft_tokens, T)
    draft = draft_token_ids.long()
    valid = (draft >= 0) & (draft < V)
    safe = draft.clamp(0, V - 1).unsqueeze(-1)
    div = divergence(target_probs, draft_probs, kind)
    argmax = target_probs.argmax(-1)
    p = target_probs.gather(-1, safe).squeeze(-1)
    q = (draft_probs.gather(-1, safe).squeeze(-1) if draft_token_probs is None
         else draft_token_probs.to(p.dtype))
    greedy_tok = (torch.ones(T, dtype=torch.bool, device=device) if is_greedy is None
                  else is_greedy[req])
    if uniform_probs is None:
        native_random = torch.zeros_like(valid)
    else:
        native_random = valid & (q > 0) & ((p / q).double() >= uniform_probs)
    native = torch.where(greedy_tok, valid & (draft == argmax), native_random)
    exact_row = (torch.zeros_like(valid) if exact is None else exact[req])
    in_strict_prefix = (torch.zeros_like(valid) if loose_from is None
                        else pos < loose_from[req])
    exact_tok = exact_row | in_strict_prefix
    use_native = exact_tok | (variant == "fallback")

    passed = valid & (div <= threshold[req]) & ~exact_tok
    loose = passed & ~native
    guard_vetoed = loose & ~(p > 0)
    rule_vetoed = (loose & (p > 0) & veto) if veto is not None else torch.zeros_like(loose)
    loose = loose & (p > 0) & ~rule_vetoed
    accepted = (passed & native) | loose | (use_native & native)

    if resampled_token_ids is None:
        resampled_token_ids = argmax
    rec = argmax if recovered_token_ids is None else recovered_token_ids.long()
    sampled = torch.where(use_native, rec, resampled_token_ids.long())
    correction = torch.where(greedy_tok, argmax, sampled)
    out, num_acc, in_prefix = emit(accepted, draft, correction, bonus_token_ids, req,
                                   pos, n, max_spec_len)
    return FlyVerifyOutput(
        output_token_ids=out,
        num_accepted=num_acc,
        native=native,
        uncertain=loose,
        rescued=loose,
        in_prefix=in_prefix,
        loose_accepted=loose & in_prefix,
        gated=valid & ~native & ~passed & ~exact_tok,
        guard_vetoed=guard_vetoed,
        rule_vetoed=rule_vetoed,
        positions=pos,
        prefix_exact=valid & ~native & in_strict_prefix & ~exact_row,
        divergence=div,
    )
