"""pytest plugin that runs vLLM's own model runner V2 verification tests on
fly-vllm's FlyV2RejectionSampler, and the one list of what we expect there.

tests/test_vllm_v2_sampler_suite.py runs vLLM 0.32.0's
tests/v1/spec_decode/test_rejection_sampler_utils.py and
tests/v1/worker/test_gpu_rejection_sampler_{chunking,i64}.py (fetched by
fetch.py into the ignored .vllm032/) once per configuration in RULES, each in
its own pytest process under the V2 harness (tests/v2cpu: vLLM's Triton
kernels run in Triton's interpreter) with ``-p fly_swap_v2`` and
FLY_SUITE_RULE set. The test bodies are vLLM's, unchanged. Around them:

* Through the class (CLASS_TESTS): the modules' ``RejectionSampler`` name is
  rebound to a subclass of FlyV2RejectionSampler that carries this run's
  FLy config. vLLM's tests build their samplers with ``object.__new__`` and
  set vLLM's attributes by hand, skipping ``__init__``; such a sampler is
  completed by FlyV2RejectionSampler's own ``__init__`` when it first
  verifies, so FLy's refusals (block, synthetic, adaptive, watermarking)
  apply to it as to any other.
* Through the kernel: most tests call vLLM's module-level
  ``rejection_sample`` directly. That is vLLM's kernel, which the plugin
  leaves unchanged and FLy's V2 sampler itself calls (vLLM's ``_verify``
  runs it, then FLy extends the rows it accepts loosely). So that these
  tests verify through FLy too, the test modules' ``rejection_sample`` name
  (theirs only: vLLM's ``_verify`` and FLy's own draws still reach vLLM's
  kernel) is routed to the call V2's ``RejectionSampler._verify`` makes: a
  FLy sampler over a stand-in Sampler that holds the call's temperatures and
  seeds, its ``_verify`` on the call's arguments. vLLM's tests hand in logits
  with sampling params already applied, so the stand-in applies none, and
  ``_verify`` hands the kernel exactly the call's arguments: under strict
  verification a routed test checks FLy's rows against vLLM's kernel
  semantics. The watermarking and Gumbel kernels the tests call (FLy refuses
  watermarking) stay vLLM's and check only the harness.
* Size: the kernel tests run in Triton's interpreter, about 7 ms per logits
  row on this CPU; those of tens of thousands of trials (the distribution,
  synthetic and block-verification tests) and the ~5 GiB int64-indexing
  ones are not run (NOT_RUN, a skip with the reason); the rest are
  (ROUTED_TESTS through FLy, VLLM_ONLY_TESTS on vLLM's kernels alone).
* CUDA: the tests ask for it (a module-level skip, ``skipif`` marks, tensors
  on ``"cuda"``, ``torch.cuda.get_rng_state``). Here "cuda" is this CPU:
  the import-time check sees CUDA while vLLM's test modules are imported,
  the "Requires CUDA" marks are dropped from the tests that run, and inside
  each test a torch function mode makes every tensor asked for on "cuda" on
  the CPU, whose generator is the "CUDA" RNG state.

Every test either passes, fails as listed in EXPECTED_FAILURES (marked
xfail(strict=True, raises=...), so an unexpected pass, or a failure of
another type, fails as loudly as an unexpected failure; the driver also
matches the error's text), or is not run as listed in NOT_RUN. Each test
starts from the same torch seed.

FLY_SUITE_REPORT names a JSON file written at the end: each test's outcome
and error text, how many batches FLy's sampler verified (overall and per
test), and per test the drafts it accepted loosely (fly-vllm's counters).

Importing this module is cheap (the driver reads the lists from it); vLLM and
fly_vllm are imported in pytest_configure.
"""

from __future__ import annotations

import contextvars
import json
import os
from types import SimpleNamespace
from typing import NamedTuple

import pytest

try:  # as the drivers import it
    from tests.vllm_suite.fly_suite_common import outcome
except ImportError:  # as a plugin in vLLM's tree, whose own ``tests`` package shadows ours
    from fly_suite_common import outcome

# FlyConfig keyword arguments per rule; window 1 as in the V1 suite (the
# smallest, so the gate can act at the tests' K of 1 to 3).
RULES = {
    "strict": {"strict": True},
    "entropy": {"gate": "entropy", "window": 1},
}

