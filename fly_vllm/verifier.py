"""FLy verification as a pure function of tensors (the torch path).

Notation, as in vLLM's rejection sampler:
    B  requests in the batch,
    T  draft tokens in the batch (sum of per-request drafts n_b <= S),
    S  ``max_spec_len``,
    V  vocabulary size.

For each request, drafts d_0 .. d_{n-1} are checked against the target's
processed distributions p_0 .. p_{n-1} (the rows vLLM's rejection sampler
verifies with):

1. **Native match.** Greedy rows: ``d_i == argmax p_i``. Random rows: vLLM's
   standard test ``q_i(d_i) > 0 and p_i(d_i) / q_i(d_i) >= u_i`` (q one-hot
   when the drafter gives no distribution).
2. **Gate.** A mismatch is *uncertain* when it passes the request's gate,
   one or both of:
   - *entropy* (the paper's): the top-k entropy of p_i,
     ``-sum_{top-k} p log p`` in nats over the full-vocabulary probabilities
     (not renormalised), is at least the threshold;
   - *margin* (llama.cpp's port): ``log p_i(argmax) - log p_i(d_i)``, the
     target's preference for its own choice over the draft in nats (the
     logit difference), is at most the margin.
   A request's limits say which apply: threshold 0 leaves the entropy test
   always passed, margin +inf the margin test. A mismatch that fails the
   gate is a real error and is rejected (*gated*).
   **Strict prefix.** Positions ``i < loose_from`` (the request's first
   generated tokens, ``strict_prefix_tokens``) are verified exactly: a
   mismatch there is neither uncertain nor gated (*prefix_exact*).
3. **Deferred window.** An uncertain mismatch at i is rescued iff the ``span``
   positions after it all match natively (span = W by vLLM's convention,
   W - 1 by the paper's) and ``i + W < n``: the window is resolved inside
   the step. Several rescues per step are allowed; windows are checked
   against native matches only.
4. **Guard.** Never rescue a draft whose target logit is -inf (grammar, bad
   words, allowed tokens, min-tokens masks), nor a placeholder draft (< 0),
   nor one the caller's ``veto`` mask forbids (quality guards).
5. **Output.** The longest prefix of accepted drafts (rescued drafts keep the
   draft token), then the correction (greedy: argmax; random: the recovered
   token vLLM sampled) or, if all drafts were accepted, the bonus token; the
   rest of the row is ``PLACEHOLDER`` (-1). This is vLLM's layout exactly.

``exact_verify`` is step 1 and 5 alone, for batches whose every request is
strict: the same outputs as ``fly_verify`` with every threshold +inf,
without the gate's statistics (top-k entropy, margin), which exact
verification never reads; its ``entropy`` and ``margin`` are None.

The entropy is computed on the same processed logits that verification uses
(for all-greedy batches vLLM leaves them raw; for sampled rows they carry
temperature, top-k and top-p). This is vLLM 0.33's V1 choice too, so one
threshold means the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEHOLDER_TOKEN_ID = -1


@dataclass
class FlyVerifyOutput:
    """Result of one verification step.

    Attributes:
        output_token_ids: [B, S + 1] int32, vLLM's layout.
        num_accepted: [B] int64, accepted drafts per request (native + loose).
        native: [T] bool, native match per draft token.
        uncertain: [T] bool, mismatch that passed the entropy gate and guards.
        rescued: [T] bool, uncertain mismatch whose window matched.
        in_prefix: [T] bool, inside the accepted prefix (emitted as drafts).
        loose_accepted: [T] bool, rescued and inside the accepted prefix.
        gated: [T] bool, mismatch rejected by the gate (confident).
        prefix_exact: [T] bool, mismatch inside the request's strict prefix
            (verified exactly, the gate not consulted).
        guard_vetoed: [T] bool, uncertain mismatch vetoed by the -inf guard.
        rule_vetoed: [T] bool, uncertain mismatch vetoed by a quality guard
            (the ``veto`` input).
        positions: [T] int64, position of each draft token in its request.
        entropy: [T] float32, top-k entropy in nats at each mismatch, 0 at
            native matches (FLy; None for FSD and exact verification).
        divergence: [T] float32, D(p, q) per draft (FSD; None for FLy).
        margin: [T] float32, log p(argmax) - log p(d) in nats (FLy; +inf
            where the draft's logit is -inf; None for FSD).
    """

    output_token_ids: torch.Tensor
    num_accepted: torch.Tensor
    native: torch.Tensor
    uncertain: torch.Tensor
    rescued: torch.Tensor
    in_prefix: torch.Tensor
    loose_accepted: torch.Tensor
    gated: torch.Tensor
    guard_vetoed: torch.Tensor
    rule_vetoed: torch.Tensor
    positions: torch.Tensor
    prefix_exact: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    divergence: torch.Tensor | None = None
    margin: torch.Tensor | None = None


def topk_entropy(
    logits: torch.Tensor,  # [N, V]
    k: int,
    lse: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """Top-k entropy in nats of softmax(logits), without renormalising.

    Returns [N] float32. Rows that are all -inf get entropy 0 (certain), so
    they can never open the gate.
    """
    logits = logits.float()
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    top = torch.topk(logits, k=min(k, logits.shape[-1]), dim=-1).values
    logp = top - lse.unsqueeze(-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return torch.nan_to_num(-terms.sum(dim=-1), nan=0.0)


def mismatch_entropy(
    logits: torch.Tensor,  # [T, V] float32
    mismatch: torch.Tensor,  # [T] bool
    k: int,
) -> torch.Tensor:
    """[T] float32: the top-k entropy at each mismatch, 0 at native matches
    (the gate reads no other row). On the CPU only the mismatch rows are
    reduced (usually a few of T); elsewhere every row, then masked, so that
    nothing waits on the host."""
    if logits.device.type != "cpu":
        zero = torch.zeros((), device=logits.device)
        return torch.where(mismatch, topk_entropy(logits, k), zero)
    out = torch.zeros(logits.shape[0], dtype=torch.float32)
    rows = mismatch.nonzero().squeeze(1)
    if rows.numel():
        out[rows] = topk_entropy(logits[rows], k)
    return out


def draft_margin(
    max_logit: torch.Tensor,  # [T] float32, the row's largest logit
    draft_logit: torch.Tensor,  # [T] float32
) -> torch.Tensor:
    """log p(argmax) - log p(d) = max logit - draft logit, in nats (>= 0);
    +inf where the draft's logit is -inf (the gate can never open there)."""
    return torch.where(draft_logit == float("-inf"), torch.full_like(draft_logit, float("inf")),
                       max_logit - draft_logit)


def prefix_start(
    strict_prefix_tokens: torch.Tensor,  # [B] int64, N per request (0 = none)
    num_generated: torch.Tensor,  # [B] int64, output tokens before this step
) -> torch.Tensor:
    """[B] int64: the first draft position that may be loosely accepted.
    Draft i of a request that has generated g tokens becomes its output token
    g + i (0-based), so its first N output tokens are drafts i < N - g."""
    return (strict_prefix_tokens - num_generated).clamp(min=0)


def token_layout(
    cu_num_draft_tokens: torch.Tensor,  # [B] inclusive cumsum
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Request index [T], position in request [T] and drafts per request [B],
    computed on the device without a host sync."""
    cu = cu_num_draft_tokens.long()
    starts = torch.cat([cu.new_zeros(1), cu[:-1]])
    token_idx = torch.arange(num_tokens, device=cu.device)
    req = torch.searchsorted(cu, token_idx, right=True)
    pos = token_idx - starts[req]
    return req, pos, cu - starts


def emit(
    accepted: torch.Tensor,  # [T] bool
    draft: torch.Tensor,  # [T] int64
    correction: torch.Tensor,  # [T] int64, the token emitted at a rejection
    bonus_token_ids: torch.Tensor,  # [B, 1] or [B]
    req: torch.Tensor,  # [T]
    pos: torch.Tensor,  # [T]
    n: torch.Tensor,  # [B]
    max_spec_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's output rows from per-token accept decisions, without host syncs.

    Returns (output_token_ids [B, S + 1] int32, num_accepted [B], in_prefix
    [T]): the longest accepted prefix (draft tokens), then the correction at
    the first rejection or the bonus token if all drafts were accepted, then
    PLACEHOLDER padding.
    """
    batch, device = n.shape[0], n.device
    S = max_spec_len
    grid = torch.zeros(batch, S, dtype=torch.bool, device=device)
    grid.view(-1)[req * S + pos] = accepted
    num_accepted = grid.long().cumprod(dim=1).sum(dim=1)  # [B]
    # Slot B * (S + 1) is scratch for requests that get no bonus token.
    row_len = S + 1
    out = torch.full(
        (batch * row_len + 1,), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device
    )
    in_prefix = pos < num_accepted[req]
    is_correction = pos == num_accepted[req]
    token_val = torch.where(
        in_prefix,
        draft,
        torch.where(is_correction, correction, PLACEHOLDER_TOKEN_ID),
    )
    out[req * row_len + pos] = token_val.int()
    rows = torch.arange(batch, device=device)
    bonus_idx = torch.where(num_accepted == n, rows * row_len + n, batch * row_len)
    out[bonus_idx] = bonus_token_ids.reshape(batch).int()
    return out[:-1].view(batch, row_len), num_accepted, in_prefix


def native_test(
    draft: torch.Tensor,  # [T] int64
    valid: torch.Tensor,  # [T] bool
    argmax: torch.Tensor,  # [T] int64, of the processed logits
    req: torch.Tensor,  # [T] request of each draft
    is_greedy: torch.Tensor | None,  # [B] bool; None = all greedy
    target_probs: torch.Tensor | None,  # [T, V]
    draft_probs: torch.Tensor | None,  # [T, V] or None (one-hot q)
    uniform_probs: torch.Tensor | None,  # [T]
    recovered_token_ids: torch.Tensor | None,  # [T]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Step 1, vLLM's own test: (native [T], the correction at a rejection
    [T], and for sampled batches p(d) and q(d) [T], else None)."""
    native = valid & (draft == argmax)
    if is_greedy is None:
        return native, argmax, None, None
    assert target_probs is not None and uniform_probs is not None
    assert recovered_token_ids is not None
    safe_draft = draft.clamp(0, target_probs.shape[-1] - 1).unsqueeze(-1)
    p = target_probs.gather(-1, safe_draft).squeeze(-1)
    q = torch.ones_like(p) if draft_probs is None else draft_probs.gather(
        -1, safe_draft).squeeze(-1)
    random_ok = valid & (q > 0) & ((p / q).double() >= uniform_probs)
    token_greedy = is_greedy[req]
    return (torch.where(token_greedy, native, random_ok),
            torch.where(token_greedy, argmax, recovered_token_ids.long()), p, q)


def exact_verify(
    draft_token_ids: torch.Tensor,  # [T] int
    cu_num_draft_tokens: torch.Tensor,  # [B] int, inclusive cumsum
    target_logits: torch.Tensor,  # [T, V], processed
    bonus_token_ids: torch.Tensor,  # [B, 1] or [B]
    max_spec_len: int,
    *,
    is_greedy: torch.Tensor | None = None,  # [B] bool; None = all greedy
    target_probs: torch.Tensor | None = None,  # [T, V]
    draft_probs: torch.Tensor | None = None,  # [T, V] or None (one-hot q)
    uniform_probs: torch.Tensor | None = None,  # [T]
    recovered_token_ids: torch.Tensor | None = None,  # [T]
) -> FlyVerifyOutput:
    """Exact speculative decoding (every request strict): vLLM's rule, in
    FLy's output layout. See the module doc."""
    num_tokens, vocab = target_logits.shape
    req, pos, n = token_layout(cu_num_draft_tokens, num_tokens)
    draft = draft_token_ids.long()
    valid = (draft >= 0) & (draft < vocab)
    argmax = target_logits.argmax(dim=-1)
    native, correction, _, _ = native_test(draft, valid, argmax, req, is_greedy,
                                           target_probs, draft_probs, uniform_probs,
                                           recovered_token_ids)
    out, num_accepted, in_prefix = emit(native, draft, correction, bonus_token_ids, req,
                                        pos, n, max_spec_len)
    none = torch.zeros_like(native)
    return FlyVerifyOutput(
        output_token_ids=out, num_accepted=num_accepted, native=native, uncertain=none,
        rescued=none, in_prefix=in_prefix, loose_accepted=none, gated=none,
        guard_vetoed=none, rule_vetoed=none, positions=pos, prefix_exact=none)


def fly_verify(
    draft_token_ids: torch.Tensor,  # [T] int
    cu_num_draft_tokens: torch.Tensor,  # [B] int, inclusive cumsum
    target_logits: torch.Tensor,  # [T, V] float32, processed
    bonus_token_ids: torch.Tensor,  # [B, 1] or [B]
    max_spec_len: int,
    *,
    entropy_threshold: torch.Tensor,  # [B] float32; +inf = strict
    window: torch.Tensor,  # [B] int64, W per request
    window_span: torch.Tensor,  # [B] int64, positions checked after i
    entropy_top_k: int = 3,
    is_greedy: torch.Tensor | None = None,  # [B] bool; None = all greedy
    target_probs: torch.Tensor | None = None,  # [T, V] softmax(target_logits)
    draft_probs: torch.Tensor | None = None,  # [T, V] or None (one-hot q)
    uniform_probs: torch.Tensor | None = None,  # [T] float64
    recovered_token_ids: torch.Tensor | None = None,  # [T]
    veto: torch.Tensor | None = None,  # [T] bool, quality guards
    margin: torch.Tensor | None = None,  # [B] float32, nats; None/+inf = no test
    loose_from: torch.Tensor | None = None,  # [B] int64; None = 0
) -> FlyVerifyOutput:
    """FLy verification for a batch with ragged drafts. See the module doc.

    ``target_probs``, ``uniform_probs`` and ``recovered_token_ids`` are needed
    only when some row samples (``is_greedy`` not all true); they are the
    values vLLM's own rejection sampler would use, so strict mode reproduces
    vLLM token for token. ``entropy_threshold`` +inf makes a request strict
    whatever its margin.
    """
    device = target_logits.device
    num_tokens, vocab = target_logits.shape
    batch = cu_num_draft_tokens.shape[0]
    S = max_spec_len
    req, pos, n = token_layout(cu_num_draft_tokens, num_tokens)
    draft = draft_token_ids.long()
    valid = (draft >= 0) & (draft < vocab)
    safe_draft = draft.clamp(0, vocab - 1).unsqueeze(-1)

    logits = target_logits.float()
    argmax = logits.argmax(dim=-1)
    draft_logit = logits.gather(-1, safe_draft).squeeze(-1)

    native, correction, p, q = native_test(draft, valid, argmax, req, is_greedy,
                                           target_probs, draft_probs, uniform_probs,
                                           recovered_token_ids)
    entropy = mismatch_entropy(logits, ~native, entropy_top_k)
    if is_greedy is not None:
        finite = valid & torch.where(
            is_greedy[req], draft_logit > float("-inf"), (p > 0) & (q > 0))
    else:
        finite = valid & (draft_logit > float("-inf"))

    max_logit = logits.gather(-1, argmax.unsqueeze(-1)).squeeze(-1)
    # An invalid draft (placeholder, out of range) has no logit: margin +inf.
    gap = draft_margin(max_logit, torch.where(valid, draft_logit, float("-inf")))

    mismatch = ~native
    thr = entropy_threshold[req]
    w = window[req]
    loose_ok = torch.isfinite(thr)
    if loose_from is not None:
        prefix_exact = mismatch & loose_ok & (pos < loose_from[req])
    else:
        prefix_exact = torch.zeros_like(mismatch)
    passes = entropy >= thr
    if margin is not None:
        passes = passes & (gap <= margin[req])
    considered = mismatch & ~prefix_exact
    open_gate = considered & passes
    gated = considered & ~passes & loose_ok
    fits = (pos + w) < n[req]
    uncertain = open_gate & finite & fits
    guard_vetoed = open_gate & valid & fits & ~finite
    if veto is not None:
        rule_vetoed = uncertain & veto
        uncertain = uncertain & ~veto
    else:
        rule_vetoed = torch.zeros_like(uncertain)

    # Window: count native mismatches in (i, i + span] per request.
    mis_grid = torch.zeros(batch, S + 1, dtype=torch.int32, device=device)
    mis_grid.view(-1)[req * (S + 1) + pos + 1] = mismatch.int()
    cum = mis_grid.cumsum(dim=1)  # cum[:, j] = mismatches at positions < j
    end = (pos + window_span[req] + 1).clamp(max=S)
    in_window = cum[req, end] - cum[req, pos + 1]
    rescued = uncertain & (in_window == 0)

    accepted = native | rescued
    out, num_accepted, in_prefix = emit(
        accepted, draft, correction, bonus_token_ids, req, pos, n, S)

    return FlyVerifyOutput(
        output_token_ids=out,
        num_accepted=num_accepted,
        native=native,
        uncertain=uncertain,
        rescued=rescued,
        in_prefix=in_prefix,
        loose_accepted=rescued & in_prefix,
        gated=gated,
        guard_vetoed=guard_vetoed,
        rule_vetoed=rule_vetoed,
        positions=pos,
        prefix_exact=prefix_exact,
        entropy=entropy,
        margin=gap,
    )
