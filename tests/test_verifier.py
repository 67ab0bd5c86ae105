"""The tensor verifier against the plain-Python reference: hand-written cases
and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fly_vllm.verifier import PLACEHOLDER_TOKEN_ID, fly_verify, topk_entropy
from tests.reference import topk_entropy as ref_entropy
from tests.reference import verify_request

V = 10
INF = float("inf")


def confident(tok: int, vocab: int = V) -> list[float]:
    """A row whose argmax is `tok` with top-3 entropy far below 0.3."""
    row = [0.0] * vocab
    row[tok] = 20.0
    return row


def uncertain(tok: int, other: int, vocab: int = V) -> list[float]:
    """Argmax `tok`, `other` close behind: top-3 entropy about 0.69 nats."""
    row = [-10.0] * vocab
    row[tok] = 1.0
    row[other] = 0.99
    return row


def run(reqs, *, threshold=0.3, window=2, span=None, top_k=3, max_spec_len=None,
        bonus=None, margin=None, loose_from=None):
    """reqs: list of (drafts, logits rows). Returns emitted rows and output."""
    span = window if span is None else span
    drafts = [d for r in reqs for d in r[0]]
    rows = [row for r in reqs for row in r[1]]
    n = [len(r[0]) for r in reqs]
    S = max_spec_len or max(max(n), 1)
    cu = torch.tensor(n).cumsum(0)
    B = len(reqs)
    bonus = bonus or [100 + b for b in range(B)]
    out = fly_verify(
        torch.tensor(drafts, dtype=torch.int32),
        cu,
        torch.tensor(rows, dtype=torch.float32).reshape(len(drafts), -1)
        if drafts else torch.zeros(0, V),
        torch.tensor(bonus).reshape(B, 1),
        S,
        entropy_threshold=torch.full((B,), float(threshold)),
        window=torch.full((B,), window),
        window_span=torch.full((B,), span),
        entropy_top_k=top_k,
        margin=None if margin is None else torch.full((B,), float(margin)),
        loose_from=None if loose_from is None else torch.full((B,), loose_from),
    )
    emitted = [[t for t in row if t != PLACEHOLDER_TOKEN_ID]
               for row in out.output_token_ids.tolist()]
    return emitted, out


def test_all_match_gets_bonus():
    drafts = [1, 2, 3]
    emitted, out = run([(drafts, [confident(t) for t in drafts])])
    assert emitted == [[1, 2, 3, 100]]
    assert out.num_accepted.tolist() == [3]
    assert not out.loose_accepted.any()


def test_confident_mismatch_is_a_real_error():
    # Position 0 mismatches where the target is confident: rejected even
    # though the window after it matches.
    logits = [confident(5), confident(2), confident(3), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)])
    assert emitted == [[5]]
    assert out.gated.tolist() == [True, False, False, False]


def test_uncertain_mismatch_rescued_by_window():
    logits = [uncertain(5, 1), confident(2), confident(3), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)], window=2)
    assert emitted == [[1, 2, 3, 4, 100]]
    assert out.loose_accepted.tolist() == [True, False, False, False]


def test_window_must_fit_inside_the_step():
    # W=2: a candidate at i needs i + 2 < n. At i = 2 of n = 4 it cannot.
    logits = [confident(1), confident(2), uncertain(6, 3), confident(4)]
    emitted, _ = run([([1, 2, 3, 4], logits)], window=2)
    assert emitted == [[1, 2, 6]]
    # At i = 1 it can (1 + 2 < 4) and the window (2, 3) matches.
    logits = [confident(1), uncertain(6, 2), confident(3), confident(4)]
    emitted, _ = run([([1, 2, 3, 4], logits)], window=2)
    assert emitted == [[1, 2, 3, 4, 100]]


def test_window_broken_by_a_later_mismatch():
    logits = [uncertain(5, 1), confident(2), confident(7), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)], window=2)
    assert emitted == [[5]]
    assert out.uncertain[0] and not out.rescued[0]


def test_several_rescues_in_one_step():
    drafts = [1, 2, 3, 4, 5, 6, 7]
    logits = [uncertain(9, 1), confident(2), uncertain(9, 3), confident(4),
              confident(5), confident(6), confident(7)]
    # Windows are checked against native matches only: the candidate at 2 is
    # not in the window of 0 (W = 1) and is rescued by its own window.
    emitted, out = run([(drafts, logits)], window=1, max_spec_len=7)
    assert emitted == [[1, 2, 3, 4, 5, 6, 7, 100]]
    assert out.loose_accepted.sum().item() == 2


def test_neg_inf_guard_never_accepts_a_masked_draft():
    row = uncertain(5, 0)
    row[1] = -INF  # the draft token is masked (grammar, bad words, ...)
    logits = [row, confident(2), confident(3), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)], threshold=0.0)
    assert emitted == [[5]]
    assert out.guard_vetoed.tolist() == [True, False, False, False]


def test_quality_guard_veto_blocks_only_where_set():
    logits = [uncertain(5, 1), confident(2), uncertain(6, 3), confident(4), confident(8)]
    drafts = [1, 2, 3, 4, 8]
    args = dict(window=1, max_spec_len=5)
    free, _ = run([(drafts, logits)], **args)
    assert free == [[1, 2, 3, 4, 8, 100]]
    B = 1
    out = fly_verify(
        torch.tensor(drafts, dtype=torch.int32), torch.tensor([5]),
        torch.tensor(logits), torch.tensor([[100]]), 5,
        entropy_threshold=torch.full((B,), 0.3), window=torch.full((B,), 1),
        window_span=torch.full((B,), 1),
        veto=torch.tensor([False, False, True, False, False]))
    assert out.output_token_ids[0].tolist() == [1, 2, 6, -1, -1, -1]
    assert out.rule_vetoed.tolist() == [False, False, True, False, False]
    assert out.loose_accepted.tolist() == [True, False, False, False, False]


def test_placeholder_draft_is_never_accepted():
    logits = [uncertain(5, 1), confident(2), confident(3)]
    emitted, _ = run([([-1, 2, 3], logits)], threshold=0.0, window=1)
    assert emitted == [[5]]


def test_variable_drafts_per_request_including_zero():
    reqs = [
        ([1, 2, 3, 4], [uncertain(5, 1), confident(2), confident(3), confident(4)]),
        ([], []),
        ([1, 2], [confident(1), confident(6)]),
        ([3], [uncertain(5, 3)]),
    ]
    emitted, out = run(reqs, window=2, max_spec_len=4)
    assert emitted == [[1, 2, 3, 4, 100], [101], [1, 6], [5]]
    assert out.output_token_ids.shape == (4, 5)
    assert out.output_token_ids[1].tolist() == [101, -1, -1, -1, -1]


def test_strict_threshold_is_exact_match():
    logits = [uncertain(5, 1), confident(2), confident(3), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)], threshold=INF)
    assert emitted == [[5]]
    assert not out.gated.any()  # strict: nothing was gated, FLy was off


def test_paper_window_convention_checks_one_fewer():
    # W=2. vLLM's convention checks positions 1 and 2; the paper's only 1.
    logits = [uncertain(5, 1), confident(2), confident(7), confident(4)]
    emitted, _ = run([([1, 2, 3, 4], logits)], window=2, span=2)
    assert emitted == [[5]]
    emitted, _ = run([([1, 2, 3, 4], logits)], window=2, span=1)
    assert emitted == [[1, 2, 7]]


def test_entropy_matches_reference_and_handles_masked_rows():
    rows = torch.tensor([[1.0, 0.99, -10, -10], [0.0, 0.0, 0.0, 0.0],
                         [-INF, -INF, 3.0, -INF], [-INF] * 4])
    h = topk_entropy(rows, 3)
    for i in range(3):
        assert h[i].item() == pytest.approx(ref_entropy(rows[i].tolist(), 3), abs=1e-6)
    assert h[1].item() == pytest.approx(3 * 0.25 * math.log(4), abs=1e-6)
    assert h[3].item() == 0.0  # an all-masked row can never open the gate


def spread(tok: int, draft: int, gap: float, vocab: int = V) -> list[float]:
    """Argmax `tok`, `draft` `gap` nats behind, and a third token between
    them: the top-3 entropy is high (> 0.3) for any gap up to a few nats."""
    row = [-10.0] * vocab
    row[tok], row[draft] = 1.0, 1.0 - gap
    row[(tok + draft + 1) % vocab if (tok + draft + 1) % vocab not in (tok, draft)
        else 9] = 1.0 - gap / 2
    return row


def test_margin_gate_rejects_a_far_draft_the_entropy_gate_keeps():
    logits = [spread(5, 1, 2.0), confident(2), confident(3), confident(4)]
    drafts = [1, 2, 3, 4]
    assert topk_entropy(torch.tensor([logits[0]]), 3).item() > 0.3
    emitted, _ = run([(drafts, logits)], window=2)  # entropy alone: kept
    assert emitted == [[1, 2, 3, 4, 100]]
    emitted, out = run([(drafts, logits)], window=2, threshold=0.0, margin=0.3)
    assert emitted == [[5]]
    assert out.gated.tolist() == [True, False, False, False]
    assert out.margin[0].item() == pytest.approx(2.0)
    emitted, _ = run([(drafts, logits)], window=2, threshold=0.0, margin=2.5)
    assert emitted == [[1, 2, 3, 4, 100]]


def test_margin_gate_with_both_tests():
    # Margin 0.2 (passes 0.3) but the entropy threshold 1.05 fails: both
    # must pass.
    row = [-10.0] * V
    row[5], row[1] = 1.0, 0.8  # two tokens: top-3 entropy about 0.69
    logits = [row, confident(2), confident(3), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)], window=2, threshold=1.05, margin=0.3)
    assert topk_entropy(torch.tensor([logits[0]]), 3).item() < 1.05
    assert emitted == [[5]] and out.gated[0]
    emitted, _ = run([([1, 2, 3, 4], logits)], window=2, threshold=0.3, margin=0.3)
    assert emitted == [[1, 2, 3, 4, 100]]


def test_margin_tie_passes_a_zero_margin():
    # The draft ties the argmax (which is the first index of the max): a
    # mismatch with margin 0, which a margin of 0 accepts and nothing less.
    row = [-10.0] * V
    row[1] = row[5] = 1.0
    logits = [row, confident(2), confident(3), confident(4)]
    emitted, out = run([([5, 2, 3, 4], logits)], window=2, threshold=0.0, margin=0.0)
    assert out.native[0].item() is False and out.margin[0].item() == 0.0
    assert emitted == [[5, 2, 3, 4, 100]]


def test_margin_of_a_masked_draft_is_infinite():
    row = spread(5, 0, 0.1)
    row[1] = -INF
    logits = [row, confident(2), confident(3), confident(4)]
    emitted, out = run([([1, 2, 3, 4], logits)], window=2, threshold=0.0, margin=1e30)
    assert emitted == [[5]]
    assert out.margin[0].item() == INF and not out.loose_accepted.any()


def test_margin_gate_that_never_opens_is_exact():
    drafts = [1, 2, 3, 4]
    logits = [spread(5, 1, 0.05), confident(2), spread(7, 3, 0.01), confident(4)]
    emitted, out = run([(drafts, logits)], window=1, threshold=0.0, margin=0.0)
    exact, _ = run([(drafts, logits)], window=1, threshold=INF)
    assert emitted == exact == [[5]]
    assert not out.uncertain.any() and out.gated[0]


def test_strict_prefix_verifies_the_first_positions_exactly():
    drafts = [1, 2, 3, 4, 5, 6]
    logits = [uncertain(9, 1), confident(2), uncertain(9, 3), confident(4),
              confident(5), confident(6)]
    emitted, _ = run([(drafts, logits)], window=1, max_spec_len=6)
    assert emitted == [[1, 2, 3, 4, 5, 6, 100]]
    emitted, out = run([(drafts, logits)], window=1, max_spec_len=6, loose_from=1)
    assert emitted == [[9]]
    assert out.prefix_exact.tolist() == [True] + [False] * 5
    assert not out.gated.any()  # a prefix mismatch is not a gate decision
    logits[0] = confident(1)
    emitted, out = run([(drafts, logits)], window=1, max_spec_len=6, loose_from=2)
    assert emitted == [[1, 2, 3, 4, 5, 6, 100]]  # position 2 is past the prefix
    emitted, _ = run([(drafts, logits)], window=1, max_spec_len=6, loose_from=3)
    assert emitted == [[1, 2, 9]]


def test_prefix_start_counts_generated_tokens():
    from fly_vllm.verifier import prefix_start

    got = prefix_start(torch.tensor([0, 8, 8, 8]), torch.tensor([5, 1, 8, 20]))
    assert got.tolist() == [0, 7, 0, 0]


# ---------------------------------------------------------------- properties

@st.composite
def batches(draw, random_rows: bool = False):
    vocab = draw(st.integers(2, 6))
    B = draw(st.integers(1, 4))
    reqs = []
    for _ in range(B):
        n = draw(st.integers(0, 6))
        drafts = draw(st.lists(st.integers(-1, vocab - 1), min_size=n, max_size=n))
        logits = [
            draw(st.lists(st.one_of(st.sampled_from([-INF, 0.0, 1.0]),
                                    st.floats(-3, 3, width=32)),
                          min_size=vocab, max_size=vocab))
            for _ in range(n)
        ]
        for row in logits:  # every row keeps one finite logit, as vLLM's do
            if all(x == -INF for x in row):
                row[0] = 0.0
        # Most drafts match (as real drafts do), so windows hold and
        # rescues happen: the gate, the window and the prefix get exercised.
        for i, hit in enumerate(draw(st.lists(st.booleans(), min_size=n, max_size=n))):
            if hit:
                drafts[i] = max(range(vocab), key=lambda j: (logits[i][j], -j))
        reqs.append((drafts, logits))
    threshold = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, INF]))
    window = draw(st.integers(1, 4))
    span = draw(st.sampled_from([window, window - 1]))
    top_k = draw(st.integers(1, 4))
    return vocab, reqs, threshold, window, span, top_k


@settings(max_examples=300, deadline=None)
@given(batches(), st.data())
def test_greedy_matches_reference(case, data):
    vocab, reqs, threshold, window, span, top_k = case
    B = len(reqs)
    # The margin gate (None: entropy alone) and a strict prefix per request.
    margin = data.draw(st.sampled_from([None, 0.0, 0.5, 1.0, 3.0, INF]))
    loose_from = data.draw(st.one_of(st.none(), st.lists(
        st.integers(0, 4), min_size=B, max_size=B)))
    T = sum(len(r[0]) for r in reqs)
    veto = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=T, max_size=T)))
    S = max([len(r[0]) for r in reqs] + [1])
    drafts = [d for r in reqs for d in r[0]]
    rows = [row for r in reqs for row in r[1]]
    B = len(reqs)
    out = fly_verify(
        torch.tensor(drafts, dtype=torch.int32),
        torch.tensor([len(r[0]) for r in reqs]).cumsum(0),
        torch.tensor(rows, dtype=torch.float32).reshape(len(drafts), vocab),
        torch.arange(100, 100 + B).reshape(B, 1),
        S,
        entropy_threshold=torch.full((B,), float(threshold)),
        window=torch.full((B,), window),
        window_span=torch.full((B,), span),
        entropy_top_k=top_k,
        veto=None if veto is None else torch.tensor(veto, dtype=torch.bool),
        margin=None if margin is None else torch.full((B,), margin),
        loose_from=None if loose_from is None else torch.tensor(loose_from),
    )
    rows_out = out.output_token_ids.tolist()
    start = 0
    for b, (d, lg) in enumerate(reqs):
        n = len(d)
        want, loose = verify_request(
            d, lg, 100 + b, threshold=threshold, window=window, span=span,
            top_k=top_k, veto=None if veto is None else veto[start:start + n],
            margin=INF if margin is None else margin,
            loose_from=0 if loose_from is None else loose_from[b],
        )
        got = [t for t in rows_out[b] if t != PLACEHOLDER_TOKEN_ID]
        assert got == want
        assert rows_out[b][len(want):] == [PLACEHOLDER_TOKEN_ID] * (S + 1 - len(want))
        got_loose = out.loose_accepted[start:start + n].tolist()[: len(loose)]
        assert got_loose == loose
        start += n


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_sampling_matches_reference(case, data):
    vocab, reqs, threshold, window, span, top_k = case
    S = max([len(r[0]) for r in reqs] + [1])
    drafts = [d for r in reqs for d in r[0]]
    rows = [row for r in reqs for row in r[1]]
    T, B = len(drafts), len(reqs)
    greedy = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    uniforms = data.draw(st.lists(st.floats(0.0, 0.999), min_size=T, max_size=T))
    recovered = data.draw(st.lists(st.integers(0, vocab - 1), min_size=T, max_size=T))
    use_q = data.draw(st.booleans())
    margin = data.draw(st.sampled_from([None, 0.0, 1.0, INF]))
    loose_from = data.draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))
    q = torch.rand(T, vocab, generator=torch.Generator().manual_seed(T))
    q[:, 0] = 0.0 if vocab > 2 else q[:, 0]  # some draft tokens with q = 0
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-9)
    logits = torch.tensor(rows, dtype=torch.float32).reshape(T, vocab)
    # The verifier's p is float32, the reference's float64: a u within
    # rounding of p / q is decided differently by the two, by arithmetic
    # alone (found: p = 1/2 in float32, 1/2 - 6e-17 in float64, u = 1/2).
    p32 = logits.softmax(-1)
    for t, d in enumerate(drafts):
        if 0 <= d < vocab:
            qd = q[t, d].item() if use_q else 1.0
            if qd > 0:
                assume(abs(p32[t, d].item() / qd - uniforms[t]) > 1e-6)
    out = fly_verify(
        torch.tensor(drafts, dtype=torch.int32),
        torch.tensor([len(r[0]) for r in reqs]).cumsum(0),
        logits,
        torch.arange(100, 100 + B).reshape(B, 1),
        S,
        entropy_threshold=torch.full((B,), float(threshold)),
        window=torch.full((B,), window),
        window_span=torch.full((B,), span),
        entropy_top_k=top_k,
        is_greedy=torch.tensor(greedy),
        target_probs=logits.softmax(-1),
        draft_probs=q if use_q else None,
        uniform_probs=torch.tensor(uniforms, dtype=torch.float64),
        recovered_token_ids=torch.tensor(recovered),
        margin=None if margin is None else torch.full((B,), margin),
        loose_from=torch.tensor(loose_from),
    )
    start = 0
    for b, (d, lg) in enumerate(reqs):
        n = len(d)
        want, _ = verify_request(
            d, lg, 100 + b, threshold=threshold, window=window, span=span,
            top_k=top_k, greedy=greedy[b], uniforms=uniforms[start:start + n],
            recovered=recovered[start:start + n],
            draft_probs=q[start:start + n].tolist() if use_q else None,
            margin=INF if margin is None else margin, loose_from=loose_from[b],
        )
        got = [t for t in out.output_token_ids[b].tolist() if t != PLACEHOLDER_TOKEN_ID]
        assert got == want
        start += n


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_exact_verify_is_fly_verify_with_every_request_strict(sampled, ties):
    """The core's fast path for all-strict batches: the same output rows,
    counts and per-draft decisions as the rule with every threshold +inf."""
    from fly_vllm.verifier import exact_verify
    from fly_vllm.verify_cases import CaseShape, make_case

    g = torch.Generator().manual_seed(7)
    for i in range(30):
        shape = CaseShape(4, 1 + i % 6, 50, sampled=sampled, ties=ties, veto=i % 2 == 0,
                          margin=i % 3 == 0)
        args = make_case("fly", g, shape, "cpu")
        B = args["cu_num_draft_tokens"].shape[0]
        args["entropy_threshold"] = torch.full((B,), INF)
        want = fly_verify(**args)
        got = exact_verify(**{k: args[k] for k in (
            "draft_token_ids", "cu_num_draft_tokens", "target_logits", "bonus_token_ids",
            "max_spec_len", "is_greedy", "target_probs", "draft_probs", "uniform_probs",
            "recovered_token_ids") if k in args})
        for f in ("output_token_ids", "num_accepted", "native", "in_prefix", "positions",
                  "loose_accepted", "uncertain", "rescued", "gated", "guard_vetoed",
                  "rule_vetoed", "prefix_exact"):
            assert torch.equal(getattr(got, f), getattr(want, f)), (f, shape)
