"""A periodic log line for FLy, beside vLLM's "SpecDecoding metrics" line.

Loaded by vLLM through the ``vllm.stat_logger_plugins`` entry point (an
official extension point) in the front-end process; vLLM calls ``log()`` every
``VLLM_LOG_STATS_INTERVAL`` seconds when stats logging is on. The line covers
the interval since the previous one:

    FLy metrics: loose-accept rate 3.1% of drafts (12 loose, 160 native of 390
    drafted), uncertain mismatches 40, gated 95, vetoes: -inf 0, guards 2,
    loose by position [5, 4, 3], loose by rule: fly 12, drafter passes per
    step 3.1 (n-gram tokens 40)

(the drafter part only where a draft model drafted in the interval).
"""

from __future__ import annotations

import logging

import numpy as np
from vllm.v1.metrics.loggers import StatLoggerBase

from fly_vllm import metrics

logger = logging.getLogger("vllm.fly_vllm")  # under vLLM's handler


def format_line(delta: np.ndarray) -> str | None:
    """The log line for a [NUM_SLOTS] counter delta, or None if nothing was
    drafted in the interval."""
    idx = metrics.INDEX
    drafted = int(delta[idx["draft_tokens"]])
    if drafted <= 0:
        return None
    loose = int(delta[idx["loose_accepted_tokens"]])
    guards = sum(int(delta[idx[f"{r}_guard_vetoes"]]) for r in
                 ("digit", "structured", "eos_stop"))
    per_pos = delta[metrics.PER_POS_OFFSET:metrics.DRAFTER_OFFSET]
    last = int(np.flatnonzero(per_pos).max()) + 1 if per_pos.any() else 0
    by_rule = ", ".join(f"{r} {int(delta[metrics.BY_RULE_OFFSET + i])}"
                        for i, r in enumerate(metrics.ACCEPT_RULES)
                        if delta[metrics.BY_RULE_OFFSET + i])
    return (
        f"FLy metrics: loose-accept rate {loose / drafted:.1%} of drafts "
        f"({loose} loose, {int(delta[idx['native_accepted_tokens']])} native of "
        f"{drafted} drafted), uncertain mismatches "
        f"{int(delta[idx['uncertain_mismatches']])}, gated "
        f"{int(delta[idx['gated_mismatches']])}, vetoes: -inf "
        f"{int(delta[idx['guard_vetoes']])}, guards {guards}"
        + (f", judge {int(delta[idx['judge_vetoes']])}" if delta[idx['judge_vetoes']] else "")
        + ", loose by position "
        f"{[int(x) for x in per_pos[:last]]}"
        + (f", loose by rule: {by_rule}" if by_rule else "")
        + _drafter_part(delta, idx)
    )


def _drafter_part(delta: np.ndarray, idx: dict[str, int]) -> str:
    calls = int(delta[idx["drafter_calls"]])
    if calls <= 0:
        return ""
    return (f", drafter passes per step {delta[idx['drafter_passes']] / calls:.2f} "
            f"(n-gram tokens {int(delta[idx['drafter_ngram_tokens']])})")


class FlyStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        from fly_vllm.plugin import fly_config_of

        # The counters are summed over all workers, so one engine logs them.
        self.active = fly_config_of(vllm_config) is not None and engine_index == 0
        self.last = metrics.read_totals() if self.active else None

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
               engine_idx: int = 0):
        pass

    def log_engine_initialized(self):
        pass

    def log(self):
        if not self.active:
            return
        now = metrics.read_totals()
        line = format_line(now - self.last)
        self.last = now
        if line:
            logger.info(line)
