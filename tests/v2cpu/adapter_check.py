"""FLy's V2 adapter against vLLM V2's own RejectionSampler, batch for batch.

Run under the V2 harness (tests/conftest.py: v2_env), as a script that
writes a JSON report: ``python -m tests.v2cpu.adapter_check OUT.json``.
tests/test_v2_adapter.py asserts on it.

Each case is a random V2 batch (ragged drafts, 0 to K per request; greedy
and sampled requests, temperatures 0, 0.7 and 1; seeds; with and without
V2's cached draft logits; placeholder drafts) verified at ``_verify``, the
level where the adapter works, by vLLM's sampler and by ours on the same
inputs. Checks:

1. strict: every row (tokens up to num_sampled, and num_sampled) is vLLM's,
   whether the step takes vLLM's rows at once (every request strict) or
   goes through the verification core's exact path;
2. loose (FLy, entropy 0, window 1): a row the core accepted nothing
   loosely in is vLLM's; a row with loose accepts emits its drafts up to L
   and then, at L, exactly the token vLLM's own sampler emits when its
   verification reaches row L and rejects there. That oracle is vLLM's
   ``_verify`` on a copy of the batch whose rows before L are made certain
   accepts (a logit of +60 at the draft; row L is unchanged);
3. FSD's resample variant, whose corrections come from p: the same oracle
   with the draft at L replaced by a placeholder (vLLM then samples p); the
   drafter greedy, its logits handed to FSD as plugin patch 14 does;
4. the uniforms our kernel draws equal vLLM's ``tl_rand32`` bit for bit.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch

V, K, MAX_REQS = 64, 4, 8


class _Uva(SimpleNamespace):
    """Stands in for V2's UvaBackedTensor (.np on the host, .gpu)."""

    @classmethod
    def of(cls, values, dtype):
        t = torch.tensor(values, dtype=dtype)
        return cls(np=t.numpy(), gpu=t, cpu=t)


def stub_sampler(temps, seeds, prompt_lens):
    """What V2's RejectionSampler reads of its Sampler: temperature only
    (no top-k/p, penalties or logprobs)."""

    def apply_sampling_params(logits, expanded_idx_mapping, *args):
        t = torch.tensor(temps, dtype=torch.float32)[expanded_idx_mapping.long()]
        return logits / torch.where(t > 0, t, torch.ones_like(t)).unsqueeze(-1)

    return SimpleNamespace(
        apply_sampling_params=apply_sampling_params, use_fp64_gumbel=False,
        logprobs_mode="raw_logprobs", compute_nans=False, return_sampling_mask=False,
        sampling_states=SimpleNamespace(
            temperature=_Uva.of(temps, torch.float32), seeds=_Uva.of(seeds, torch.int64),
            max_num_logprobs=lambda idx: -1),
        req_states=SimpleNamespace(prompt_len=_Uva.of(prompt_lens, torch.int32),
                                   prefill_len=_Uva.of(prompt_lens, torch.int32)))


def make_batch(seed: int, with_q: bool):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 5))
    n = rng.integers(0, K + 1, size=B)
    states = rng.permutation(MAX_REQS)[:B]
    temps = [float(rng.choice([0.0, 0.0, 0.7, 1.0])) for _ in range(MAX_REQS)]
    seeds = [int(x) for x in rng.integers(1, 2**40, size=MAX_REQS)]
    cu = np.concatenate([[0], np.cumsum(n + 1)]).astype(np.int32)
    num_logits = int(cu[-1])
    logits = torch.randn(num_logits, V, generator=g) * 2
    draft_sampled = torch.randint(0, V, (num_logits,), generator=g)
    pos = torch.zeros(num_logits, dtype=torch.int64)
    local = torch.zeros(num_logits, dtype=torch.int64)
    expanded = torch.zeros(num_logits, dtype=torch.int64)
    for b in range(B):
        p0 = int(rng.integers(8, 40))
        for i in range(n[b] + 1):
            r = cu[b] + i
            pos[r], local[r], expanded[r] = p0 + i, i, states[b]
            if i < n[b] and rng.random() < 0.6:  # a draft the target likes
                draft_sampled[r + 1] = logits[r].argmax()
    verify = draft_sampled.clone()
    if rng.random() < 0.3 and num_logits > 1:  # a placeholder draft
        r = int(rng.integers(1, num_logits))
        if local[r] > 0:
            verify[r] = -1
    q = torch.randn(MAX_REQS, K, V, generator=g) * 2 if with_q else None
    args = dict(logits=logits, draft_logits=q, draft_sampled=draft_sampled, pos=pos,
                cu_num_logits=torch.from_numpy(cu), idx_mapping=torch.from_numpy(states),
                idx_mapping_np=states, expanded_idx_mapping=expanded,
                expanded_local_pos=local, seq_lens_upper_bound_np=np.zeros(B, np.int32),
                verify_draft_sampled=verify)
    prompt_lens = [4] * MAX_REQS
    return args, temps, seeds, prompt_lens, n


