"""The judge gate and its config, without an engine: the features it reads,
its veto, the head's pair checks, the config keys, window 0."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fly_vllm.config import FlyConfigError, parse_fly_config, request_overrides
from fly_vllm.judge.features import assemble, components, width
from fly_vllm.judge.gate import JudgeGate, judge_veto, load_gate
from fly_vllm.judge.head import JudgeHead, JudgeHeadError
from fly_vllm.verifier import fly_verify

H, V = 8, 50


def head(tmp_path, features=("h_post",), pair=None, threshold=0.5, seed=0):
    rng = np.random.default_rng(seed)
    d = width(features, H)
    h = JudgeHead(features, rng.normal(size=d), 0.1, rng.normal(size=d) * 0.1,
                  rng.uniform(0.5, 2, size=d), threshold,
                  pair or {"target": "org/Target-1B", "drafter": "org/Draft-0.1B",
                           "hidden_size": H, "vocab_size": V})
    path = tmp_path / "head.json"
    h.save(path)
    return JudgeHead.load(path)


def step(seed=0, n=(3, 2)):
    """A spec-decode step: requests with n drafts; logits rows as vLLM lays
    them out ([n_b + 1] per request), target_logits_indices into them."""
    g = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    for k in n:
        rows += list(range(start, start + k))
        start += k + 1
    hidden = torch.randn(start, H, generator=g)
    logits = torch.randn(len(rows), V, generator=g)
    drafts = torch.randint(0, V, (len(rows),), generator=g)
    return hidden, torch.tensor(rows), logits, drafts


def test_components_read_the_rows_the_docstring_names():
    hidden, rows, logits, drafts = step()
    parts = components(hidden, rows, logits, drafts)
    # h_pre: the row whose logits verify the draft; h_post: the next row
    # (the state after reading the draft), the bonus row for a last draft.
    assert torch.equal(parts["h_pre"], hidden[rows])
    assert torch.equal(parts["h_post"], hidden[rows + 1])
    assert torch.equal(parts["h_post"][2], hidden[3])  # request 0's last draft: bonus row
    logp = logits.log_softmax(-1)
    assert torch.allclose(parts["draft_logprob"][:, 0], logp.gather(1, drafts[:, None])[:, 0],
                          atol=1e-5)
    assert torch.allclose(parts["margin"][:, 0],
                          logp.max(-1).values - parts["draft_logprob"][:, 0], atol=1e-5)
    x = assemble(parts, ("h_post", "margin"))
    assert x.shape == (rows.shape[0], H + 1)
    # numpy in, numpy out, same numbers (training's path).
    xn = assemble({k: v.numpy() for k, v in parts.items()}, ("h_post", "margin"))
    assert np.allclose(xn, x.numpy())


def test_gate_scores_as_the_head_does(tmp_path):
    h = head(tmp_path, features=("h_post", "h_pre", "margin"))
    hidden, rows, logits, drafts = step()
    gate = JudgeGate(h)
    p = gate.probability(hidden, rows, logits, drafts)
    ref = h.score_numpy(assemble({k: v.numpy() for k, v in
                                  components(hidden, rows, logits, drafts).items()},
                                 h.features))
    assert np.allclose(p.numpy(), ref, atol=1e-5)
    thr = torch.full_like(p, float(np.median(ref)))
    imp = gate.important(hidden, rows, logits, drafts, thr)
    assert torch.equal(imp, ~(p < thr)) and 0 < int(imp.sum()) < p.numel()
    # Without hidden states (vLLM's warm-up) every draft is important: exact.
    assert gate.important(None, None, logits, drafts, thr).all()


def test_judge_veto_only_touches_judged_requests(tmp_path):
    gate = JudgeGate(head(tmp_path))
    hidden, rows, logits, drafts = step()
    assert judge_veto(gate, [None, None], [3, 2], hidden, rows, logits, drafts) is None
    assert judge_veto(None, [0.5, 0.5], [3, 2], hidden, rows, logits, drafts) is None
    v = judge_veto(gate, [0.0, None], [3, 2], hidden, rows, logits, drafts)
    # threshold 0: nothing passes in request 0; request 1 is not judged.
    assert v.tolist() == [True, True, True, False, False]
    v = judge_veto(gate, [1.0, 0.0], [3, 2], hidden, rows, logits, drafts)
    assert v[3:].all() and not v[:3].any()
    # A step without drafts (every request's K cut to 0) scores nothing.
    assert judge_veto(gate, [0.5], [0], hidden, rows[:0], logits[:0], drafts[:0]) is None
    empty = gate.important(hidden, rows[:0], logits[:0], drafts[:0], torch.zeros(0))
    assert empty.shape == (0,)


def test_window_zero_rescues_any_candidate():
    """W = 0 (the judge without a window): an open-gated mismatch is accepted
    whatever follows, even at the last draft; W = 1 needs the next to match."""
    V2 = 6
    logits = torch.full((3, V2), -5.0)
    logits[:, 0] = 0.0  # argmax 0 everywhere
    logits[:, 1] = -0.1  # draft 1 is close
    drafts = torch.tensor([1, 1, 1])
    common = dict(entropy_threshold=torch.tensor([0.0]), entropy_top_k=3)
    out0 = fly_verify(drafts, torch.tensor([3]), logits, torch.tensor([[4]]), 3,
                      window=torch.tensor([0]), window_span=torch.tensor([0]), **common)
    assert out0.output_token_ids.tolist() == [[1, 1, 1, 4]]
    out1 = fly_verify(drafts, torch.tensor([3]), logits, torch.tensor([[4]]), 3,
                      window=torch.tensor([1]), window_span=torch.tensor([1]), **common)
    assert out1.output_token_ids.tolist() == [[0, -1, -1, -1]]
    # The judge's veto stops a candidate the gate let through.
    outv = fly_verify(drafts, torch.tensor([3]), logits, torch.tensor([[4]]), 3,
                      window=torch.tensor([0]), window_span=torch.tensor([0]),
                      veto=torch.tensor([False, True, False]), **common)
    assert outv.output_token_ids.tolist() == [[1, 0, -1, -1]]


def config(tmp_path, **fly):
    return {"method": "fly", "model": "/models/Draft-0.1B", "num_speculative_tokens": 4,
            "fly": {"gate": "judge", "judge_path": str(tmp_path / "head.json"), **fly}}


def test_config_keys_and_errors(tmp_path):
    head(tmp_path)
    _, fly = parse_fly_config(config(tmp_path, window=0, judge_threshold=0.2))
    assert (fly.gate, fly.window, fly.judge_threshold) == ("judge", 0, 0.2)
    assert "margin" not in fly.rule_settings() and "judge_path" in fly.rule_settings()
    for extra, words in [({"judge_threshold": 1.5}, "judge_threshold must be a number in"),
                         ({"margin": 0.3}, "margin belongs to the margin test"),
                         ({"judge_path": str(tmp_path / "none.json")}, "not found"),
                         ({"window": -1}, "window")]:
        with pytest.raises(FlyConfigError, match=words):
            parse_fly_config(config(tmp_path, **extra))
    with pytest.raises(FlyConfigError, match="needs fly.judge_path"):
        parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                          "fly": {"gate": "judge"}})
    # Window 0 is the judge's only.
    with pytest.raises(FlyConfigError, match="window"):
        parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                          "fly": {"window": 0}})
    with pytest.raises(FlyConfigError, match="judge_path belongs to the judge test"):
        parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                          "fly": {"judge_path": "x.json"}})
    # Another drafter than the head's: refused, naming both.
    spec = config(tmp_path)
    spec["model"] = "/models/Other-Draft"
    with pytest.raises(FlyConfigError, match="drafter '/models/Other-Draft' .*Draft-0.1B"):
        parse_fly_config(spec)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(FlyConfigError, match="not a fly-vllm-judge/1 file"):
        parse_fly_config(config(tmp_path, judge_path=str(tmp_path / "bad.json")))


def test_per_request_judge_keys(tmp_path):
    head(tmp_path)
    _, fly = parse_fly_config(config(tmp_path, window=2))
    assert request_overrides({"fly_judge_threshold": "0.3", "fly_window": 0}, 4,
                             fly=fly) == {"judge_threshold": 0.3, "window": 0}
    with pytest.raises(FlyConfigError, match="judge_threshold must be a number in"):
        request_overrides({"fly_judge_threshold": 2}, 4, fly=fly)
    _, margin = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                                  "fly": {"gate": "margin"}})
    with pytest.raises(FlyConfigError, match="needs a server started with a judge head"):
        request_overrides({"fly_gate": "judge"}, 4, fly=margin)
    with pytest.raises(FlyConfigError, match="window must be an integer in 1..3"):
        request_overrides({"fly_window": 0}, 4, fly=margin)


def test_worker_refuses_a_head_for_another_target(tmp_path):
    head(tmp_path)
    _, fly = parse_fly_config(config(tmp_path))

    def runner(model, hidden, vocab):  # the target's model config, as a worker has it
        return SimpleNamespace(model=model, get_hidden_size=lambda: hidden,
                               get_vocab_size=lambda: vocab)

    assert load_gate(fly, runner("/srv/Target-1B", H, V), "cpu") is not None
    for r, words in [(runner("/srv/Target-1B", H * 2, V), "hidden_size 16 .the head's: 8."),
                     (runner("/srv/Target-1B", H, V + 1), "vocab_size 51"),
                     (runner("/srv/Other-7B", H, V), "target '/srv/Other-7B'")]:
        with pytest.raises(FlyConfigError, match=words):
            load_gate(fly, r, "cpu")


def test_head_file_errors(tmp_path):
    h = head(tmp_path)
    d = h.to_dict()
    for change, words in [({"weights": d["weights"][:-1]}, "differ in length"),
                          ({"scale": [0.0] * len(d["scale"])}, "scale > 0"),
                          ({"threshold": 2}, "threshold must be in"),
                          ({"features": ["h_post", "nope"]}, "unknown judge feature")]:
        (tmp_path / "x.json").write_text(json.dumps({**d, **change}))
        with pytest.raises((JudgeHeadError, ValueError), match=words):
            JudgeHead.load(tmp_path / "x.json")
    del d["bias"]
    (tmp_path / "x.json").write_text(json.dumps(d))
    with pytest.raises(JudgeHeadError, match="missing bias"):
        JudgeHead.load(tmp_path / "x.json")


def test_check_config_describes_the_head(tmp_path, capsys):
    from fly_vllm.cli import main

    h = head(tmp_path)
    h.summary = {"test_auc": 0.8123, "n_test_items": 40}
    h.save(tmp_path / "head.json")
    cfg = tmp_path / "fly.json"
    cfg.write_text(json.dumps(config(tmp_path, window=0)))
    assert main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert '"gate": "judge"' in out and '"margin"' not in out
    assert "Judge head:" in out and "held-out AUC 0.812 on 40 items" in out
    assert "features h_post; default threshold 0.5" in out
