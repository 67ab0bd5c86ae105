"""fly_vllm.bench.parting: where loose outputs part from the target's, how
often a parted output changes its answer (split by the target's own), and
the loose-accept budget a gain and an agreement bar leave."""

from __future__ import annotations

import json

import pytest

from fly_vllm.bench import parting
from tests.conftest import gsm8k_folder


def test_loose_budget_extrapolates_a_points_own_rates():
    # 300 tokens an output; strict 4.0, the point 4.4 tokens a step with 3
    # loose accepts an output: steps fall by 1 - 4/4.4 = 1/11, 300/11 tokens'
    # worth, so one accept saves 300/33 tokens, and 1.10x (1/11 of steps)
    # needs exactly the 3 it has. Half the outputs part, a fifth of those
    # change the answer: 0.97 lets 15% part, at 6 accepts per parted output
    # 0.9 accepts, which gives 1 / (1 - 0.9 / 33).
    b = parting.loose_budget(300, 4.0, 4.4, 3.0, 0.5, 0.2)
    assert b["tokens_per_loose_accept"] == pytest.approx(300 / 33)
    assert b["loose_accepts_needed"] == pytest.approx(3.0)
    assert b["parted_share_allowed"] == pytest.approx(0.15)
    assert b["loose_accepts_allowed"] == pytest.approx(0.9)
    assert b["gain_at_allowed"] == pytest.approx(1 / (1 - 0.9 / 33))
    # No gain, no parting or no changed answer: nothing to extrapolate.
    assert parting.loose_budget(300, 4.0, 3.9, 3.0, 0.5, 0.2) is None
    assert parting.loose_budget(300, 4.0, 4.4, 0.0, 0.0, 0.2) is None
    assert parting.loose_budget(300, 4.0, 4.4, 3.0, 0.5, 0.0) is None
    # An agreement every parting can afford lets every output part.
    assert parting.loose_budget(300, 4.0, 4.4, 3.0, 0.5, 0.02)["parted_share_allowed"] == 1.0
    lines = parting.budget_table({"m": b})
    assert "| m | 9.1 | 3.0 | 15% | 0.90 | 1.028x |" in lines


def test_divergence_profile_splits_by_the_targets_own_answer(tmp_path):
    gsm8k_folder(tmp_path, 4)

    def raw(name, mode, outs):
        res = [{"id": f"gsm8k-{i}", "group": "gsm8k", "token_ids": ids,
                "text": f"#### {ans}", "fly_stats": {"loose_accepted_tokens": n}}
               for i, (ids, ans, n) in enumerate(outs)]
        (tmp_path / "raw" / f"{name}.json").write_text(json.dumps(
            {"mode": mode, "temperature": 0, "run": {"results": res}}))

    # The target is right on items 0 and 1, wrong on 2 and 3.
    raw("a", "no-spec", [([1, 2, 3], 0, 0), ([1, 2, 3], 1, 0),
                         ([1, 2, 3], 9, 0), ([1, 2, 3], 9, 0)])
    # The loose mode parts on items 1 (same answer), 2 (new answer) and 3
    # (new answer), at tokens 2, 0 and 1.
    raw("b", "loose", [([1, 2, 3], 0, 0), ([1, 2, 4], 1, 1),
                       ([5, 2, 3], 2, 1), ([1, 6, 3], 7, 2)])
    prof = parting.divergence_profile(tmp_path)["loose"]
    assert (prof["n"], prof["parted"], prof["answer_changed"]) == (4, 3, 2)
    assert prof["changed_given_parted"] == pytest.approx(2 / 3)
    assert prof["by_target"] == {"right": {"n": 2, "parted": 1, "answer_changed": 0},
                                 "wrong": {"n": 2, "parted": 2, "answer_changed": 2}}
    assert prof["by_first_parting"][0] == {"from": 0, "to": 32, "parted": 3,
                                           "answer_changed": 2}
    assert prof["loose_accepts_per_output"] == 1.0
    row = parting.profile_table({"loose": prof}, "calibration")[-2]
    assert row.endswith("| 1/2 (0) | 2/2 (2) |")

    # A mode still running in parts is read from raw/unfinished/ (as the
    # harness's --cached-only left it), unless it has finished since.
    (tmp_path / "raw" / "unfinished").mkdir()
    for mode in ("loose", "later"):
        res = [{"id": "gsm8k-0", "group": "gsm8k", "token_ids": [1, 2, 9], "text": "#### 5"}]
        (tmp_path / "raw" / "unfinished" / f"{mode}.json").write_text(json.dumps(
            {"mode": mode, "temperature": 0, "unfinished": {"parts": 1, "of": 4},
             "run": {"results": res}}))
    profs = parting.divergence_profile(tmp_path)
    assert profs["loose"] == prof
    assert (profs["later"]["n"], profs["later"]["parted"]) == (1, 1)