UTILS = "test_rejection_sampler_utils.py"
CHUNKING = "test_gpu_rejection_sampler_chunking.py"
I64 = "test_gpu_rejection_sampler_i64.py"

# The tests that verify through the RejectionSampler class. All the others
# call kernels (or, test_iter_request_chunks_preserves_request_boundaries, a
# module function FLy does not override).
CLASS_TESTS = (f"{UTILS}::test_verify_rejects_unproposed_drafts",
               f"{CHUNKING}::test_chunked_scores_match_full_batch",
               f"{CHUNKING}::test_replay_on_off_preserves_rejection_sampling_and_rng")

# --- failures, expected and explained --------------------------------------


class Expected(NamedTuple):
    reason: str
    raises: str  # the exception's type name (xfail's raises=)
    match: str  # text its message must hold (checked by the driver)


_BLOCK = Expected(
    "refused by design: the test builds its sampler with use_block_verification="
    "True (rejection_sample_method 'block'), which FlyV2RejectionSampler refuses "
    "(ValueError from its __init__, run when the hand-built sampler first "
    "verifies): block verification accepts prefixes by its own rule, so there is "
    "no per-draft exact decision for FLy to extend",
    "ValueError", "rejection_sample_method 'block'")
_STAND_IN = Expected(
    "the test's stand-in Sampler carries what vLLM's own _verify reads "
    "(sampling_states.temperature.gpu, seeds.gpu, top_k.np), and FLy's _verify "
    "also reads sampling_states.temperature.np, the host copy that V2's real "
    "SamplingStates keeps (a UvaBackedTensor), to tell greedy from sampled "
    "requests without a device sync. Not a verification result; FLy's _verify "
    "against vLLM's on V2 batches is tests/test_v2_adapter.py",
    "AttributeError", "has no attribute 'np'")
_LOGPROB_BITS = Expected(
    "harness limit, not FLy: under rule strict FLy keeps vLLM's rows and reads no "
    "host copy, so the test runs on to compare the logprobs vLLM's own kernel "
    "computed with torch.log_softmax by torch.equal; in Triton's interpreter they "
    "differ in the last bits (-1.9459 against -1.9459). vLLM's own V2 sampler, "
    "unswapped, fails the same assertion under this harness",
    "AssertionError", "assert False")
_ALL_NAN_GREEDY = Expected(
    "harness limit, not FLy: Triton's interpreter (3.9) computes tl.max(..., "
    "return_indices=True) with numpy's nanargmax, which raises on an all-NaN "
    "block, where a GPU returns an index; vLLM's greedy path "
    "(_compute_local_logits_stats_kernel) takes it on the test's all-NaN logits "
    "before mapping NaN to -inf. The same test at temperature 1 passes",
    "InterpreterError", "All-NaN slice encountered")
# Per rule, by test id (pytest's name in its file).
EXPECTED_FAILURES: dict[str, dict[str, Expected]] = {rule: {
    f"{UTILS}::test_verify_rejects_unproposed_drafts": _BLOCK,
    f"{UTILS}::test_all_nan_target_logits_in_range[0.0]": _ALL_NAN_GREEDY,
    f"{CHUNKING}::test_replay_on_off_preserves_rejection_sampling_and_rng":
        _LOGPROB_BITS if rule == "strict" else _STAND_IN,
} for rule in RULES}
# Failures that loose acceptance causes by design (the driver checks that the
# rule accepted loosely in each). None: the tests run here hold under FLy's
# loose acceptance too; the distribution tests, where loose acceptance would
# show, are too big to run here (NOT_RUN).
LOOSE: dict[str, dict[str, Expected]] = {rule: {} for rule in RULES}
for _rule in RULES:
    EXPECTED_FAILURES[_rule].update(LOOSE[_rule])

# --- which tests run -------------------------------------------------------

