"""vLLM 0.32.0's own rejection-sampler tests, run on FlyRejectionSampler.

The test module ships only in vLLM's source release; fetch.py unpacks it into
the ignored .vllm032/ (``make vllm032-tests``; this test fetches it too when
it is missing, and skips, saying why, when it cannot). It runs once per
configuration (strict, FLy's entropy gate, its margin gate, FSD), each in its
own pytest process with tests/vllm_suite/fly_swap.py as a plugin, which also
holds the one list of expected failures and their reasons. Here: every test
not listed passed, every listed one failed (xfail, strict), FLy verified the
batches, strict never accepted loosely, and each failure listed as caused by
loose acceptance did accept loosely."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SCRATCH, vllm_env
from tests.vllm_suite import fetch as suite_fetch
from tests.vllm_suite.fly_suite_common import counts, fetched_or_skip, run_rules
from tests.vllm_suite.fly_swap import EXPECTED_FAILURES, LOOSE, RULES

DEST = ROOT / ".vllm032"
PLUGIN_DIR = ROOT / "tests" / "vllm_suite"
TIMEOUT_S = 900


def run_rule(rule: str) -> dict:
    """One pytest process over vLLM's file with our plugin; its report."""
    out = SCRATCH / "vllm032-suite"
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{rule}.json"
    report.unlink(missing_ok=True)
    # Only our plugin's folder on the path: vLLM's file imports its own
    # ``tests`` package (tests.v1.sample.utils), which ours would shadow.
    env = vllm_env(PYTHONPATH=str(PLUGIN_DIR), FLY_SUITE_RULE=rule,
                   FLY_SUITE_REPORT=str(report))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fly_swap",
         "--rootdir", str(DEST), "--confcutdir", str(DEST), str(suite_fetch.SUITE)],
        cwd=DEST, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    (out / f"{rule}.log").write_text(r.stdout + r.stderr)
    result = json.loads(report.read_text()) if report.exists() else {}
    return {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-3000:], **result}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    fetched_or_skip(suite_fetch, DEST, "rejection-sampler tests", "`make vllm032-tests`")
    return run_rules(RULES, run_rule)


@pytest.mark.parametrize("rule", list(RULES))
def test_vllm_rejection_sampler_suite(runs, rule):
    run = runs[rule]
    outcomes = run.get("outcomes")
    assert outcomes, f"no report from the {rule} run:\n{run['tail']}"
    print(f"{rule}: {counts(outcomes)}")
    expected = EXPECTED_FAILURES[rule]
    missing = sorted(set(expected) - set(outcomes))
    assert not missing, f"listed expected failures that vLLM's file no longer has: {missing}"
    wrong = {tid: o for tid, o in outcomes.items()
             if o != ("xfailed" if tid in expected else "passed")}
    assert not wrong, (f"{rule}: outcomes other than expected (a listed test that "
                       f"passed shows as 'failed', XPASS(strict)): {wrong}\n{run['tail']}")
    assert run["returncode"] == 0, run["tail"]
    # FLy, not vLLM, verified: the swap and the dispatcher took effect.
    assert run["fly_calls"] > 0
    loose = run["loose_accepted"]
    if rule == "strict":
        assert loose == {}
    else:  # the rule is live: it accepted loosely somewhere in the suite
        assert sum(loose.values()) > 0
    for tid in LOOSE[rule]:
        assert loose.get(tid, 0) > 0, f"{tid} is listed as failing by loose acceptance"