def samplers(fly_cfg, temps, seeds, prompt_lens):
    import contextvars

    from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler

    from fly_vllm.core import VerificationCore
    from fly_vllm.runners.v2 import FlyV2RejectionSampler

    spec = SimpleNamespace(num_speculative_tokens=K, enable_adaptive_verification=False,
                           rejection_sample_method="standard")
    sampler = stub_sampler(temps, seeds, prompt_lens)
    vllm_rs = RejectionSampler(sampler, spec, "cpu")
    core = VerificationCore(fly_cfg, K, "cpu")
    fly_rs = FlyV2RejectionSampler(sampler, spec, "cpu", core,
                                   contextvars.ContextVar("w", default=True))
    return vllm_rs, fly_rs


def rows_of(sampled, num_sampled):
    return [sampled[b, :int(num_sampled[b])].tolist() for b in range(sampled.shape[0])]


def oracle(vllm_rs, args, b, L, n, placeholder_at_l=False):
    """The token vLLM emits at row L of request b when its verification
    reaches L: rows before L made certain accepts, row L unchanged."""
    a = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
    start = int(a["cu_num_logits"][b])
    for i in range(L):
        d = int(a["verify_draft_sampled"][start + i + 1])
        a["logits"][start + i] = -30.0
        a["logits"][start + i, d] = 30.0  # p(d) = 1: accepted whatever q(d) is
    if placeholder_at_l and L < n[b]:
        a["verify_draft_sampled"][start + L + 1] = -1
    _, s, ns = vllm_rs._verify(**a)
    return int(s[b, L]), int(ns[b])


def run_case(seed, with_q, fly_cfg, kind):
    args, temps, seeds, prompt_lens, n = make_batch(seed, with_q)
    vllm_rs, fly_rs = samplers(fly_cfg, temps, seeds, prompt_lens)
    if kind == "strict_core":  # through the core's exact path, not vLLM's rows alone
        fly_rs.core.exact_only = lambda requests: False
    if kind == "fsd":
        # As on an engine (plugin patch 14): the drafter drafts greedily, so
        # vLLM sees no draft logits, and its logits reach FSD on their own.
        fly_rs.fsd_draft_logits, args["draft_logits"] = args["draft_logits"], None
    _, s_v, ns_v = vllm_rs._verify(**args)
    _, s_f, ns_f = fly_rs._verify(**args)
    want, got = rows_of(s_v, ns_v), rows_of(s_f, ns_f)
    out = {"seed": seed, "with_q": with_q, "kind": kind, "equal_rows": 0, "loose_rows": 0,
           "oracle_ok": 0, "oracle_bad": [], "bad_rows": []}
    for b in range(len(n)):
        if got[b] == want[b]:
            out["equal_rows"] += 1
            continue
        if kind.startswith("strict"):
            out["bad_rows"].append([b, got[b], want[b]])
            continue
        L = len(got[b]) - 1
        start = int(args["cu_num_logits"][b])
        drafts = args["verify_draft_sampled"][start + 1:start + 1 + L].tolist()
        out["loose_rows"] += 1
        if got[b][:L] != drafts:
            out["bad_rows"].append([b, got[b], drafts])
            continue
        token, _ = oracle(vllm_rs, args, b, L, n, placeholder_at_l=kind == "fsd")
        if token == got[b][L]:
            out["oracle_ok"] += 1
        else:
            out["oracle_bad"].append([b, L, got[b][L], token])
    return out


def uniforms_match() -> bool:
    from fly_vllm.kernels.v2_uniform import v2_uniforms
    from tests.v2cpu.vllm_uniform import vllm_uniform_kernel

    seeds = torch.tensor([3, 2**40 + 17, 0, 123456789], dtype=torch.int64)
    states = torch.tensor([0, 1, 2, 3, 1, 0], dtype=torch.int64)
    pos = torch.tensor([5, 9, 0, 2**20, 10, 6], dtype=torch.int64)
    want = torch.empty(6, dtype=torch.float32)
    vllm_uniform_kernel[(6,)](want, seeds, states, pos)
    return bool(torch.equal(v2_uniforms(seeds, states, pos), want))


def main() -> None:
    from fly_vllm.config import FlyConfig

    cases = {"strict": FlyConfig(strict=True), "strict_core": FlyConfig(strict=True),
             "loose": FlyConfig(entropy_threshold=0.0, window=1),
             "fsd": FlyConfig(rule="fsd", fsd_threshold=0.6)}
    results = []
    for kind, cfg in cases.items():
        for seed in range(10):
            for with_q in (False, True):
                if kind == "fsd" and not with_q:
                    continue  # V2 keeps q only with probabilistic drafting
                results.append(run_case(seed, with_q, cfg, kind))
    json.dump({"cases": results, "uniforms_match": uniforms_match()},
              open(sys.argv[1], "w"))


if __name__ == "__main__":
    main()