# Kernel tests small enough for the interpreter (seconds each; names are test
# ids or their parametrized functions). Those that call rejection_sample
# verify through FLy (routed); the others call only vLLM's watermarking
# kernels (or a module function of vLLM's) and check the harness.
ROUTED_TESTS = (
    f"{UTILS}::test_repeated_draft_context_does_not_change_acceptance",
    f"{UTILS}::test_repeated_context_skip_mask_is_read_per_row_in_a_block",
    f"{UTILS}::test_repeated_recovery_context_uses_ordinary_residual_sample",
    f"{UTILS}::test_repeated_bonus_context_uses_ordinary_target_sample",
    f"{UTILS}::test_repeated_context_does_not_change_unwatermarked_or_greedy_rows",
    f"{UTILS}::test_all_nan_target_logits_in_range",
    f"{UTILS}::test_placeholder_draft_token_rejected",
    f"{UTILS}::test_greedy_placeholder_emits_target_argmax",
    f"{UTILS}::test_chunked_requests_match_full_batch",
    f"{UTILS}::test_watermarked_recovery_leaves_disabled_rows_on_the_stock_draw",
)
VLLM_ONLY_TESTS = (
    f"{UTILS}::test_watermarked_bonus_uses_target_key",
    f"{UTILS}::test_watermarked_recovery_uses_target_key",
    f"{UTILS}::test_watermarked_recovery_supports_smaller_draft_vocabulary",
    f"{CHUNKING}::test_iter_request_chunks_preserves_request_boundaries",
)


def _big(what: str) -> str:
    return (f"too big for Triton's interpreter within the test budget "
            f"(about 7 ms per logits row on this CPU): {what}")


# Test (or parametrized function) -> why it is not run, in any run.
NOT_RUN = {
    f"{UTILS}::test_stochastic_rejection_sample":
        _big("40,960 trials of K+1 rows x 4,096 tokens, 1 to 3 drafts each"),
    f"{UTILS}::test_gumbel_drafted_rejection_sample_is_unbiased":
        _big("200,000 trials"),
    f"{UTILS}::test_greedy_rejection_sample": _big("40,960 trials x 4,096 tokens"),
    f"{UTILS}::test_placeholder_blocks_later_draft_tokens":
        _big("16,384 trials of 4 rows x 4,096 tokens"),
    f"{UTILS}::test_synthetic_rejection_sample":
        _big("40,960 trials; and synthetic acceptance, which FLy refuses"),
    f"{UTILS}::test_block_verification_rejection_sample":
        _big("40,960 trials; and block verification, which FLy refuses"),
    f"{UTILS}::test_block_verification_accepts_at_least_as_many":
        _big("81,920 trials, twice; and block verification, which FLy refuses"),
    f"{UTILS}::test_block_verification_placeholder_truncates_block":
        _big("81,920 trials; and block verification, which FLy refuses"),
    f"{UTILS}::test_watermarked_recovery_matches_philox_gumbel_sample":
        _big("30 to 110 s a case here (4 cases; they pass); vLLM's watermarking "
             "kernels only, which FLy refuses"),
    f"{UTILS}::test_watermarked_recovery_is_unchanged_by_fp64_gumbel":
        _big("13 s here (it passes); vLLM's watermarking kernels only, which FLy "
             "refuses"),
    f"{I64}::test_block_verification_i64_indexing":
        ("vLLM's block-verification kernel (refused by FLy) at int64 offsets: each "
         "case allocates ~5 GiB (5,500 requests of 155,264-token logits) and is a "
         "GPU test (its 'Requires CUDA' mark is kept)"),
}

RULE = os.environ.get("FLY_SUITE_RULE", "strict")
SEED = 0

_state: dict = {"calls": 0}
_outcomes: dict[str, str] = {}  # test id -> passed / failed / xfailed / skipped / error
_errors: dict[str, str] = {}  # test id -> its exception, one line
_loose: dict[str, int] = {}  # test id -> drafts FLy accepted loosely in it
_calls: dict[str, int] = {}  # test id -> batches FLy's sampler verified in it


def suite_id(nodeid: str) -> str:
    """"file.py::test[params]" from pytest's node id."""
    path, name = nodeid.split("::", 1)
    return f"{path.rsplit('/', 1)[-1]}::{name}"


def _entry(tid: str, names) -> str | None:
    """The entry of ``names`` that ``tid`` is, or is a parametrization of."""
    for name in names:
        if tid == name or tid.startswith(name + "["):
            return name
    return None


def plan(tid: str, rule: str) -> tuple[str, object]:
    """("run", None), ("xfail", Expected) or ("skip", reason) for a test."""
    if (name := _entry(tid, NOT_RUN)) is not None:
        return "skip", NOT_RUN[name]
    if _entry(tid, CLASS_TESTS + ROUTED_TESTS + VLLM_ONLY_TESTS) is None:
        return "skip", "not classified in fly_swap_v2 (new in vLLM's file?)"
    if (name := _entry(tid, EXPECTED_FAILURES[rule])) is not None:
        return "xfail", EXPECTED_FAILURES[rule][name]
    return "run", None


