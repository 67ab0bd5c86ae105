"""What both suite drivers (tests/test_vllm_sampler_suite.py for V1,
tests/test_vllm_v2_sampler_suite.py for V2) and their pytest plugins
(fly_swap.py, fly_swap_v2.py) share: fetching vLLM's files or skipping with
the reason, running the rules side by side, and reading a test's outcome.

Imported by the plugins as a top-level module (their folder is on the
subprocess's path, vLLM's own ``tests`` package shadows ours there) and by
the drivers from this package."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def fetched_or_skip(fetch, dest: Path, what: str, how: str) -> None:
    """vLLM's files for ``what`` in ``dest`` (fetch.py), or a pytest skip
    that says why and ``how`` to fetch them; also skips on another vLLM."""
    import pytest

    vllm = pytest.importorskip("vllm")
    if not vllm.__version__.startswith(fetch.VERSION):
        pytest.skip(f"these are vLLM {fetch.VERSION}'s tests; vLLM "
                    f"{vllm.__version__} is installed")
    try:
        fetch.fetch(dest)
    except (fetch.FetchError, OSError) as e:  # URLError is an OSError
        pytest.skip(f"vLLM {fetch.VERSION}'s {what} could not be fetched from its sdist "
                    f"({e}); {how} fetches them")


def run_rules(rules, run_rule: Callable[[str], dict]) -> dict[str, dict]:
    """One run per rule, at once where there are cores for them (each run
    keeps one thread)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(rules), os.cpu_count() or 1))) as ex:
        return dict(zip(rules, ex.map(run_rule, rules)))


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes.values():
        out[o] = out.get(o, 0) + 1
    return out


def outcome(report) -> str | None:
    """A test's outcome from one of its pytest reports (None: this report
    does not settle it): passed, failed (an XPASS(strict) too), skipped,
    xfailed or error."""
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return None
    if hasattr(report, "wasxfail") and report.skipped:
        return "xfailed"
    if report.when == "setup" and report.failed:
        return "error"
    return report.outcome
