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

Not yet wired into vLLM: the drafter's distribution must be captured first
(the native draft-model proposer keeps none when it drafts greedily).
"""

from __future__ import annotations

import torch

from fly_vllm.verifier import emit, token_layout

DIVERGENCES = ("js", "kl_draft_target", "kl_target_draft", "tv")
VARIANTS = ("resample", "fallback")


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row; +inf where a has mass that b lacks."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def divergence(p: torch.Tensor, q: torch.Tensor, kind: str = "js") -> torch.Tensor:
    """[N, V] x [N, V] probabilities -> [N] divergence (float32)."""
    p, q = p.float(), q.float()
    if kind == "js":
        m = 0.5 * (p + q)
        return (0.5 * _kl(p, m) + 0.5 * _kl(q, m)).clamp_min(0.0)
    if kind == "kl_draft_target":
        return _kl(q, p).clamp_min(0.0)
    if kind == "kl_target_draft":
        return _kl(p, q).clamp_min(0.0)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")


def fsd_verify(
    draft_token_ids: torch.Tensor,  # [T]
    cu_num_draft_tokens: torch.Tensor,  # [B] inclusive cumsum
    target_probs: torch.Tensor,  # [T, V] processed p
    draft_probs: torch.Tensor,  # [T, V] q
    bonus_token_ids: torch.Tensor,  # [B, 1]
    max_spec_len: int,
    *,
    threshold: torch.Tensor,  # [B]; -inf = exact (fallback) / reject all (resample)
    kind: str = "js",
    variant: str = "resample",
    is_greedy: torch.Tensor | None = None,  # [B] bool; None = all greedy
    uniform_probs: torch.Tensor | None = None,  # [T] (fallback, sampled rows)
    recovered_token_ids: torch.Tensor | None = None,  # [T] (fallback, sampled rows)
    resampled_token_ids: torch.Tensor | None = None,  # [T] from p (resample, sampled)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (output_token_ids [B, S+1] int32 in vLLM's layout,
    num_accepted [B], divergence [T])."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FSD variant {variant!r}; choose from {VARIANTS}")
    device = target_probs.device
    T, V = target_probs.shape
    S = max_spec_len
    req, pos, n = token_layout(cu_num_draft_tokens, T)
    draft = draft_token_ids.long()
    valid = (draft >= 0) & (draft < V)
    safe = draft.clamp(0, V - 1).unsqueeze(-1)
    div = divergence(target_probs, draft_probs, kind)
    accepted = valid & (div <= threshold[req])
    argmax = target_probs.argmax(-1)
    greedy_tok = (torch.ones(T, dtype=torch.bool, device=device) if is_greedy is None
                  else is_greedy[req])
    if variant == "resample":
        sampled = resampled_token_ids if resampled_token_ids is not None else argmax
        correction = torch.where(greedy_tok, argmax, sampled.long())
    else:
        p = target_probs.gather(-1, safe).squeeze(-1)
        q = draft_probs.gather(-1, safe).squeeze(-1)
        if uniform_probs is None:
            native_random = torch.zeros_like(accepted)
        else:
            native_random = valid & (q > 0) & ((p / q).double() >= uniform_probs)
        native = torch.where(greedy_tok, valid & (draft == argmax), native_random)
        accepted = accepted | native
        rec = recovered_token_ids.long() if recovered_token_ids is not None else argmax
        correction = torch.where(greedy_tok, argmax, rec)

    out, num_acc, _ = emit(accepted, draft, correction, bonus_token_ids, req, pos, n, S)
    return out, num_acc, div