# --- "cuda" is this CPU ----------------------------------------------------


def _is_cuda(x) -> bool:
    import torch

    if isinstance(x, torch.device):
        return x.type == "cuda"
    return isinstance(x, str) and x.split(":")[0] == "cuda"


def _cpu_mode():
    """A torch function mode under which a tensor asked for on "cuda" (a
    ``device=`` argument, or ``Tensor.to``'s) is made on the CPU."""
    import torch
    from torch.overrides import TorchFunctionMode

    cpu = torch.device("cpu")

    class CudaIsThisCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": cpu}
            if func is torch.Tensor.to:
                args = tuple(cpu if _is_cuda(a) else a for a in args)
            return func(*args, **kwargs)

    return CudaIsThisCpu()


# --- FLy's sampler where vLLM's tests verify --------------------------------


def _suite_sampler_class(fly, warmup):
    from fly_vllm.core import VerificationCore
    from fly_vllm.runners.v2 import FlyV2RejectionSampler

    class SuiteFlyV2RejectionSampler(FlyV2RejectionSampler):
        """What vLLM's tests call ``RejectionSampler``: FLy's V2 sampler with
        this run's config, on this CPU."""

        def __init__(self, sampler, spec_config, device=None, *, watermark_key=None):
            core = VerificationCore(fly, spec_config.num_speculative_tokens, "cpu")
            super().__init__(sampler, spec_config, "cpu", core, warmup,
                             watermark_key=watermark_key)

        def _verify(self, *args, **kwargs):
            if "core" not in vars(self):
                self._complete()
            _state["calls"] += 1
            return super()._verify(*args, **kwargs)

        def _complete(self) -> None:
            """A sampler made with ``object.__new__``, vLLM's attributes set
            by the test: FLy's ``__init__`` on a spec config that says what
            they say (so it refuses what FLy cannot extend), then the test's
            attributes as it set them."""
            mine = dict(vars(self))
            k = mine["num_speculative_steps"]
            method = ("block" if mine.get("use_block_verification") else
                      "synthetic" if mine.get("synthetic_conditional_rates") is not None
                      else "standard")
            spec = SimpleNamespace(
                num_speculative_tokens=k, rejection_sample_method=method,
                synthetic_acceptance_rates=[1.0] * k,
                enable_adaptive_verification=mine.get("enable_adaptive_verification",
                                                      False))
            try:
                type(self).__init__(self, mine["sampler"], spec,
                                    watermark_key=mine.get("watermark_key"))
            finally:
                vars(self).update(mine)

    return SuiteFlyV2RejectionSampler


class _HostAndDevice(SimpleNamespace):
    """Stands in for V2's UvaBackedTensor: the same values on the host
    (``.np``) and on the device (``.gpu``)."""

    @classmethod
    def of(cls, t):
        return cls(gpu=t, cpu=t, np=t.cpu().numpy())


def _routed_rejection_sample(sampler_cls):
    """vLLM's ``rejection_sample`` as V2's ``RejectionSampler._verify`` calls
    it, verified by FLy's sampler (module doc)."""
    import torch

    def rejection_sample(target_logits, draft_logits, draft_sampled, cu_num_logits, pos,
                         idx_mapping, expanded_idx_mapping, expanded_local_pos,
                         temperature, seed, num_speculative_steps,
                         synthetic_conditional_rates=None, use_fp64=False,
                         use_block_verification=False):
        zeros = torch.zeros(temperature.shape[0], dtype=torch.int32)
        sampler = SimpleNamespace(
            apply_sampling_params=lambda logits, *args: logits,  # applied by the test
            use_fp64_gumbel=use_fp64,
            sampling_states=SimpleNamespace(temperature=_HostAndDevice.of(temperature),
                                            seeds=_HostAndDevice.of(seed)),
            req_states=SimpleNamespace(prompt_len=_HostAndDevice.of(zeros)))
        method = ("block" if use_block_verification else
                  "synthetic" if synthetic_conditional_rates is not None else "standard")
        spec = SimpleNamespace(
            num_speculative_tokens=num_speculative_steps, rejection_sample_method=method,
            synthetic_acceptance_rates=[1.0] * num_speculative_steps,
            enable_adaptive_verification=False)
        fly = sampler_cls(sampler, spec)
        _, sampled, num_sampled = fly._verify(
            target_logits, draft_logits, draft_sampled, pos, cu_num_logits, idx_mapping,
            idx_mapping.cpu().numpy(), expanded_idx_mapping, expanded_local_pos, None,
            draft_sampled)
        return sampled, num_sampled

    return rejection_sample


