"""A long mode run in parts: each part is its own engine run, cached on its
own, so that a run of hours that is stopped loses at most one part.

Greedy quality runs do not depend on which requests share the engine, so a
mode's requests may run in consecutive parts of ``size`` items; the parts'
outputs are joined in item order and their counters summed. Its timings are
the parts' sums (an engine start-up between parts is not counted, but every
part's tail, when fewer than ``concurrency`` requests are left, is): a run in
parts is for quality, not for speed.

    parts = split(items, 166)          # [[items 0..165], [166..331], ...]
    run = merge_runs([run_0, run_1])   # one run dict, as offline.run_mode's
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def split(items: Sequence[T], size: int | None) -> list[list[T]]:
    """Consecutive parts of at most ``size`` items (one part if size is None
    or covers them all)."""
    if size is not None and size < 1:
        raise ValueError(f"a part must hold at least one item, not {size}")
    if not size or size >= len(items):
        return [list(items)]
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def add_counters(total: dict, counters: dict) -> None:
    """Add ``counters`` into ``total``: numbers summed, vectors (such as
    accepts per position) summed position by position."""
    for k, v in counters.items():
        if isinstance(v, list):
            acc = total.setdefault(k, [])
            acc.extend([0] * (len(v) - len(acc)))
            for i, x in enumerate(v):
                acc[i] += x
        else:
            total[k] = total.get(k, 0) + v


def merge_runs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run dict from the runs of consecutive parts: results joined in
    order, counters and elapsed times summed (per group too), ``parts`` the
    number of parts."""
    if not parts:
        raise ValueError("no parts to merge")
    out: dict[str, Any] = {"elapsed": 0.0, "results": [], "counters": {},
                           "group_counters": {}, "group_elapsed": {}, "parts": len(parts)}
    for p in parts:
        out["elapsed"] += p["elapsed"]
        out["results"].extend(p["results"])
        add_counters(out["counters"], p.get("counters", {}))
        for g, c in p.get("group_counters", {}).items():
            add_counters(out["group_counters"].setdefault(g, {}), c)
        for g, e in p.get("group_elapsed", {}).items():
            out["group_elapsed"][g] = out["group_elapsed"].get(g, 0.0) + e
    return out
