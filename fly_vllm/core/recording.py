"""What a verification step adds to fly-vllm's counters (fly_vllm.metrics):
the per-step totals, loose accepts per position and per rule, and each
request's own totals.

On accelerators the totals are summed on the device and copied to the host
at most every ``FLUSH_INTERVAL_S``, so recording adds no host sync per step;
the per-request totals cost one [B, 4] copy per step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fly_vllm import metrics
from fly_vllm.verifier import FlyVerifyOutput, token_layout

FLUSH_INTERVAL_S = 0.5


class StepCounts:
    """Adds each step's counts to this worker's metrics store."""

    def __init__(self, rule: str):
        self.rule_slot = metrics.ACCEPT_RULES.index(rule)
        self._pending: torch.Tensor | None = None
        self._last_flush = time.monotonic()

    def record(self, out: FlyVerifyOutput, cu_num_draft_tokens: torch.Tensor,
               masks: dict[str, torch.Tensor], req_ids: list | None = None) -> None:
        req, _, n = token_layout(cu_num_draft_tokens, out.positions.shape[0])
        none = torch.zeros_like(out.native)
        # [F, T] per-draft flags in metrics.SCALARS order after the first two.
        flags = torch.stack([
            out.native & out.in_prefix, out.loose_accepted, out.uncertain, out.gated,
            out.guard_vetoed,
            *[out.rule_vetoed & masks[r] if r in masks else none for r in metrics.GUARD_RULES],
            out.prefix_exact if out.prefix_exact is not None else none,
        ])
        loose = out.loose_accepted.long()
        counts = torch.cat([
            torch.stack([(n > 0).sum(), n.sum()]),
            flags.sum(dim=1),
            # Loose accepts by rule: this core's rule only.
            torch.nn.functional.one_hot(torch.tensor(self.rule_slot, device=n.device),
                                        len(metrics.ACCEPT_RULES)) * loose.sum(),
            torch.zeros(metrics.MAX_POSITIONS, dtype=torch.long,
                        device=n.device).scatter_add_(0, out.positions, loose),
        ]).long()
        if req_ids is not None:
            self._record_requests(req_ids, out, req, n)
        self._pending = counts if self._pending is None else self._pending + counts
        now = time.monotonic()
        if counts.device.type == "cpu" or now - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()
            self._last_flush = now

    @staticmethod
    def _record_requests(req_ids: list, out: FlyVerifyOutput, req: torch.Tensor,
                         n: torch.Tensor) -> None:
        """Per-request totals (metrics.RequestTable). ``req`` [T] and ``n`` [B]
        as from token_layout."""
        batch = n.shape[0]
        loose = torch.zeros(batch, dtype=torch.long, device=n.device).scatter_add_(
            0, req, out.loose_accepted.long())
        per_req = torch.stack([(n > 0).long(), n.long(), out.num_accepted.long() - loose,
                               loose], dim=1)
        metrics.request_table().add(req_ids, per_req.cpu().numpy())

    def flush(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        metrics.worker_store().add_array(pending.cpu().numpy().astype(np.int64))
