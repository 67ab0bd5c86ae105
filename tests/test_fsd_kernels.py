"""The FSD Triton kernels against the torch reference (fly_vllm.fsd), under
TRITON_INTERPRET=1 on CPU (natively on a GPU). Small shapes: the interpreter
is slow."""

from __future__ import annotations


import pytest
import torch

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1.
triton = pytest.importorskip("triton")

from fly_vllm.fsd import DIVERGENCES, VARIANTS, divergence, fsd_verify  # noqa: E402
from fly_vllm.kernels import fsd_row_stats, fsd_verify_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("output_token_ids", "num_accepted", "native", "uncertain", "rescued",
          "in_prefix", "loose_accepted", "gated", "guard_vetoed", "rule_vetoed",
          "positions", "prefix_exact")


def probs(g, T, V, *, zero_frac=0.2, dtype=torch.float32):
    """Softmax rows with some exact zeros (masked entries)."""
    x = torch.randn(T, V, generator=g) * torch.rand(T, 1, generator=g) * 4
    x[torch.rand(T, V, generator=g) < zero_frac] = float("-inf")
    x[:, 0] = x[:, 0].clamp_min(-30.0)  # no all-masked row
    return x.softmax(-1).to(dtype)


def clear_threshold(div: torch.Tensor, req: torch.Tensor, quantile: float, B: int):
    """A per-request threshold near ``quantile`` of the request's divergences
    but at least 1e-3 from each of them, so that float rounding of D cannot
    flip a decision (the documented edge)."""
    thr = torch.empty(B, dtype=torch.float32)
    finite = div[torch.isfinite(div)]
    for b in range(B):
        d = div[req == b]
        d = d[torch.isfinite(d)]
        t = float(torch.quantile(d, quantile)) if d.numel() else 0.1
        pool = finite if finite.numel() else torch.tensor([0.0])
        while (pool - t).abs().min() < 1e-3:
            t += 7e-4
        thr[b] = t
    return thr


def make_case(seed, B, K, V, *, kind="js", variant="resample", dtype=torch.float32,
              random_rows=False, exact=False, veto=False, same_rows=0.2):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, K + 1, (B,), generator=g)
    if B > 1:
        n[0] = 0
        n[-1] = K
    T = int(n.sum())
    p = probs(g, T, V, dtype=dtype)
    q = probs(g, T, V, dtype=dtype)
    same = torch.rand(T, generator=g) < same_rows
    q[same] = p[same]  # identical distributions: D = 0
    if T:
        q[-1] = 0
        q[-1, (p[-1].float().argmin())] = 1  # near-disjoint support
    am = p.float().argmax(-1)
    drafts = torch.where(torch.rand(T, generator=g) < 0.5, am,
                         torch.randint(-1, V, (T,), generator=g))
    req = torch.repeat_interleave(torch.arange(B), n)
    div = divergence(p, q, kind)
    args = dict(
        draft_token_ids=drafts.to(DEV), cu_num_draft_tokens=n.cumsum(0).to(DEV),
        target_probs=p.to(DEV), draft_probs=q.to(DEV),
        bonus_token_ids=torch.randint(0, V, (B, 1), generator=g).to(DEV),
        max_spec_len=K, threshold=clear_threshold(div, req, 0.6, B).to(DEV),
        kind=kind, variant=variant,
    )
    if exact:
        args["exact"] = (torch.rand(B, generator=g) < 0.4).to(DEV)
        args["loose_from"] = torch.randint(0, K + 1, (B,), generator=g).to(DEV)
    if veto:
        args["veto"] = (torch.rand(T, generator=g) < 0.3).to(DEV)
    if random_rows:
        args.update(
            is_greedy=(torch.rand(B, generator=g) < 0.4).to(DEV),
            uniform_probs=torch.rand(T, generator=g, dtype=torch.float64).to(DEV),
            recovered_token_ids=torch.randint(0, V, (T,), generator=g).to(DEV),
            resampled_token_ids=torch.randint(0, V, (T,), generator=g).to(DEV),
        )
        if seed % 2:
            args["draft_token_probs"] = torch.ones(T).to(DEV)  # a greedy drafter
    return args


