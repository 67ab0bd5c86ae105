"""FSD's resample correction draws random numbers only for rows that use it.

A step that FSD verifies exactly (``strict``, no draft distribution, or every
draft inside the request's strict prefix) must leave a seeded request's
generator, and the global RNG, where vLLM's own rejection sampler leaves
them: otherwise a seeded request is token-identical to vLLM on its first
step only. Checked over several steps against the installed vLLM's
``rejection_sample`` (its CPU kernels), as in test_vllm_parity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.test_vllm_parity import make_sampler, rs  # noqa: F401 (rs is a fixture)

V = 50
STEPS = 4


def fsd_sampler(strict: bool, runner=None, threshold: float = 0.6):
    """make_sampler's sampler with rule fsd; ``runner`` supplies per-request
    settings (sampling params' extra_args) and output lengths. All-strict
    steps go through FSD's exact rows here, not vLLM's own verification
    (which the engine takes for them), so these tests check the rule."""
    from fly_vllm.config import FlyConfig

    return make_sampler(strict=strict, runner=runner, shortcut=False, fly=FlyConfig(
        rule="fsd", strict=strict, fsd_threshold=threshold))


def verify(sampler, rs, args):
    return sampler.fly_rejection_sample(rs, rs.rejection_sample, **args)


def fake_runner(extra_args: list[dict], generated: list[int]):
    """Just what FlyRejectionSampler reads of vLLM's model runner."""
    ids = [f"r{b}" for b in range(len(extra_args))]
    return SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=ids),
        requests={rid: SimpleNamespace(
            sampling_params=SimpleNamespace(extra_args=ea, stop=None,
                                            all_stop_token_ids=(),
                                            structured_outputs=None),
            output_token_ids=[0] * g)
            for rid, ea, g in zip(ids, extra_args, generated)})


def step(i: int, n: list[int], generators: dict, with_q: bool, greedy=None):
    """Step i's inputs: random processed logits, drafts that often match the
    argmax, and the (reused) generators. Without a draft distribution, vLLM's
    own p/q test treats the greedy drafter as one-hot."""
    g = torch.Generator().manual_seed(1000 + i)
    T = sum(n)
    logits = torch.randn(T, V, generator=g) * 2
    drafts = torch.where(torch.rand(T, generator=g) < 0.5, logits.argmax(-1),
                         torch.randint(0, V, (T,), generator=g)).int()
    q = torch.softmax(logits + torch.randn(T, V, generator=g), -1) if with_q else None
    greedy = greedy or [False] * len(n)
    return dict(
        draft_token_ids=drafts, num_draft_tokens=n, max_spec_len=max(n),
        cu_num_draft_tokens=torch.tensor(n).cumsum(0).int(), draft_probs=q,
        target_logits=logits,
        bonus_token_ids=torch.randint(0, V, (len(n), 1), generator=g),
        sampling_metadata=SimpleNamespace(
            all_greedy=all(greedy), all_random=not any(greedy),
            temperature=torch.tensor([0.0 if x else 1.0 for x in greedy]),
            generators=generators),
    )


def run_steps(verify, n, seeds, with_q, greedy=None, global_seed=0):
    """Rows of STEPS calls of ``verify``, the generators made once (batch row
    -> seed) and reused as vLLM's are across steps."""
    torch.manual_seed(global_seed)
    gens = {b: torch.Generator().manual_seed(s) for b, s in seeds.items()}
    rows = [verify(step(i, n, gens, with_q, greedy)).tolist() for i in range(STEPS)]
    return rows, {b: g.get_state() for b, g in gens.items()}, torch.get_rng_state()


def vllm_steps(rs, n, seeds, with_q, greedy=None):
    """vLLM's rows on the same steps. It sees no draft distribution: the
    drafter is greedy (FSD's q only feeds the divergence)."""
    return run_steps(lambda a: rs.rejection_sample(**{**a, "draft_probs": None}),
                     n, seeds, with_q, greedy)


def assert_one_seeded_request_is_vllms(rs, sampler, with_q: bool) -> None:
    """One request seeded 42, K 3, over 4 steps: the sampler's tokens, its
    generator's state and the global RNG's state all equal vLLM's."""
    got, got_gens, got_rng = run_steps(
        lambda a: verify(sampler, rs, a), [3], {0: 42}, with_q)
    want, want_gens, want_rng = vllm_steps(rs, [3], {0: 42}, with_q)
    assert got == want
    assert torch.equal(got_gens[0], want_gens[0])
    assert torch.equal(got_rng, want_rng)


