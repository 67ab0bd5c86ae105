"""The judge's Triton score (kernels/judge_score.py) against the torch path of
``JudgeScore`` (score.py), under TRITON_INTERPRET=1 on CPU (natively on a GPU): every
feature spec, hidden sizes that are not a multiple of the block, fp32 and
bf16 hidden states, steps without drafts, the last rows of the hidden states;
and the score's choice of path and its fallback. Small shapes: the interpreter
is slow."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1.
triton = pytest.importorskip("triton")

from fly_vllm import metrics  # noqa: E402
from fly_vllm.judge.features import assemble, components, width  # noqa: E402
from fly_vllm.judge.gate import JudgeGate  # noqa: E402
from fly_vllm.judge.score import JudgeScore, score_path  # noqa: E402
from fly_vllm.judge.head import JudgeHead  # noqa: E402
from fly_vllm.kernels import judge_score  # noqa: E402
from fly_vllm.kernels.judge_score import judge_score_triton  # noqa: E402
from fly_vllm.verify_path import ENV  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
V = 40
ALL = ("margin", "h_post", "entropy", "h_pre", "draft_logprob", "top_logprob")
SPECS = {"h_post": ("h_post",), "h_pre": ("h_pre",), "h_post+h_pre": ("h_post", "h_pre"),
         "h_post+h_pre+scalars": ALL}  # scalars around the hidden parts: slices at odd offsets
# z is a sum of D terms, in another order on each path: they agree within
# RTOL of the terms' magnitude sum(|w'_i x_i|) + |b'| (a z near 0 is a
# cancellation, where a tolerance relative to z itself means nothing).
RTOL = 1e-5


def make_head(spec, hidden_size, seed=0) -> JudgeHead:
    rng = np.random.default_rng(seed)
    d = width(spec, hidden_size)
    return JudgeHead(spec, rng.normal(size=d), -0.3, rng.normal(size=d) * 0.2,
                     rng.uniform(0.5, 2.0, size=d), 0.5,
                     {"target": "t", "drafter": "d", "hidden_size": hidden_size,
                      "vocab_size": V})


def make_step(hidden_size, n=(3, 1, 4), dtype=torch.float32, seed=0):
    """vLLM's layout: request b has n_b drafts and n_b + 1 rows of hidden
    states; ``rows`` (target_logits_indices) are each draft's verifying row,
    so the last draft's rows + 1 is the last row of ``hidden``."""
    g = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    for k in n:
        rows += range(start, start + k)
        start += k + 1
    hidden = (torch.randn(start, hidden_size, generator=g) * 2).to(dtype)
    logits = torch.randn(len(rows), V, generator=g) * 3
    drafts = torch.randint(-1, V, (len(rows),), generator=g)  # -1: a placeholder
    return (hidden.to(DEV), torch.tensor(rows, dtype=torch.int32, device=DEV),
            logits.to(DEV), drafts.to(DEV))


def assert_same_z(z, z_ref, head, hidden, rows, logits, drafts):
    score = torch_score(head)
    x = assemble(components(hidden, rows, logits, drafts, names=head.features), head.features)
    scale = x.abs() @ score.weight.abs() + score.bias.abs()
    assert z.dtype == torch.float32 and z.shape == z_ref.shape == scale.shape
    bad = (z - z_ref).abs() > RTOL * scale
    assert not bad.any(), (f"z differs at {bad.nonzero().flatten().tolist()}: "
                           f"{z[bad].tolist()} vs {z_ref[bad].tolist()}")


def triton_score(head) -> JudgeScore:
    """A score on the Triton path even on the CPU (the interpreter), its
    first-step check already passed."""
    score = JudgeScore(head, DEV)
    score.path, score._checked = "triton", True
    return score


