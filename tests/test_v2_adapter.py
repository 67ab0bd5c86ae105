"""FLy's model runner V2 adapter against vLLM V2's own RejectionSampler, at
``_verify``, on random batches (tests/v2cpu/adapter_check.py, run in one
process under the V2 harness): strict rows are vLLM's, loose rows carry
their drafts and then the token vLLM itself emits at their first rejection,
FSD's corrections from p are vLLM's draws from p, and our uniforms are
vLLM's ``tl_rand32`` bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import ROOT, SCRATCH, v2_env


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("vllm")
    out = SCRATCH / "v2-adapter.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "tests.v2cpu.adapter_check", str(out)],
                       cwd=ROOT, env=v2_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def totals(report: dict, kind: str) -> Counter:
    t = Counter()
    for case in report["cases"]:
        if case["kind"] == kind:
            for key in ("equal_rows", "loose_rows", "oracle_ok"):
                t[key] += case[key]
            t["bad"] += len(case["bad_rows"]) + len(case["oracle_bad"])
    return t


@pytest.mark.parametrize("kind", ["strict", "strict_core"])
def test_strict_rows_are_vllms(report, kind):
    t = totals(report, kind)
    assert t["bad"] == 0 and t["loose_rows"] == 0
    assert t["equal_rows"] >= 40  # every row of 20 random batches


def test_loose_rows_end_with_vllms_own_token(report):
    t = totals(report, "loose")
    assert t["bad"] == 0
    assert t["loose_rows"] > 0 and t["oracle_ok"] == t["loose_rows"]
    assert t["equal_rows"] > 0  # rows without a loose accept stay vLLM's


def test_fsd_corrections_are_vllms_draws_from_p(report):
    t = totals(report, "fsd")
    assert t["bad"] == 0
    assert t["loose_rows"] > 0 and t["oracle_ok"] == t["loose_rows"]


def test_uniforms_are_vllms(report):
    assert report["uniforms_match"] is True