def assert_same(args, block_v=None):
    ref = fsd_verify(**args)
    got = fsd_verify_triton(**args, block_v=block_v)
    for f in FIELDS:
        assert torch.equal(getattr(got, f).cpu(), getattr(ref, f).cpu()), f
    torch.testing.assert_close(got.divergence.cpu(), ref.divergence.cpu(),
                               atol=1e-5, rtol=1e-5)
    return ref


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("V, block_v", [(50, 16), (257, 64), (64, 64)])
def test_row_stats_match_torch(kind, V, block_v):
    """Divergence, argmax and p(d), q(d) in one pass, for V that is not a
    multiple of the block, ties, zeros and disjoint supports."""
    g = torch.Generator().manual_seed(V)
    p, q = probs(g, 6, V), probs(g, 6, V)
    q[0] = p[0]  # identical: D = 0
    p[1] = 0
    p[1, :4] = 0.25  # a four-way tie for the argmax
    p[2], q[2] = 0, 0
    p[2, 0], q[2, V - 1] = 1, 1  # disjoint supports
    d = torch.tensor([0, 3, V - 1, -1, V, 5])
    div, am, pd, qd = fsd_row_stats(p, q, d, kind, block_v)
    ref = divergence(p, q, kind)
    torch.testing.assert_close(div, ref, atol=1e-5, rtol=1e-5)  # inf == inf too
    assert div[0].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(am, p.argmax(-1))
    safe = d.clamp(0, V - 1).unsqueeze(-1)
    assert torch.equal(pd, p.gather(-1, safe).squeeze(-1))
    assert torch.equal(qd, q.gather(-1, safe).squeeze(-1))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decisions_equal_reference(kind, variant):
    ref = assert_same(make_case(5, B=4, K=6, V=37, kind=kind, variant=variant,
                                exact=True, veto=True), block_v=16)
    assert ref.loose_accepted.any() or ref.native.any()


@pytest.mark.parametrize("K", [2, 9, 17, 32])
def test_draft_lengths(K):
    assert_same(make_case(K, B=3, K=K, V=29), block_v=16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampled_rows_equal_reference(variant):
    for seed in (3, 4):
        assert_same(make_case(seed, B=5, K=5, V=33, variant=variant, random_rows=True,
                              exact=True, veto=True), block_v=16)


def test_bf16_and_fp16_probabilities():
    for dtype in (torch.bfloat16, torch.float16):
        assert_same(make_case(8, B=3, K=5, V=45, dtype=dtype, kind="tv"), block_v=16)


def test_loose_accepts_and_vetoes_happen():
    """The cases above are not vacuous: with a threshold above every finite D
    the kernel accepts loosely, vetoes where told, and rejects p(d) = 0."""
    args = make_case(9, B=3, K=6, V=31, veto=True)
    p = args["target_probs"]
    # Every draft is p's second choice: never native, always p(d) > 0 ...
    args["draft_token_ids"] = p.topk(2, dim=-1).indices[:, 1]
    args["threshold"] = torch.full((3,), 0.7, device=DEV)  # > ln 2 >= every JS
    # ... except the first draft of the last request, where p(d) = 0.
    first = int(args["cu_num_draft_tokens"][1])
    p[first, args["draft_token_ids"][first]] = 0
    ref = assert_same(args, block_v=16)
    assert ref.loose_accepted.any() and ref.rule_vetoed.any()
    assert ref.guard_vetoed[first] and not ref.native.any()


def test_all_requests_without_drafts():
    B, V = 3, 10
    args = dict(
        draft_token_ids=torch.zeros(0, dtype=torch.long, device=DEV),
        cu_num_draft_tokens=torch.zeros(B, dtype=torch.long, device=DEV),
        target_probs=torch.zeros(0, V, device=DEV), draft_probs=torch.zeros(0, V, device=DEV),
        bonus_token_ids=torch.tensor([[4], [5], [6]], device=DEV), max_spec_len=3,
        threshold=torch.zeros(B, device=DEV),
    )
    got = fsd_verify_triton(**args)
    assert got.output_token_ids[:, 0].tolist() == [4, 5, 6]
    assert_same(args)


def test_bad_kind_and_variant():
    args = make_case(1, B=2, K=3, V=20)
    with pytest.raises(ValueError, match="divergence"):
        fsd_verify_triton(**{**args, "kind": "hellinger"})
    with pytest.raises(ValueError, match="variant"):
        fsd_verify_triton(**{**args, "variant": "other"})


def test_core_selects_the_kernel_on_gpus_only(monkeypatch):
    """The core's verifier is verify_path's: the torch reference on the CPU
    (test_verify_path covers the GPU's choice and its check)."""
    pytest.importorskip("vllm")
    from fly_vllm.core import select_verifier
    from fly_vllm.verifier import fly_verify
    from fly_vllm.verify_path import ENV

    monkeypatch.delenv(ENV, raising=False)
    cpu = torch.device("cpu")
    for rule, reference in (("fsd", fsd_verify), ("fly", fly_verify)):
        v = select_verifier(cpu, rule)
        assert (v.reference, v.path, v.candidate) == (reference, "torch", None)


def test_fsd_kernel_benchmark_plumbing_smoke():
    """The GPU benchmark's FSD grid runs end to end on CPU (interpreter).
    Timings are meaningless here; the GPU run is what counts."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--smoke", "--rule", "fsd"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| batch | K | vocab | dtype | ours us | torch ref us |" in r.stdout
    assert "| 2 | 3 | 300 | float32 |" in r.stdout