def torch_score(head) -> JudgeScore:
    score = JudgeScore(head, DEV)
    score.path = "torch"
    return score


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden_size", [96, 200])
@pytest.mark.parametrize("spec", list(SPECS))
def test_triton_score_equals_the_torch_path(spec, hidden_size, dtype):
    head = make_head(SPECS[spec], hidden_size)
    args = make_step(hidden_size, dtype=dtype)
    z_ref = torch_score(head).logit(*args)
    z = triton_score(head).logit(*args)
    assert z.shape == (args[1].shape[0],)
    assert_same_z(z, z_ref, head, *args)
    # A score that does not depend on its inputs would pass the line above
    # only if the reference were constant: it is not.
    assert float(z_ref.std()) > 0.1
    gate = JudgeGate(head, DEV)  # the gate reads the score it holds
    gate.score = triton_score(head)
    p = gate.probability(*args)
    torch.testing.assert_close(p, torch.sigmoid(z_ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_h", [32, 64])
def test_several_blocks_with_a_partial_last_one(block_h):
    """H = 200 in blocks of 32 or 64: seven or four trips, the last one
    masked; hidden rows with a stride wider than H (a view)."""
    H = 200
    head = make_head(("h_post", "h_pre"), H)
    hidden, rows, logits, drafts = make_step(H, dtype=torch.bfloat16, seed=1)
    wide = torch.zeros(hidden.shape[0], H + 24, dtype=hidden.dtype, device=DEV)
    wide[:, :H] = hidden
    wide[:, H:] = 1e3  # past the row's end: must never be read
    view = wide[:, :H]
    score = torch_score(head)
    z_ref = score.logit(hidden, rows, logits, drafts)
    w_post, w_pre = score._w_post, score._w_pre
    z = judge_score_triton(view, rows.long(), w_post, w_pre, score._bias, block_h=block_h)
    assert_same_z(z, z_ref, head, hidden, rows, logits, drafts)


def test_the_kernel_reads_the_rows_its_spec_names():
    """By hand: hidden row r holds r everywhere, weights are 1, so z is
    H * (rows + 1) for h_post, H * rows for h_pre, their sum for both, plus
    the bias and the scalar part; rows at the last valid index included."""
    H, R = 72, 6
    hidden = torch.arange(R, dtype=torch.float32, device=DEV)[:, None].expand(R, H).contiguous()
    ones = torch.ones(H, device=DEV)
    s = torch.tensor([0.5, -1.0, 2.0], device=DEV)
    rows_post = torch.tensor([0, 3, R - 2], device=DEV)  # R - 2: reads row R - 1
    rows_pre = torch.tensor([0, 3, R - 1], device=DEV)
    z = judge_score_triton(hidden, rows_post, ones, None, 0.25, block_h=32)
    assert z.tolist() == [H * 1 + 0.25, H * 4 + 0.25, H * (R - 1) + 0.25]
    z = judge_score_triton(hidden, rows_pre, None, ones, 0.0, s, block_h=32)
    assert z.tolist() == [0.5, H * 3 - 1.0, H * (R - 1) + 2.0]
    z = judge_score_triton(hidden, rows_post, ones, ones * 2, 0.0, block_h=32)
    assert z.tolist() == [H * (1 + 0), H * (4 + 6), H * ((R - 1) + 2 * (R - 2))]
    with pytest.raises(ValueError, match="needs w_post, w_pre or both"):
        judge_score_triton(hidden, rows_pre, None, None, 0.0)


@pytest.mark.parametrize("spec", ["h_post", "h_pre"])
def test_rows_at_the_last_valid_index(spec):
    """The highest row each spec may read: rows + 1 = R - 1 for h_post (the
    last request's bonus row), rows = R - 1 for h_pre."""
    H = 96
    head = make_head(SPECS[spec], H, seed=3)
    hidden, rows, logits, drafts = make_step(H, seed=3)
    R = hidden.shape[0]
    last = R - 2 if spec == "h_post" else R - 1
    rows = rows.clone()
    rows[-1] = last
    rows[0] = last
    z_ref = torch_score(head).logit(hidden, rows, logits, drafts)
    z = triton_score(head).logit(hidden, rows, logits, drafts)
    assert_same_z(z, z_ref, head, hidden, rows, logits, drafts)
    assert z[0] == z[-1]


def test_a_step_without_drafts_scores_nothing():
    H = 96
    for spec in SPECS.values():
        head = make_head(spec, H)
        hidden, rows, logits, drafts = make_step(H)
        empty = (hidden, rows[:0], logits[:0], drafts[:0])
        z = triton_score(head).logit(*empty)
        assert z.shape == (0,) and z.dtype == torch.float32
        assert torch_score(head).logit(*empty).shape == (0,)
    w = torch.ones(H, device=DEV)
    assert judge_score_triton(hidden, rows[:0], w, w, 0.0).shape == (0,)


def test_non_finite_hidden_values_score_as_the_torch_path():
    """features.assemble maps NaN to 0 and +-inf to +-1e4; so does the kernel."""
    H = 96
    head = make_head(("h_post", "h_pre", "margin"), H, seed=5)
    hidden, rows, logits, drafts = make_step(H, seed=5)
    hidden[1, 3] = float("nan")
    hidden[2, 7] = float("inf")
    hidden[4, 0] = float("-inf")
    z_ref = torch_score(head).logit(hidden, rows, logits, drafts)
    z = triton_score(head).logit(hidden, rows, logits, drafts)
    assert torch.isfinite(z_ref).all()
    assert_same_z(z, z_ref, head, hidden, rows, logits, drafts)


def test_the_score_chooses_its_path_as_the_verifier_does(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert score_path("cpu") == "torch"
    assert score_path(torch.device("cuda")) == "triton"
    monkeypatch.setenv(ENV, "torch")
    assert score_path("cuda:0") == "torch"
    # A spec without hidden states has nothing to stream: torch everywhere.
    assert JudgeScore(make_head(("margin", "entropy"), 96), "cpu").path == "torch"
    assert JudgeScore(make_head(("h_post",), 96), "cpu").path == "torch"


def test_the_first_step_checks_the_kernel_then_uses_it(monkeypatch):
    H = 96
    head = make_head(SPECS["h_post+h_pre+scalars"], H)
    args = make_step(H, dtype=torch.bfloat16)
    z_ref = torch_score(head).logit(*args)
    score = JudgeScore(head, DEV)
    score.path = "triton"
    calls = []
    real = judge_score.judge_score_triton

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(judge_score, "judge_score_triton", spy)
    score.logit(args[0], args[1][:0], args[2][:0], args[3][:0])  # no drafts: no check
    assert not score._checked and not calls
    assert_same_z(score.logit(*args), z_ref, head, *args)
    assert score._checked and score.path == "triton" and score.failure is None and calls
    assert_same_z(score.logit(*args), z_ref, head, *args)
    assert len(calls) == 2


def test_a_kernel_that_disagrees_or_fails_leaves_the_torch_path(monkeypatch, caplog):
    H = 96
    head = make_head(("h_post",), H)
    args = make_step(H)
    z_ref = torch_score(head).logit(*args)
    for broken, why in ((lambda *a, **k: torch.zeros(args[1].shape[0], device=DEV),
                         "disagrees with the torch path"),
                        (lambda *a, **k: 1 / 0, "ZeroDivisionError")):
        monkeypatch.setattr(judge_score, "judge_score_triton", broken)
        score = JudgeScore(head, DEV)
        score.path = "triton"
        before = metrics.snapshot()["verifier_fallbacks"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vllm.fly_vllm"):
            torch.testing.assert_close(score.logit(*args), z_ref)
            torch.testing.assert_close(score.logit(*args), z_ref)
        assert score.path == "torch" and why in score.failure
        warnings = [r for r in caplog.records if "judge's Triton score failed" in r.message]
        assert len(warnings) == 1 and why in warnings[0].getMessage()
        # Counted once, as the verifier's fallback is.
        assert metrics.snapshot()["verifier_fallbacks"] == before + 1