@pytest.mark.parametrize("strict,with_q", [(True, False), (True, True), (False, False)])
def test_exact_fsd_matches_vllm_over_steps(rs, strict, with_q):
    """One seeded request, K 3, the generator reused over 4 steps: strict, or
    exact for want of a draft distribution, FSD is vLLM token for token."""
    sampler = fsd_sampler(strict=strict)
    assert_one_seeded_request_is_vllms(rs, sampler, with_q)


def test_exact_unseeded_batch_leaves_global_rng_as_vllm(rs):
    """Unseeded requests draw from the global RNG: an exact FSD step draws
    nothing more from it, so the later steps stay vLLM's too."""
    sampler = fsd_sampler(strict=True)
    n, greedy = [3, 2, 3], [False, True, False]
    got, _, got_rng = run_steps(lambda a: verify(sampler, rs, a),
                                n, {}, True, greedy)
    want, _, want_rng = vllm_steps(rs, n, {}, True, greedy)
    assert got == want
    assert torch.equal(got_rng, want_rng)


def test_mixed_batch_strict_row_matches_vllm(rs):
    """A seeded strict request beside a seeded loose one: the strict row is
    vLLM's at every step, its generator untouched by its neighbour's draws;
    the loose row does draw (its generator moves past vLLM's) and loosens."""
    runner = fake_runner([{"fly": {"strict": True}}, {}], [0, 0])
    sampler = fsd_sampler(strict=False, runner=runner)
    n, seeds = [3, 3], {0: 42, 1: 7}
    got, got_gens, _ = run_steps(lambda a: verify(sampler, rs, a),
                                 n, seeds, True)
    want, want_gens, _ = vllm_steps(rs, n, seeds, True)
    assert [s[0] for s in got] == [s[0] for s in want]
    assert torch.equal(got_gens[0], want_gens[0])
    assert not torch.equal(got_gens[1], want_gens[1])
    assert [s[1] for s in got] != [s[1] for s in want]


def test_drafts_inside_strict_prefix_draw_nothing(rs):
    """A loose request whose drafts all fall inside its strict prefix is
    verified exactly this step: no draw from its generator."""
    runner = fake_runner([{"fly": {"strict_prefix_tokens": 64}}], [5])
    sampler = fsd_sampler(strict=False, runner=runner)
    assert_one_seeded_request_is_vllms(rs, sampler, True)


def test_sample_from_rows():
    """``rows`` picks the requests that draw: those draw exactly what the
    call without ``rows`` draws; the others get the argmax and move neither
    their generator nor the global RNG."""
    from fly_vllm.runners.v1 import sample_from

    probs = torch.softmax(torch.randn(7, V, generator=torch.Generator().manual_seed(3)), -1)
    cu = torch.tensor([3, 5, 7])

    def draw(rows, seeds):
        torch.manual_seed(11)
        gens = {b: torch.Generator().manual_seed(s) for b, s in seeds.items()}
        out = sample_from(probs, cu, gens, rows) if rows is not None else \
            sample_from(probs, cu, gens)
        return out, {b: g.get_state() for b, g in gens.items()}, torch.get_rng_state()

    full, full_gens, full_rng = draw(None, {0: 1, 2: 2})
    same, same_gens, same_rng = draw([True, True, True], {0: 1, 2: 2})
    assert torch.equal(same, full) and torch.equal(same_rng, full_rng)
    assert all(torch.equal(same_gens[b], full_gens[b]) for b in full_gens)

    # Row 1 (unseeded) needs no draw and rows 0, 2 are seeded: no global draw.
    part, part_gens, part_rng = draw([True, False, True], {0: 1, 2: 2})
    torch.manual_seed(11)
    assert torch.equal(part_rng, torch.get_rng_state())
    assert torch.equal(part[:3], full[:3]) and torch.equal(part[5:], full[5:])
    assert torch.equal(part[3:5], probs[3:5].argmax(-1))
    assert all(torch.equal(part_gens[b], full_gens[b]) for b in full_gens)

    # Seeded row 2 needs no draw: its generator stays put.
    _, gens, _ = draw([True, True, False], {0: 1, 2: 2})
    assert torch.equal(gens[2], torch.Generator().manual_seed(2).get_state())

    none, none_gens, none_rng = draw([False, False, False], {0: 1})
    torch.manual_seed(11)
    assert torch.equal(none_rng, torch.get_rng_state())
    assert torch.equal(none_gens[0], torch.Generator().manual_seed(1).get_state())
    assert torch.equal(none, probs.argmax(-1))
