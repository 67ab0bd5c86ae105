"""Which verifier runs, checked (fly_vllm.verify_path): each way an
accelerated verifier can fail (compile, launch, wrong result) falls back to
the torch reference with one warning and the same outputs; the Triton
kernels (under TRITON_INTERPRET=1 on CPU) pass the check."""

from __future__ import annotations

import logging

import pytest
import torch

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1.
triton = pytest.importorskip("triton")

from fly_vllm import metrics, verify_path  # noqa: E402
from fly_vllm.verify_cases import CaseShape, make_case  # noqa: E402
from fly_vllm.verify_path import (  # noqa: E402
    ENV, REFERENCES, Candidate, CheckedVerifier, Workload, compare, select)
from tests import faulty_verifiers  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = {  # faulty verifier -> what its error says
    "compile_error": "CompilationError: at",
    "launch_error": "Error: " if torch.cuda.is_available() else "0 active drivers",
    "wrong_result": "disagrees with the torch reference on output_token_ids",
}


@pytest.fixture
def warnings_():
    """The warnings fly-vllm logs (vLLM's logger does not propagate to
    pytest's caplog once vLLM is imported)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("vllm.fly_vllm")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def a_case(rule: str, seed: int = 7, **flags) -> dict:
    shape = CaseShape(3, 4, 50, **flags)
    return make_case(rule, torch.Generator().manual_seed(seed), shape, DEV)


def counts() -> dict:
    snap = metrics.snapshot()
    return {**snap["verifier_path"], "fallbacks": snap["verifier_fallbacks"]}


def delta(before: dict) -> dict:
    return {k: v - before[k] for k, v in counts().items() if v != before[k]}


# ------------------------------------------------------------ faulty ones


def test_the_faulty_verifiers_fail_as_named():
    args = a_case("fly")
    with pytest.raises(triton.compiler.errors.CompilationError, match="global"):
        faulty_verifiers.compile_error(**args)
    with pytest.raises((RuntimeError, ValueError)):
        faulty_verifiers.launch_error(**args)
    ref = REFERENCES["fly"](**args)
    wrong = faulty_verifiers.wrong_result(**args)
    assert compare(wrong, ref) == ["output_token_ids"]
    assert int((wrong.output_token_ids != ref.output_token_ids).sum()) == 1


# ---------------------------------------------------------------- choosing


def test_the_candidate_is_triton_on_gpus_and_none_elsewhere(monkeypatch):
    from fly_vllm.kernels import fly_verify_triton, fsd_verify_triton

    monkeypatch.delenv(ENV, raising=False)
    gpu = torch.device("cuda")  # a device, not a tensor: nothing runs
    assert verify_path.candidate(gpu, "fly").load() is fly_verify_triton
    assert verify_path.candidate(gpu, "fsd").load() is fsd_verify_triton
    assert verify_path.candidate(torch.device("cpu"), "fly") is None
    monkeypatch.setenv(ENV, "torch")
    assert verify_path.candidate(gpu, "fly") is None
    monkeypatch.setenv(ENV, "tests.faulty_verifiers:wrong_result")
    assert verify_path.candidate(torch.device("cpu"), "fsd").path == "custom"
    monkeypatch.setenv(ENV, "tests.faulty_verifiers")
    with pytest.raises(ValueError, match=f"{ENV}=.*'module:function'"):
        verify_path.candidate(gpu, "fly")


@pytest.mark.parametrize("rule", ["fly", "fsd"])
def test_cpu_runs_the_reference_unchecked(monkeypatch, warnings_, rule):
    monkeypatch.delenv(ENV, raising=False)
    before = counts()
    v = select(torch.device("cpu"), Workload(rule))
    assert (v.path, v.describe(), v.failure) == ("torch", "torch", None)
    assert delta(before) == {"torch": 1} and not warnings_
    args = make_case(rule, torch.Generator().manual_seed(3), CaseShape(3, 4, 50), "cpu")
    assert compare(v(**args), REFERENCES[rule](**args)) == []


# ---------------------------------------------------------------- falling back


@pytest.mark.parametrize("rule", ["fly", "fsd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_failing_candidate_falls_back_once(monkeypatch, warnings_, rule, mode):
    monkeypatch.setenv(ENV, f"tests.faulty_verifiers:{mode}")
    before = counts()
    v = select(DEV, Workload(rule, k=4, vocab=50))
    assert v.path == "torch" and MODES[mode] in v.failure
    assert v.describe().startswith(f"torch (custom tests.faulty_verifiers:{mode} failed: ")
    # One warning: the error, the device, and that torch verifies now.
    assert len(warnings_) == 1
    msg = warnings_[0].getMessage()
    assert MODES[mode] in msg and f"failed on {DEV}" in msg and "torch path" in msg
    assert delta(before) == {"torch": 1, "fallbacks": 1}
    for seed, flags in ((1, {}), (2, {"sampled": True, "veto": True, "margin": True})):
        args = a_case(rule, seed, **flags)
        assert compare(v(**args), REFERENCES[rule](**args)) == []
    assert len(warnings_) == 1


class LaterFailure:
    """Agrees through the probe, then raises ``error`` on every call."""

    def __init__(self, rule: str, error: BaseException):
        self.rule, self.error, self.calls, self.fail = rule, error, 0, False

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise self.error
        return REFERENCES[self.rule](*args, **kwargs)


def later(monkeypatch, rule: str, error: BaseException) -> tuple[CheckedVerifier, LaterFailure]:
    fn = LaterFailure(rule, error)
    cand = Candidate("custom", "custom later", "unused", "unused")
    monkeypatch.setattr(Candidate, "load", lambda self: fn)
    v = CheckedVerifier(DEV, cand, Workload(rule, k=2, vocab=30))
    assert v.path == "custom" and fn.calls > 0  # the probe ran it, and it passed
    fn.fail = True
    return v, fn


def a_compile_error() -> BaseException:
    try:
        faulty_verifiers.compile_error()
    except triton.compiler.errors.CompilationError as e:
        return e
    raise AssertionError("no CompilationError")


@pytest.mark.parametrize("rule", ["fly", "fsd"])
def test_a_compile_error_at_a_later_step_falls_back(monkeypatch, warnings_, rule):
    v, fn = later(monkeypatch, rule, a_compile_error())
    before, calls = counts(), fn.calls
    args = a_case(rule, 5, sampled=True)
    assert compare(v(**args), REFERENCES[rule](**args)) == []  # this step: torch
    assert v.path == "torch" and "CompilationError" in v.failure
    assert delta(before) == {"custom": -1, "torch": 1, "fallbacks": 1}
    v(**args)
    assert fn.calls == calls + 1  # never called again
    assert len(warnings_) == 1 and "at a later step" in warnings_[0].getMessage()


def test_other_errors_at_a_later_step_propagate(monkeypatch, warnings_):
    """A device fault cannot be recovered from: it is not swallowed."""
    v, _ = later(monkeypatch, "fly", RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        v(**a_case("fly"))
    assert v.path == "custom" and not warnings_


def test_a_probe_that_leaves_the_device_unusable_says_so(monkeypatch, warnings_):
    """After a fault inside a kernel no verifier can run in this process:
    a clear error instead of a fallback that would fail at its first step."""
    monkeypatch.setenv(ENV, "tests.faulty_verifiers:launch_error")
    monkeypatch.setattr(verify_path, "_usable", lambda device: False)
    with pytest.raises(RuntimeError, match=f"left the device unusable.*{ENV}=torch"):
        select(DEV, Workload("fly", k=2, vocab=30))
    assert not warnings_


# ---------------------------------------------------------------- the kernels


@pytest.mark.parametrize("rule", ["fly", "fsd"])
def test_the_triton_kernels_pass_the_check(monkeypatch, warnings_, rule):
    monkeypatch.delenv(ENV, raising=False)
    before = counts()
    v = CheckedVerifier(DEV, verify_path.triton_candidate(rule),
                        Workload(rule, k=3, vocab=40, entropy_top_k=2, fsd_variant="fallback"))
    assert (v.path, v.describe(), v.failure) == ("triton", "triton", None)
    assert delta(before) == {"triton": 1} and not warnings_


def test_the_probe_batches_exercise_the_rule():
    """The check is not vacuous: over the probe's batches the reference
    accepts loosely, gates, vetoes and keeps strict prefixes, in greedy and
    sampled rows, at every block size of max_spec_len."""
    for rule in ("fly", "fsd"):
        seen = {f: False for f in ("loose_accepted", "gated", "rule_vetoed",
                                   "prefix_exact", "native")}
        spec_lens = set()
        for shape, args in Workload(rule, k=6, vocab=64).cases("cpu"):
            out = REFERENCES[rule](**args)
            spec_lens.add(shape.spec_len)
            for f in seen:
                seen[f] |= bool(getattr(out, f).any())
        assert all(seen.values()), (rule, seen)
        assert spec_lens == {1, 2, 4, 6}


# ---------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_an_engine_with_a_wrong_verifier_verifies_with_torch(tiny_pair):
    """The engine builds FlyRejectionSampler with a verifier that gets one
    token wrong: the start-up check drops it with one warning, the log line
    and the metrics say torch, and the outputs are the torch path's."""
    from tests.conftest import SCRATCH, run_jobs
    from tests.test_e2e import GREEDY, PROMPTS, job, spec

    cfg = spec(tiny_pair["near"], fly={"entropy_threshold": 0.0, "window": 2})
    runs = run_jobs({"verify_path_torch": job(tiny_pair["target"], cfg),
                     "verify_path_wrong_result": {
                         **job(tiny_pair["target"], cfg, GREEDY),
                         "env": {ENV: "tests.faulty_verifiers:wrong_result"}}})
    plain, faulty = runs["verify_path_torch"], runs["verify_path_wrong_result"]
    assert faulty["token_ids"] == plain["token_ids"]
    assert len(faulty["token_ids"]) == len(PROMPTS)
    m = faulty["metrics"]
    assert m["vllm:fly_loose_accepted_tokens"] > 0  # the loose path ran
    assert (m["vllm:fly_verifier_path[path=torch]"], m["vllm:fly_verifier_path[path=custom]"],
            m["vllm:fly_verifier_fallbacks"]) == (1, 0, 1)
    assert (plain["metrics"]["vllm:fly_verifier_path[path=torch]"],
            plain["metrics"]["vllm:fly_verifier_fallbacks"]) == (1, 0)
    log = (SCRATCH / "jobs" / "verify_path_wrong_result.log").read_text()
    assert log.count("verifying with the torch path from now on") == 1
    assert ("FLy verification active: runner=V1, path=torch (custom tests.faulty_verifiers:"
            "wrong_result failed: disagrees with the torch reference on output_token_ids"
            in log)
    plain_log = (SCRATCH / "jobs" / "verify_path_torch.log").read_text()
    assert "FLy verification active: runner=V1, path=torch;" in plain_log
