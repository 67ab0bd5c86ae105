"""The Triton kernels against the torch reference, under TRITON_INTERPRET=1 on
CPU (on a GPU they run natively). Small shapes: the interpreter is slow."""

from __future__ import annotations


import pytest
import torch

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1.
triton = pytest.importorskip("triton")

from fly_vllm.kernels import fly_verify_triton, row_stats  # noqa: E402
from fly_vllm.verifier import fly_verify, topk_entropy  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("output_token_ids", "num_accepted", "native", "uncertain", "rescued",
          "in_prefix", "loose_accepted", "gated", "guard_vetoed", "rule_vetoed",
          "positions", "prefix_exact")


def make_case(seed, B, K, V, *, dtype=torch.float32, zero_some=True, masked=True,
              ties=False, random_rows=False):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0 if zero_some else 1, K + 1, (B,), generator=g)
    if zero_some and B > 1:
        n[0] = 0
    T = int(n.sum())
    logits = torch.randn(T, V, generator=g) * torch.rand(T, 1, generator=g) * 4
    if ties:
        logits = logits.round()  # many equal maxima and top-k values
    if masked and T:
        logits[torch.rand(T, V, generator=g) < 0.2] = float("-inf")
        logits[0] = float("-inf")
        logits[0, V - 1] = 1.0
    logits = logits.to(dtype)
    am = logits.float().argmax(-1)
    drafts = torch.where(torch.rand(T, generator=g) < 0.6, am,
                         torch.randint(-1, V, (T,), generator=g)).int()
    args = dict(
        draft_token_ids=drafts.to(DEV), cu_num_draft_tokens=n.cumsum(0).to(DEV),
        target_logits=logits.to(DEV),
        bonus_token_ids=torch.randint(0, V, (B, 1), generator=g).to(DEV),
        max_spec_len=K,
        entropy_threshold=torch.tensor([0.0, 0.3, float("inf"), 0.1] * B)[:B].to(DEV),
        window=torch.randint(1, K, (B,), generator=g).to(DEV) if K > 1
        else torch.ones(B, dtype=torch.long).to(DEV),
        entropy_top_k=int(torch.randint(1, 9, (1,), generator=g)),
    )
    args["window_span"] = args["window"] - torch.randint(0, 2, (B,), generator=g).to(DEV)
    if seed % 2:
        args["veto"] = (torch.rand(T, generator=g) < 0.3).to(DEV)
    if seed % 3:  # the margin gate and a strict prefix, per request
        args["margin"] = torch.tensor([float("inf"), 0.5, 0.0, 2.0] * B)[:B].to(DEV)
        args["loose_from"] = torch.randint(0, K + 1, (B,), generator=g).to(DEV)
    if random_rows:
        probs = logits.float().softmax(-1)
        args.update(
            is_greedy=(torch.rand(B, generator=g) < 0.5).to(DEV),
            target_probs=probs.to(DEV),
            draft_probs=torch.softmax(torch.randn(T, V, generator=g), -1).to(DEV),
            uniform_probs=torch.rand(T, generator=g, dtype=torch.float64).to(DEV),
            recovered_token_ids=torch.randint(0, V, (T,), generator=g).to(DEV),
        )
    return args


def assert_same(args, block_v=None):
    ref = fly_verify(**args)
    got = fly_verify_triton(**args, block_v=block_v)
    for f in FIELDS:
        assert torch.equal(getattr(got, f).cpu(), getattr(ref, f).cpu()), f
    torch.testing.assert_close(got.entropy.cpu(), ref.entropy.cpu(), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.margin.cpu(), ref.margin.cpu())


@pytest.mark.parametrize("V, block_v", [(50, 16), (100, 32), (257, 64), (64, 64)])
def test_row_stats_match_torch(V, block_v):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(7, V, generator=g) * 3
    x[1] = x[1].round()  # ties
    x[2, :] = float("-inf")  # a fully masked row
    x[3, torch.rand(V, generator=g) < 0.5] = float("-inf")
    d = torch.tensor([0, 1, 2, V - 1, -1, V, 5]).int()
    for k in (1, 3, 8):
        lse, amax, ent, dl, gap = row_stats(x.to(DEV), d.to(DEV), k, block_v=block_v)
        assert torch.equal(amax.cpu(), x.argmax(-1))
        ref_lse = torch.logsumexp(x, -1)
        torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.cpu(), topk_entropy(x, k), atol=1e-5, rtol=1e-5)
        want_dl = torch.where((d >= 0) & (d < V),
                              x.gather(1, d.long().clamp(0, V - 1)[:, None])[:, 0],
                              torch.tensor(float("-inf")))
        assert torch.equal(dl.cpu(), want_dl)
        want_gap = torch.where(want_dl == float("-inf"), torch.tensor(float("inf")),
                               x.max(-1).values - want_dl)
        assert torch.equal(gap.cpu(), want_gap)


@pytest.mark.parametrize("K", [2, 5, 8, 17, 32])
def test_greedy_decisions_equal_reference(K):
    assert_same(make_case(K, B=4, K=K, V=37), block_v=16)


@pytest.mark.parametrize("seed", range(3))
def test_ties_and_masked_entries(seed):
    assert_same(make_case(seed, B=3, K=6, V=40, ties=True), block_v=16)


def test_random_rows_equal_reference():
    assert_same(make_case(11, B=5, K=6, V=33, random_rows=True), block_v=16)


def test_bf16_and_fp16_logits():
    for dtype in (torch.bfloat16, torch.float16):
        for seed in (3, 4):  # 4: with the margin gate and a strict prefix
            assert_same(make_case(seed, B=3, K=5, V=45, dtype=dtype), block_v=16)


def test_all_requests_without_drafts():
    B = 3
    args = dict(
        draft_token_ids=torch.zeros(0, dtype=torch.int32, device=DEV),
        cu_num_draft_tokens=torch.zeros(B, dtype=torch.long, device=DEV),
        target_logits=torch.zeros(0, 10, device=DEV),
        bonus_token_ids=torch.tensor([[4], [5], [6]], device=DEV), max_spec_len=3,
        entropy_threshold=torch.zeros(B, device=DEV),
        window=torch.ones(B, dtype=torch.long, device=DEV),
        window_span=torch.ones(B, dtype=torch.long, device=DEV),
    )
    got = fly_verify_triton(**args)
    assert got.output_token_ids[:, 0].tolist() == [4, 5, 6]
    assert_same(args)


NATIVE = __import__("pathlib").Path(__file__).resolve().parent.parent / ".vllm033/vllm/v1/spec_decode/fly.py"


@pytest.mark.skipif(not NATIVE.exists(), reason="run `make vllm033` for vLLM 0.33's fly.py")
def test_kernel_benchmark_plumbing_smoke():
    """The GPU benchmark's harness runs end to end on CPU (interpreter): it
    loads vLLM 0.33's native pre-pass and prints the table. Timings are
    meaningless here; the GPU run is what counts."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--smoke"],
                       cwd=NATIVE.parents[4], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| batch | K | vocab |" in r.stdout and "| 2 | 3 | 300 | float32 |" in r.stdout
