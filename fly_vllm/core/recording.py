"""What a verification step adds to fly-vllm's counters (fly_vllm.metrics):
the per-step totals, loose accepts per position and per rule, and each
request's own totals.

On the CPU each step's few values are summed with numpy and written at
once. On accelerators the totals are summed on the device and copied to the
host at most every ``FLUSH_INTERVAL_S``, so recording adds no host sync per
step; the per-request totals cost one [B, 4] copy per step.
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
        none = torch.zeros_like(out.native)
        # Per-draft flags [T] in metrics.SCALARS order after the first two.
        flags = [out.native & out.in_prefix, out.loose_accepted, out.uncertain, out.gated,
                 out.guard_vetoed,
                 *[out.rule_vetoed & masks[r] if r in masks else none
                   for r in metrics.GUARD_RULES],
                 out.prefix_exact if out.prefix_exact is not None else none]
        if out.native.device.type == "cpu":
            self._record_host(out, cu_num_draft_tokens, flags, req_ids)
        else:
            self._record_device(out, cu_num_draft_tokens, flags, req_ids)

    def record_exact(self, num_accepted: torch.Tensor | np.ndarray,
                     num_draft_tokens: list[int],
                     req_ids: list | None = None) -> None:
        """A step verified exactly by the runner itself (every request
        strict): drafts, draft tokens and native accepts ``num_accepted``
        [B]; nothing else happens in such a step."""
        drafts = sum(1 for k in num_draft_tokens if k > 0)
        if isinstance(num_accepted, torch.Tensor) and num_accepted.device.type != "cpu":
            acc = num_accepted.long()
            counts = torch.zeros(metrics.PER_POS_OFFSET + metrics.MAX_POSITIONS,
                                 dtype=torch.long, device=acc.device)
            counts[0], counts[1] = drafts, sum(num_draft_tokens)
            counts[2] = acc.sum()
            if req_ids is not None:
                nd = torch.tensor(num_draft_tokens, device=acc.device)
                metrics.request_table().add(req_ids, torch.stack(
                    [(nd > 0).long(), nd, acc, torch.zeros_like(acc)], 1).cpu().numpy())
            self._pending = counts if self._pending is None else self._pending + counts
            now = time.monotonic()
            if now - self._last_flush >= FLUSH_INTERVAL_S:
                self.flush()
                self._last_flush = now
            return
        # On the CPU this runs every step of a strict engine: plain ints,
        # no array built (a numpy or torch call costs more than the sums).
        acc = num_accepted.tolist()
        if req_ids is not None:
            table = metrics.request_table()
            for rid, k, a in zip(req_ids, num_draft_tokens, acc):
                if rid is not None and k > 0:
                    table.add_exact(rid, k, a)
        metrics.worker_store().add_first(drafts, sum(num_draft_tokens), sum(acc))

    def _record_host(self, out, cu_num_draft_tokens, flags, req_ids) -> None:
        """On the CPU: the step's few values summed with numpy (a torch op
        costs more than the arithmetic here) and written at once."""
        cu = cu_num_draft_tokens.numpy().astype(np.int64)
        n = np.diff(cu, prepend=0)  # [B]
        loose = out.loose_accepted.numpy()
        counts = np.zeros(metrics.PER_POS_OFFSET + metrics.MAX_POSITIONS, dtype=np.int64)
        counts[0], counts[1] = (n > 0).sum(), n.sum()
        counts[2:2 + len(flags)] = [int(f.numpy().sum()) for f in flags]
        counts[metrics.BY_RULE_OFFSET + self.rule_slot] = loose.sum()
        counts[metrics.PER_POS_OFFSET:] = np.bincount(
            out.positions.numpy()[loose], minlength=metrics.MAX_POSITIONS)
        if req_ids is not None:
            req = np.repeat(np.arange(n.shape[0]), n)
            per_loose = np.bincount(req[loose], minlength=n.shape[0])
            metrics.request_table().add(req_ids, np.stack(
                [n > 0, n, out.num_accepted.numpy() - per_loose, per_loose], axis=1))
        metrics.worker_store().add_array(counts)

    def _record_device(self, out, cu_num_draft_tokens, flags, req_ids) -> None:
        """On accelerators: summed on the device, copied to the host at most
        every FLUSH_INTERVAL_S (the per-request totals once a step)."""
        req, _, n = token_layout(cu_num_draft_tokens, out.positions.shape[0])
        loose = out.loose_accepted.long()
        counts = torch.cat([
            torch.stack([(n > 0).sum(), n.sum()]),
            torch.stack(flags).sum(dim=1),
            # Loose accepts by rule: this core's rule only.
            torch.nn.functional.one_hot(torch.tensor(self.rule_slot, device=n.device),
                                        len(metrics.ACCEPT_RULES)) * loose.sum(),
            torch.zeros(metrics.MAX_POSITIONS, dtype=torch.long,
                        device=n.device).scatter_add_(0, out.positions, loose),
        ]).long()
        if req_ids is not None:
            per_loose = torch.zeros(n.shape[0], dtype=torch.long, device=n.device
                                    ).scatter_add_(0, req, loose)
            per_req = torch.stack([(n > 0).long(), n.long(),
                                   out.num_accepted.long() - per_loose, per_loose], dim=1)
            metrics.request_table().add(req_ids, per_req.cpu().numpy())
        self._pending = counts if self._pending is None else self._pending + counts
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()
            self._last_flush = now

    def flush(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        metrics.worker_store().add_array(pending.cpu().numpy().astype(np.int64))