def test_separation_is_the_chance_a_harmful_parting_ranks_above_a_harmless_one():
    # Every changed value above every kept one: 1; all below: 0; ties half.
    assert parting.separation([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert parting.separation([1.0], [2.0, 3.0]) == 0.0
    assert parting.separation([1.0, 2.0], [1.0, 2.0]) == 0.5
    # 2 > 1 and 2 = 2 against [1, 2], 0 < both: (1 + 0.5 + 0) / 4.
    assert parting.separation([2.0, 0.0], [1.0, 2.0]) == pytest.approx(0.375)
    assert parting.separation([], [1.0]) is None and parting.separation([1.0], []) is None


def test_gap_summary_splits_partings_by_whether_the_answer_changed():
    rows = [{"gap_nats": 0.1, "target_top_logprob": -0.9, "answer_changed": True},
            {"gap_nats": 0.5, "target_top_logprob": -0.3, "answer_changed": True},
            {"gap_nats": 0.2, "target_top_logprob": -0.5, "answer_changed": False},
            {"target_top_logprob": -0.2, "answer_changed": False},  # below the top read
            {"gap_nats": 9.0, "answer_changed": None}]  # not GSM8K: left out
    s = parting.gap_summary(rows)
    assert (s["partings"], s["changed"], s["beyond_top"]) == (4, 2, 1)
    assert s["gap"]["separation"] == pytest.approx(0.5)  # 0.1 < 0.2 < 0.5
    assert s["gap"]["kept_quartiles"] == [0.2, 0.2, 0.2]
    assert s["gap"]["changed_quartiles"][1] in (0.1, 0.5)
    # The changed partings were where the target was less sure: -0.9 and -0.3
    # against -0.5 and -0.2 (1 of 4 pairs above, none tied).
    assert s["top_logprob"]["separation"] == pytest.approx(0.25)
    assert parting.gap_summary([])["gap"]["separation"] is None


def test_ceiling_loosens_the_outputs_that_save_most_first():
    # K 4: at most 5 tokens a step. (tokens, steps): the first can fall from
    # 20 steps to 10, the second not at all, the third from 10 to 6, the
    # fourth from 10 to 4; 50 steps for 150 tokens in all.
    outs = [(50, 20), (50, 10), (30, 10), (20, 10), (7, 0)]
    c = parting.ceiling(outs, 4, changed=0.3)
    assert c["outputs"] == 4  # an output without steps tells nothing
    assert c["strict_length"] == pytest.approx(3.0)
    assert c["gain_all"] == pytest.approx(50 / 30)
    # 0.97 with a 30% change rate lets a tenth of the outputs part: 0.4 of
    # the first, 4 steps.
    assert c["share_allowed"] == pytest.approx(0.1)
    assert c["gain_at_bar"] == pytest.approx(50 / 46)
    # 1.10x needs 50 / 11 steps saved: 0.4545 of the first output, a share
    # of 0.4545 / 4, which affords a change rate of 0.03 over that share.
    assert c["share_needed"] == pytest.approx(50 / 11 / 10 / 4)
    assert c["changed_allowed"] == pytest.approx(0.03 / (50 / 11 / 10 / 4))
    # At an 8% change rate 0.375 of the outputs, 1.5 of them, may part: all
    # of the first (10 steps) and half of the fourth, which saves 6 and so
    # comes before the third's 4. At 1% every output may part.
    c = parting.ceiling(outs, 4, changed=0.03 / 0.375)
    assert c["gain_at_bar"] == pytest.approx(50 / (50 - 10 - 6 * 0.5))
    assert parting.ceiling(outs, 4, changed=0.01)["gain_at_bar"] == pytest.approx(50 / 30)
    # A gain no rule can reach at this K: nothing is needed or allowed.
    c = parting.ceiling(outs, 4, changed=0.3, gain=2.0)
    assert c["share_needed"] is None and c["changed_allowed"] is None
    # A gain strict already has needs no output loosened and allows any
    # change rate; a gain a few steps buy allows at most every answer changed.
    for g in (1.0, 0.9):
        c = parting.ceiling(outs, 4, changed=0.3, gain=g)
        assert c["share_needed"] == 0.0 and c["changed_allowed"] == 1.0
    c = parting.ceiling(outs, 4, changed=0.3, gain=50 / 49.9)
    assert c["share_needed"] == pytest.approx(0.1 / 10 / 4)
    assert c["changed_allowed"] == 1.0
    assert parting.ceiling([], 4, changed=0.3) is None
    assert parting.ceiling([(9, 0)], 4, changed=0.3) is None
    lines = parting.ceiling_table({"strict K4": parting.ceiling(outs, 4, changed=0.3)})
    assert "| strict K4 | 3.00 | 1.667x | 11% | 26.4% | 30% | 10% | 1.087x |" in lines
