"""Gate ``judge``: the learned head decides which mismatches are candidates.

Inside FLy's verification (verifier.py) a mismatch at draft d_i becomes a
candidate for loose acceptance when it passes the request's gate; under the
judge it passes when the head calls it unimportant::

    p_i = sigmoid(w' . x_i + b')            x_i = features.assemble(...) [D]
    candidate_i = p_i < judge_threshold     (the request's, else the config's,
                                             else the head's default)

The judge is applied as a veto on an always-open gate, so the rest of the rule
(the deferred window, W = 0 meaning none; the guards; the correction token)
is FLy's and both verifier paths (torch, Triton) run unchanged. The features
come from the verification pass itself (``sample_hidden_states``, handed over
by plugin patch 9): no extra forward pass. Without them (vLLM's warm-up) every
mismatch is important, i.e. verification is exact.

The score itself, and the path that computes it (torch, or a Triton row
pass on GPUs), is score.py.
"""

from __future__ import annotations

import torch

from fly_vllm.judge.head import JudgeHead
from fly_vllm.judge.score import JudgeScore


class JudgeGate:
    """A loaded head, ready to score on one device."""

    def __init__(self, head: JudgeHead, device: torch.device | str = "cpu"):
        self.head = head
        self.score = JudgeScore(head, device)

    def probability(self, *step: torch.Tensor) -> torch.Tensor:
        """p(important) per draft, [T] float32; ``step`` is the step's
        (hidden [R, H], rows [T], target_logits [T, V], draft_token_ids [T]),
        as for ``JudgeScore.logit``."""
        return torch.sigmoid(self.score.logit(*step))

    def important(
        self,
        hidden: torch.Tensor | None,  # [R, H] or None (not available)
        rows: torch.Tensor | None,  # [T]
        target_logits: torch.Tensor,  # [T, V]
        draft_token_ids: torch.Tensor,  # [T]
        threshold: torch.Tensor,  # [T] float32, per draft (its request's)
    ) -> torch.Tensor:
        """[T] bool: the drafts the judge forbids accepting loosely."""
        if hidden is None or rows is None or rows.shape[0] != draft_token_ids.shape[0]:
            return torch.ones_like(draft_token_ids, dtype=torch.bool)
        p = self.probability(hidden, rows, target_logits, draft_token_ids)
        return ~(p < threshold.to(p.device))


def load_gate(fly, model_config, device) -> JudgeGate | None:
    """The gate for a ``"judge"`` config, its head checked against the
    running target (name, hidden size, vocabulary); None for other gates."""
    if getattr(fly, "judge_path", None) is None:
        return None
    from fly_vllm.config import FlyConfigError
    from fly_vllm.judge.head import JudgeHeadError

    try:
        head = JudgeHead.load(fly.judge_path)
        if model_config is not None:
            mc = model_config
            head.check_pair(target=getattr(mc, "model", None),
                            hidden_size=mc.get_hidden_size(),
                            vocab_size=mc.get_vocab_size())
    except JudgeHeadError as e:
        raise FlyConfigError(f"fly.judge_path: {e}") from None
    return JudgeGate(head, device)


def judge_veto(gate: JudgeGate | None, thresholds: list, num_draft_tokens: list[int],
               hidden, rows, target_logits, draft_token_ids) -> torch.Tensor | None:
    """[T] bool: drafts of judge-gated requests the judge calls important;
    None when no request in the batch uses the judge. ``thresholds`` [B]
    holds each request's judge threshold, None for other gates."""
    if gate is None or draft_token_ids.shape[0] == 0 or all(t is None for t in thresholds):
        return None
    # Per request [B], then per draft [T], as the verifier expands its own
    # per-request settings: no Python loop over the drafts on the hot path.
    device = target_logits.device
    counts = torch.tensor(num_draft_tokens, device=device)
    thr = torch.tensor([0.0 if t is None else t for t in thresholds], device=device)
    judged = torch.tensor([t is not None for t in thresholds], dtype=torch.bool,
                          device=device)
    thr, judged = thr.repeat_interleave(counts), judged.repeat_interleave(counts)
    return gate.important(hidden, rows, target_logits, draft_token_ids, thr) & judged
