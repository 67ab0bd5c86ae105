"""FlexDraft's training-free flex decoding, as pure functions.

Per request, drafts are kept while the running product of the drafter's top
probabilities stays at or above a threshold (FlexDraft's
``cumulative_product`` strategy, default 0.01), clamped to [min_drafts, K].
The batch-size schedule is vLLM's own ``num_speculative_tokens_per_batch_size``
(config.py writes it; see ``config.flex_schedule``).
"""

from __future__ import annotations

import torch


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] logits -> [N] float32 probability of the argmax token."""
    x = logits.float()
    return (x.max(dim=-1).values - torch.logsumexp(x, dim=-1)).exp()


def confident_lengths(top_probs: torch.Tensor, threshold: float,
                      min_drafts: int = 1) -> torch.Tensor:
    """How many drafts each request keeps.

    Args:
        top_probs: [B, K] the drafter's top probability at each draft position.
        threshold: keep draft j while prod_{i <= j} top_probs[:, i] >= threshold.
        min_drafts: the floor (clamped to K).
    Returns:
        [B] int64 in [min(min_drafts, K), K].
    """
    k = top_probs.shape[1]
    running = torch.cumprod(top_probs.double(), dim=1)
    # The running product never grows, so the passing positions are a prefix.
    kept = (running >= threshold).sum(dim=1)
    return kept.clamp(min=min(min_drafts, k), max=k)