# --- pytest hooks ----------------------------------------------------------


def pytest_configure(config):
    # vLLM's modules that the test files import, imported before the
    # import-time CUDA check is answered "yes" for the test modules only.
    import vllm.config.model  # noqa: F401
    import vllm.v1.spec_decode.utils  # noqa: F401
    import vllm.v1.watermarking.spec_decode  # noqa: F401
    import vllm.v1.worker.gpu.sample.gumbel  # noqa: F401
    import vllm.v1.worker.gpu.sample.output  # noqa: F401
    import vllm.v1.worker.gpu.sample.watermark  # noqa: F401
    import vllm.v1.worker.gpu.spec_decode.rejection_sampler as v2_mod
    import vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils as utils_mod

    from fly_vllm import metrics
    from fly_vllm.config import FlyConfig

    fly = FlyConfig(**RULES[RULE])
    warmup = contextvars.ContextVar("fly_suite_v2_warmup", default=False)
    sampler_cls = _suite_sampler_class(fly, warmup)
    _state.update(vllm_sampler=v2_mod.RejectionSampler, fly_sampler=sampler_cls,
                  vllm_kernel=utils_mod.rejection_sample,
                  routed_kernel=_routed_rejection_sample(sampler_cls),
                  loose_total=lambda: metrics.snapshot()["loose_accepted_tokens"])


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """vLLM's test modules are imported believing CUDA is there (the utils
    module skips itself at import otherwise)."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    import torch

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        return (yield)
    finally:
        torch.cuda.is_available = available


def _exception_type(name: str) -> type[BaseException]:
    if name == "InterpreterError":
        from triton.runtime.errors import InterpreterError

        return InterpreterError
    return {"ValueError": ValueError, "AttributeError": AttributeError,
            "AssertionError": AssertionError}[name]


def _requires_cuda(mark) -> bool:
    return mark.name == "skipif" and mark.kwargs.get("reason") == "Requires CUDA"


def pytest_collection_modifyitems(session, config, items):
    for module in {item.module for item in items if getattr(item, "module", None)}:
        if getattr(module, "RejectionSampler", None) is _state["vllm_sampler"]:
            module.RejectionSampler = _state["fly_sampler"]
        if getattr(module, "rejection_sample", None) is _state["vllm_kernel"]:
            module.rejection_sample = _state["routed_kernel"]
    for item in items:
        what, how = plan(suite_id(item.nodeid), RULE)
        if what == "skip":
            item.add_marker(pytest.mark.skip(reason=how))
            continue
        item.own_markers[:] = [m for m in item.own_markers if not _requires_cuda(m)]
        if what == "xfail":
            item.add_marker(pytest.mark.xfail(
                reason=how.reason, raises=_exception_type(how.raises), strict=True))


@pytest.fixture(autouse=True)
def _on_this_cpu(monkeypatch):
    import torch

    torch.manual_seed(SEED)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": torch.get_rng_state())
    with _cpu_mode():
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    loose, calls = _state["loose_total"](), _state["calls"]
    try:
        return (yield)
    finally:
        tid = suite_id(item.nodeid)
        if n := _state["loose_total"]() - loose:
            _loose[tid] = n
        if n := _state["calls"] - calls:
            _calls[tid] = n


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "call" and call.excinfo is not None:
        _errors[suite_id(item.nodeid)] = call.excinfo.exconly().splitlines()[0][:500]
    return report


def pytest_runtest_logreport(report):
    settled = outcome(report)
    if settled is not None:
        _outcomes[suite_id(report.nodeid)] = settled


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FLY_SUITE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"rule": RULE, "fly_calls": _state["calls"], "outcomes": _outcomes,
                       "errors": _errors, "fly_calls_per_test": _calls,
                       "loose_accepted": _loose}, f, indent=1)
