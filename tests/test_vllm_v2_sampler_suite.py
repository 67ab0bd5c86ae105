"""vLLM 0.32.0's own model runner V2 verification tests, run on
FlyV2RejectionSampler.

vLLM's tests/v1/spec_decode/test_rejection_sampler_utils.py and
tests/v1/worker/test_gpu_rejection_sampler_{chunking,i64}.py ship only in its
source release; fetch.py unpacks them into the ignored .vllm032/ (this test
fetches them when they are missing, and skips, saying why, when it cannot).
They run once per configuration (strict, FLy's entropy gate), each in its own
pytest process under the V2 harness (tests/v2cpu) with
tests/vllm_suite/fly_swap_v2.py as a plugin, which holds the one list of
expected failures (with their reasons and errors) and of the tests not run
(with why). Here: every test ran as planned (passed, failed as listed with
the listed error, or skipped as listed), FLy's sampler verified in every test
that reaches it and in none that does not, strict never accepted loosely, the
loose rule did, and each failure listed as caused by loose acceptance
accepted loosely. The runs go one after the other: each is one busy core
(Triton's interpreter), and the times printed stay those of one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SCRATCH, V2_HARNESS, v2_env
from tests.vllm_suite import fetch as suite_fetch
from tests.vllm_suite.fly_suite_common import counts, fetched_or_skip, run_rules
from tests.vllm_suite.fly_swap_v2 import (CLASS_TESTS, EXPECTED_FAILURES, LOOSE, NOT_RUN,
                                          ROUTED_TESTS, RULES, VLLM_ONLY_TESTS, plan)

DEST = ROOT / ".vllm032"
PLUGIN_DIR = ROOT / "tests" / "vllm_suite"
TIMEOUT_S = 900


def run_rule(rule: str) -> dict:
    """One pytest process over vLLM's three files with our plugin; its
    report, and its wall and CPU seconds."""
    out = SCRATCH / "vllm032-v2-suite"
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{rule}.json"
    report.unlink(missing_ok=True)
    env = v2_env(FLY_SUITE_RULE=rule, FLY_SUITE_REPORT=str(report))
    # The harness and our plugin only: vLLM's files import their own
    # ``tests`` package, which ours (the repository root) would shadow.
    env["PYTHONPATH"] = os.pathsep.join([str(V2_HARNESS), str(PLUGIN_DIR)])
    wall = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fly_swap_v2",
         "--rootdir", str(DEST), "--confcutdir", str(DEST),
         *map(str, suite_fetch.V2_SUITES)],
        cwd=DEST, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.monotonic() - wall
    (out / f"{rule}.log").write_text(r.stdout + r.stderr)
    result = json.loads(report.read_text()) if report.exists() else {}
    return {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-3000:],
            "wall_s": wall, **result}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    pytest.importorskip("triton")  # the harness runs vLLM's V2 kernels in its interpreter
    fetched_or_skip(suite_fetch, DEST, "V2 rejection-sampler tests",
                    "`python tests/vllm_suite/fetch.py`")
    return run_rules(RULES, run_rule)


def _listed(names, outcomes) -> list[str]:
    """The names (test ids, or parametrized functions) no test matches."""
    return [n for n in names if not any(t == n or t.startswith(n + "[") for t in outcomes)]


def _in(tid: str, names) -> bool:
    return any(tid == n or tid.startswith(n + "[") for n in names)


@pytest.mark.parametrize("rule", list(RULES))
def test_vllm_v2_rejection_sampler_suite(runs, rule):
    run = runs[rule]
    outcomes = run.get("outcomes")
    assert outcomes, f"no report from the {rule} run:\n{run['tail']}"
    print(f"{rule}: {counts(outcomes)} in {run['wall_s']:.0f} s")
    expected = EXPECTED_FAILURES[rule]
    stale = _listed([*expected, *NOT_RUN, *CLASS_TESTS, *ROUTED_TESTS, *VLLM_ONLY_TESTS],
                    outcomes)
    assert not stale, f"listed tests that vLLM's files no longer have: {stale}"
    want = {"run": "passed", "xfail": "xfailed", "skip": "skipped"}
    wrong = {tid: (o, plan(tid, rule)) for tid, o in outcomes.items()
             if o != want[plan(tid, rule)[0]]}
    assert not wrong, (f"{rule}: outcomes other than planned (a listed failure that "
                       f"passed shows as 'failed', XPASS(strict)): {wrong}\n{run['tail']}")
    assert run["returncode"] == 0, run["tail"]
    # Each listed failure failed the way its reason says.
    for tid, o in outcomes.items():
        if o == "xfailed":
            exp = plan(tid, rule)[1]
            assert exp.match in run["errors"].get(tid, ""), (tid, run["errors"].get(tid))
    # FLy's sampler verified where vLLM's tests verify, and only there.
    calls = run["fly_calls_per_test"]
    ran = [tid for tid, o in outcomes.items() if o != "skipped"]
    missed = [t for t in ran if _in(t, ROUTED_TESTS) and not calls.get(t)]
    assert not missed, f"tests routed to FLy that FLy did not verify in: {missed}"
    assert not [t for t in ran if _in(t, VLLM_ONLY_TESTS) and calls.get(t)]
    # The class swap took effect: the one class test that reaches _verify
    # (test_replay_on_off_...) reached FLy's.
    assert calls.get(CLASS_TESTS[2]), "FLy's _verify never ran in a class test"
    loose = run["loose_accepted"]
    if rule == "strict":
        assert loose == {}
    else:  # the rule is live: it accepted loosely somewhere in the suite
        assert sum(loose.values()) > 0
    for tid in LOOSE[rule]:
        assert loose.get(tid, 0) > 0, f"{tid} is listed as failing by loose acceptance"
