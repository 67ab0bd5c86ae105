"""Tensor parallel 2 on this CPU against one process (fly_vllm.parallel):
the same tokens, for strict and the loose rules, greedy and seeded, and the
same counters, per engine and per request; the verifier path agreed over
the ranks when only one rank's check fails."""

from __future__ import annotations

import pytest

from tests.conftest import SCRATCH, job_cores, run_job, run_jobs
from tests.test_e2e import PROMPTS

pytestmark = pytest.mark.e2e

K = 4
GREEDY = {"max_tokens": 24, "temperature": 0.0}
# One request per prompt and group, in one batch.
GROUPS = {
    "strict": ({"strict": True}, False),
    "strict_seeded": ({"strict": True}, True),
    "entropy": ({}, False),
    "entropy_seeded": ({}, True),
    "margin": ({"gate": "margin", "margin": 4.0}, False),
    "prefix": ({"strict_prefix_tokens": 8}, False),
}
FSD_GROUPS = {"strict": ({"strict": True}, False), "loose": ({}, False),
              "loose_seeded": ({}, True)}
# Every rank of a TP engine runs on its own core (vLLM's binding list).
TP2 = {"engine": {"tensor_parallel_size": 2}}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def sampling(seeded: bool) -> list[dict]:
    if not seeded:
        return [GREEDY] * len(PROMPTS)
    return [{**GREEDY, "temperature": 1.0, "seed": 2000 + j} for j in range(len(PROMPTS))]


def groups_job(t: str, near: str, groups: dict, fly: dict) -> dict:
    return {"model": t, "prompts": PROMPTS * len(groups),
            "sampling": [s for _, seeded in groups.values() for s in sampling(seeded)],
            "extra_args": [{"fly": g} for g, _ in groups.values() for _ in PROMPTS],
            "max_num_seqs": len(PROMPTS) * len(groups),
            "speculative_config": {"method": "fly", "model": near,
                                   "num_speculative_tokens": K, "fly": fly}}


@pytest.fixture(scope="module")
def tp_runs(tiny_pair):
    if len(job_cores()) < 2:
        pytest.skip("tensor parallel 2 needs 2 cores")
    t, near = tiny_pair["target"], tiny_pair["near"]
    rules = groups_job(t, near, GROUPS, {"entropy_threshold": 0.0, "window": 2})
    fsd = groups_job(t, near, FSD_GROUPS, {"rule": "fsd", "fsd_threshold": 0.6})
    runs = run_jobs({"tp1_rules": rules, "tp1_fsd": fsd})
    # The rules at TP 2 with a candidate verifier that only rank 1's check
    # finds wrong: both ranks must verify with torch.
    faulty = {**rules, **TP2,
              "env": {"FLY_VLLM_VERIFIER": "tests.faulty_verifiers:wrong_on_tp_rank_1"}}
    runs["tp2_rules"] = run_job(faulty, "tp2_rules", env=TP2_ENV)
    runs["tp2_fsd"] = run_job({**fsd, **TP2}, "tp2_fsd", env=TP2_ENV)
    return runs


def fly_metrics(r: dict) -> dict:
    return {k: v for k, v in r["metrics"].items() if k.startswith("vllm:fly_")}


@pytest.mark.parametrize("kind", ["rules", "fsd"])
def test_tp2_gives_tp1s_tokens_and_counts(tp_runs, kind):
    one, two = tp_runs[f"tp1_{kind}"], tp_runs[f"tp2_{kind}"]
    assert two["token_ids"] == one["token_ids"]
    # Counted once per engine, not once per rank.
    a, b = fly_metrics(one), fly_metrics(two)
    if kind == "rules":  # tp2 fell back from the faulty candidate, once
        assert b.pop("vllm:fly_verifier_fallbacks") == 1
        assert a.pop("vllm:fly_verifier_fallbacks") == 0
    assert b == a
    assert two["fly_stats"] == one["fly_stats"]
    assert a["vllm:fly_draft_tokens"] > 0 and a["vllm:fly_loose_accepted_tokens"] > 0
    assert a["vllm:fly_verifier_path[path=torch]"] == 1


def test_tp2_loose_rules_accept_and_strict_does_not(tp_runs):
    n = len(PROMPTS)
    stats = tp_runs["tp2_rules"]["fly_stats"]
    loose = {g: sum(s["loose_accepted_tokens"] for s in stats[i * n:(i + 1) * n])
             for i, g in enumerate(GROUPS)}
    assert loose["strict"] == loose["strict_seeded"] == 0
    assert all(loose[g] > 0 for g in ("entropy", "entropy_seeded", "margin", "prefix")), loose


def test_tp2_ranks_agree_on_the_verifier_path(tp_runs):
    """Only rank 1's check of the candidate fails; rank 0 falls back too,
    says why, and the engine logs its start-up line once."""
    log = (SCRATCH / "jobs" / "tp2_rules.log").read_text()
    assert "another tensor-parallel rank's check failed" in log
    assert log.count("FLy verification active") == 1
    assert "path=torch (custom tests.faulty_verifiers:wrong_on_tp_rank_1 failed" in log
