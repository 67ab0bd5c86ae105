"""``fly-vllm selftest`` on this CPU: the torch path's invariants pass and
say that the Triton kernels were not checked; a wrong verifier injected
through FLY_VLLM_VERIFIER fails it; ``--interpret`` checks the kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fly_vllm import cli, selftest
from fly_vllm.verify_cases import CaseShape, make_case
from fly_vllm.verify_path import ENV, REFERENCES
from tests.conftest import ROOT

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's output")


@cpu_only
def test_cpu_checks_the_torch_path_and_says_so(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert cli.main(["selftest", "--batches", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "No GPU found: the Triton kernels were not checked" in out
    for rule in ("fly", "fsd"):
        assert f"| {rule} | 4 random batches: torch reference invariants |" in out
    assert "| judge | 4 random steps: torch score vs the head's own |" in out
    assert out.count("| ok |") == 3 and out.rstrip().endswith("fly-vllm selftest: ok")


@pytest.mark.parametrize("mode, why", [
    ("wrong_result", "disagrees with the torch reference on output_token_ids"),
    ("compile_error", "CompilationError"),
])
def test_a_faulty_verifier_fails_the_selftest(monkeypatch, capsys, mode, why):
    monkeypatch.setenv(ENV, f"tests.faulty_verifiers:{mode}")
    assert selftest.main(["--batches", "3", "--rule", "fsd", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert f"custom tests.faulty_verifiers:{mode} vs torch reference" in out
    assert "| FAILED 3/3 |" in out and "FAIL fsd batch 0 (" in out and why in out
    assert "fly-vllm selftest: FAILED" in out


def test_the_invariants_catch_broken_outputs():
    args = make_case("fly", torch.Generator().manual_seed(4),
                     CaseShape(4, 5, 40, veto=True, margin=True), "cpu")
    out = REFERENCES["fly"](**args)
    assert selftest.invariants("fly", args, out) == []
    short = int(torch.nonzero(out.num_accepted < 5)[0, 0])  # a row with padding
    out.output_token_ids[short, -1] = 3
    out.loose_accepted |= args["veto"]
    broken = selftest.invariants("fly", args, out)
    assert f"request {short}: tokens after the correction" in broken
    assert "a draft vetoed was accepted loosely" in broken


@cpu_only
def test_interpret_checks_the_triton_kernels():
    r = subprocess.run([sys.executable, "-m", "fly_vllm.cli", "selftest", "--interpret",
                        "--batches", "3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    for rule in ("fly", "fsd"):
        assert (f"| {rule} | 3 random batches: triton (TRITON_INTERPRET=1) vs torch "
                "reference | 1-4 x 1-5 x 17-64 | ok |") in r.stdout
    assert ("| judge | 3 random steps: triton (TRITON_INTERPRET=1) vs torch score | "
            "0-20 x 16-200 | ok |") in r.stdout


@pytest.mark.parametrize("rule", ["fly", "fsd"])
def test_timing_rows_check_then_time(monkeypatch, rule):
    """The GPU's timing rows, with a stand-in clock on the CPU: each shape is
    checked first, and a verifier that disagrees is not timed."""
    from tests import faulty_verifiers

    monkeypatch.setattr(selftest, "TIMING_SHAPES", ((2, 3, 50), (1, 2, 40)))
    timed = []
    monkeypatch.setattr(selftest, "gpu_time_us", lambda fn: timed.append(fn()) or 2.0)
    rows = selftest.timing_rows(rule, REFERENCES[rule], "cpu", 0, bandwidth=1e9)
    per_read = 4 * (1 if rule == "fly" else 2)  # float32 logits, or p and q
    assert rows == [
        [rule, "check + timing, greedy float32", "2x3x50", "ok", "2.0", "2.0", "2.0",
         f"{2 * 3 * 50 * per_read / 1e3:.1f}"],
        [rule, "check + timing, greedy float32", "1x2x40", "ok", "2.0", "2.0", "2.0",
         f"{1 * 2 * 40 * per_read / 1e3:.1f}"]]
    assert len(timed) == 6
    rows = selftest.timing_rows(rule, faulty_verifiers.wrong_result, "cpu", 0, 1e9)
    assert rows[0][3].startswith("FAILED: disagrees") and rows[0][4] == "nan"
    assert len(timed) == 10  # the reference and the argmax only


def test_a_wrong_judge_score_fails_its_check(monkeypatch):
    """Either path, wrong: a Triton score that drops the bias, and a torch
    path whose folding forgets the scaler's mean. Each fails its row."""
    from fly_vllm.judge import kernel_check
    from fly_vllm.judge.head import JudgeHead
    from fly_vllm.kernels import judge_score

    real = judge_score.judge_score_triton
    failures: list[str] = []
    monkeypatch.setattr(judge_score, "judge_score_triton",
                        lambda *a, **k: real(a[0], a[1], a[2], a[3], 0.0, *a[5:], **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    row = kernel_check.check_row(4, 0, "cpu", "triton", True, failures)
    assert row[0] == "judge" and row[3].startswith("FAILED") and len(failures) >= 3
    assert "disagrees with the torch path" in failures[0]
    monkeypatch.setattr(judge_score, "judge_score_triton", real)
    assert kernel_check.check_row(4, 0, "cpu", "torch", False, [])[3] == "ok"

    folded = JudgeHead.folded

    def no_mean(self, device=None):
        w, _ = folded(self, device)
        return w, w.new_tensor(self.bias)

    monkeypatch.setattr(JudgeHead, "folded", no_mean)
    failures = []
    assert kernel_check.check_row(4, 0, "cpu", "torch", False, failures)[3] == "FAILED 4/4"
    assert "disagrees with the head's own score" in failures[0]


def test_judge_timing_rows_check_then_time(monkeypatch):
    from fly_vllm.judge import kernel_check
    from fly_vllm.kernels import judge_score

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernel_check, "TIMING_SHAPES", ((5, 32), (0, 16)))
    timed = []
    rows = kernel_check.timing_rows("cpu", 0, 1e9, lambda fn: timed.append(fn()) or 3.0)
    assert rows == [["judge", "check + timing, h_post bf16", "5 x 32", "ok", "3.0", "3.0", "",
                     f"{5 * 32 * 2 / 1e3:.1f}"],
                    ["judge", "check + timing, h_post bf16", "0 x 16", "ok", "3.0", "3.0", "",
                     "0.0"]]
    assert len(timed) == 4
    monkeypatch.setattr(judge_score, "judge_score_triton",
                        lambda *a, **k: a[0].new_zeros(a[1].shape[0], dtype=torch.float32))
    rows = kernel_check.timing_rows("cpu", 0, 1e9, lambda fn: timed.append(fn()) or 3.0)
    assert rows[0][3].startswith("FAILED: disagrees") and rows[0][4] == ""
    assert len(timed) == 7  # the torch path only, where the kernel disagreed


@cpu_only
def test_a_gpu_asked_for_on_the_cpu_is_a_usage_error(capsys):
    assert selftest.main(["--device", "cuda"]) == 2
    assert "torch sees no GPU" in capsys.readouterr().err


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "TRITON_INTERPRET")}
    return {**env, "PYTHONPATH": str(ROOT)}
