"""FSD's rule against a plain-Python reference, for each divergence and
variant, with identical distributions and disjoint supports."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fly_vllm.fsd import DIVERGENCES, divergence, fsd_verify
from fly_vllm.verifier import PLACEHOLDER_TOKEN_ID


def ref_div(p, q, kind):
    def kl(a, b):
        total = 0.0
        for x, y in zip(a, b):
            if x > 0:
                if y == 0:
                    return math.inf
                total += x * math.log(x / y)
        return total

    if kind == "js":
        m = [(x + y) / 2 for x, y in zip(p, q)]
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if kind == "kl_draft_target":
        return kl(q, p)
    if kind == "kl_target_draft":
        return kl(p, q)
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def ref_request(drafts, P, Q, bonus, T, kind, variant, greedy=True, u=None, rec=None,
                res=None, exact=False, veto=None, loose_from=0):
    """One request, written from the rule: accept iff D <= T (a draft that
    the native test would reject also needs p(d) > 0 and no veto); the native
    test also accepts under "fallback" and for exact requests, and decides
    alone at positions before ``loose_from`` (the strict prefix)."""
    whole_request_exact = exact
    for i, d in enumerate(drafts):
        exact = whole_request_exact or i < loose_from
        p, q = P[i], Q[i]
        argmax = max(range(len(p)), key=lambda j: (p[j], -j))
        if greedy:
            native = d == argmax
        else:
            native = q[d] > 0 and p[d] / q[d] >= u[i]
        ok = not exact and ref_div(p, q, kind) <= T
        if ok and not native:
            ok = p[d] > 0 and not (veto and veto[i])
        if variant == "fallback" or exact:
            ok = ok or native
        if not ok:
            if greedy:
                return drafts[:i] + [argmax]
            return drafts[:i] + [rec[i] if variant == "fallback" or exact else res[i]]
    return drafts + [bonus]


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_distributions_always_accept(kind):
    p = torch.softmax(torch.randn(5, 7), -1)
    assert torch.allclose(divergence(p, p, kind), torch.zeros(5), atol=1e-6)
    r = fsd_verify(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([5]), p, p.clone(),
                   torch.tensor([[9]]), 5, threshold=torch.tensor([0.0]), kind=kind)
    assert r.output_token_ids[0].tolist() == [1, 2, 3, 4, 5, 9]
    assert r.num_accepted.tolist() == [5]


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergence_over_row_chunks(kind, dtype):
    # 21 rows: two full CPU chunks of 8 and a partial one; zeros in p.
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(21, 50, generator=g) * 3, -1)
    p[torch.rand(21, 50, generator=g) < 0.3] = 0
    p = (p / p.sum(-1, keepdim=True)).to(dtype)
    q = torch.softmax(torch.randn(21, 50, generator=g) * 3, -1).to(dtype)
    got = divergence(p, q, kind)
    assert got.dtype == torch.float32 and got.shape == (21,)
    want = [ref_div(a, b, kind) for a, b in zip(p.float().tolist(), q.float().tolist())]
    for x, y in zip(got.tolist(), want):
        assert x == y if math.isinf(y) else x == pytest.approx(y, abs=1e-5)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(p, q, "hellinger")


def test_disjoint_supports():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert divergence(p, q, "js").item() == pytest.approx(math.log(2))
    assert divergence(p, q, "tv").item() == pytest.approx(1.0)
    assert divergence(p, q, "kl_target_draft").item() == math.inf
    assert divergence(p, q, "kl_draft_target").item() == math.inf
    r = fsd_verify(torch.tensor([2]), torch.tensor([1]), p, q, torch.tensor([[3]]),
                   1, threshold=torch.tensor([0.69]), kind="js")
    assert r.output_token_ids[0].tolist() == [0, PLACEHOLDER_TOKEN_ID]  # argmax 0
    assert r.gated.tolist() == [True] and r.guard_vetoed.tolist() == [False]
    # ln 2 <= 0.7 passes the test, but p(2) = 0 (a masked token in vLLM): the
    # guard still refuses it, where the authors' code would accept it.
    r = fsd_verify(torch.tensor([2]), torch.tensor([1]), p, q, torch.tensor([[3]]),
                   1, threshold=torch.tensor([0.7]), kind="js")
    assert r.output_token_ids[0].tolist() == [0, PLACEHOLDER_TOKEN_ID]
    assert r.guard_vetoed.tolist() == [True]
    # Where the draft token has target mass, the same test accepts it.
    r = fsd_verify(torch.tensor([1]), torch.tensor([1]), p, q, torch.tensor([[3]]),
                   1, threshold=torch.tensor([0.7]), kind="js")
    assert r.output_token_ids[0].tolist() == [1, 3]


def test_fallback_with_minus_inf_threshold_is_exact_speculation():
    p = torch.softmax(torch.randn(4, 6), -1)
    q = torch.softmax(torch.randn(4, 6), -1)
    drafts = p.argmax(-1).clone()
    drafts[2] = (drafts[2] + 1) % 6
    out = fsd_verify(drafts, torch.tensor([4]), p, q, torch.tensor([[7]]), 4,
                     threshold=torch.tensor([-math.inf]), variant="fallback").output_token_ids
    assert out[0].tolist() == drafts[:2].tolist() + [p[2].argmax().item(), -1, -1]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_matches_reference(data):
    V = data.draw(st.integers(2, 5))
    n = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    T_ = sum(n)
    kind = data.draw(st.sampled_from(DIVERGENCES))
    variant = data.draw(st.sampled_from(["resample", "fallback"]))
    thr = data.draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 2.0]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    P = torch.softmax(torch.randn(T_, V, generator=g) * 2, -1)
    Q = torch.softmax(torch.randn(T_, V, generator=g) * 2, -1)
    P[torch.rand(T_, V, generator=g) < 0.2] = 0  # masked entries (top-k/top-p)
    P[:, 0] += 1e-3
    P = P / P.sum(-1, keepdim=True)
    drafts = torch.randint(0, V, (T_,), generator=g)
    greedy = data.draw(st.lists(st.booleans(), min_size=len(n), max_size=len(n)))
    u = torch.rand(T_, generator=g, dtype=torch.float64)
    rec = torch.randint(0, V, (T_,), generator=g)
    res = torch.randint(0, V, (T_,), generator=g)
    exact = data.draw(st.lists(st.booleans(), min_size=len(n), max_size=len(n)))
    veto = torch.rand(T_, generator=g) < 0.2
    loose_from = data.draw(st.lists(st.integers(0, 4), min_size=len(n), max_size=len(n)))
    out = fsd_verify(drafts, torch.tensor(n).cumsum(0), P, Q,
                     torch.arange(100, 100 + len(n)).reshape(-1, 1), max(n + [1]),
                     threshold=torch.full((len(n),), thr), kind=kind,
                     variant=variant, is_greedy=torch.tensor(greedy),
                     exact=torch.tensor(exact), uniform_probs=u, recovered_token_ids=rec,
                     resampled_token_ids=res, veto=veto,
                     loose_from=torch.tensor(loose_from)).output_token_ids
    start = 0
    for b, k in enumerate(n):
        sl = slice(start, start + k)
        want = ref_request(drafts[sl].tolist(), P[sl].tolist(), Q[sl].tolist(), 100 + b,
                           thr, kind, variant, greedy[b], u[sl].tolist(), rec[sl].tolist(),
                           res[sl].tolist(), exact[b], veto[sl].tolist(), loose_from[b])
        got = [t for t in out[b].tolist() if t != PLACEHOLDER_TOKEN_ID]
        assert got == want
        start += k
