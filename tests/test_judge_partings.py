"""benchmarks/judge_partings.py: the target's states at a parting, read from
one cached pass per item, are those of a pass from scratch over the prompt,
the common prefix and the mode's token; and the separation's interval holds
its value and says which way harm lies."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("judge_partings",
                                              ROOT / "benchmarks" / "judge_partings.py")
jp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(jp)


def test_cached_states_are_a_pass_from_scratch(tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    lm.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 400, (9,), generator=g).tolist()
    base = torch.randint(3, 400, (20,), generator=g).tolist()
    spots = [(0, 7), (5, 11), (19, base[19] + 1)]  # the first token, the middle, the last
    got = jp._hidden_at(lm, prompt, base, spots)
    for (i, t), (two, logits) in zip(spots, got):
        with torch.no_grad():
            ref = lm.model(input_ids=torch.tensor([prompt + base[:i] + [t]])).last_hidden_state[0]
            torch.testing.assert_close(two, ref[-2:], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits, lm.lm_head(ref[-2:-1]), rtol=1e-4, atol=1e-4)
    assert jp.check_cache(lm, prompt, base, spots[1]) < 1e-4
    # A token other than the one at i changes h_post, not h_pre.
    (a, _), (b, _) = jp._hidden_at(lm, prompt, base, [(5, 11), (5, 12)])
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).norm() > 1e-3


def test_separation_interval():
    changed, kept = [0.9, 0.8, 0.7, 0.95], [0.1, 0.2, 0.3, 0.15, 0.05]
    lo, hi = jp.separation_ci(changed, kept)
    assert lo <= 1.0 <= hi and lo > 0.5
    lo, hi = jp.separation_ci(kept, changed)
    assert hi < 0.5
    mixed = jp.separation_ci([0.1, 0.9, 0.5], [0.2, 0.8, 0.4])
    assert mixed[0] < 0.5 < mixed[1]
    assert jp.separation_ci([], kept) is None
    assert jp.summarise([{"p_important": 0.9, "answer_changed": True},
                         {"p_important": 0.1, "answer_changed": False},
                         {"p_important": 0.5}])["separation"] == 1.0


def test_nothing_to_score():
    assert jp.score_partings(None, None, None, {}, {"m": []})[0] == {"m": []}
