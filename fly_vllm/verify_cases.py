"""Random verification batches: what the start-up check (``verify_path.py``)
and ``fly-vllm selftest`` run a verifier and the torch reference on.

A case is the keyword arguments of one call of the rule's reference,
``fly_vllm.verifier.fly_verify`` (rule "fly") or ``fly_vllm.fsd.fsd_verify``
(rule "fsd"), with the dtypes the glue passes:

    B requests with n_b in 0..S drafts each, the last with S (S is the
    batch's ``max_spec_len``, as in vLLM), T = sum n_b draft tokens, V tokens.
    draft_token_ids       [T] int32: mostly the target's argmax, else random
                          ids and -1 placeholders
    cu_num_draft_tokens   [B] int32, inclusive cumsum
    target_logits (fly)   [T, V]: -inf entries, a row with a single finite
                          logit, rounded (tied) logits where asked
    target_probs, draft_probs (fsd)  [T, V]: zeros, rows with q = p, a row
                          with near-disjoint supports, tied maxima where asked
    bonus_token_ids       [B, 1] int32
    per request [B]: thresholds (fly: +inf = a strict row; fsd: ``exact``
    rows), windows and spans, margin bounds and strict prefixes
    (``loose_from``) where asked
    veto                  [T] bool, where asked
    sampled rows: is_greedy [B] bool (mixed), uniform_probs [T] (float64;
    float32 on the CPU, as the glue passes them), recovered (and for fsd's
    "resample" variant resampled) token ids [T] int32, target_probs [T, V]
    float32 (fly).

Every threshold is kept at least ``CLEARANCE`` (relative above 1) from each
value it is compared with (top-k entropy, divergence): a verifier that sums
in another order (the Triton kernels, within float tolerance) must still
decide exactly as the reference does. Tensors are drawn with the given generator on its
device, then moved to ``device``: a CPU generator makes a case reproducible
on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fly_vllm.fsd import divergence
from fly_vllm.verifier import topk_entropy

INF = float("inf")
CLEARANCE = 1e-3
ENTROPY_THRESHOLDS = (0.0, 0.1, 0.3, 0.6, INF)  # INF: a strict row
MARGINS = (INF, 0.0, 0.3, 0.5, 2.0)  # INF: no margin test


@dataclass(frozen=True)
class CaseShape:
    """What one random batch exercises."""

    batch: int  # B
    spec_len: int  # S, the batch's max_spec_len
    vocab: int  # V
    sampled: bool = False  # some rows sample (is_greedy given); else all greedy
    veto: bool = False  # a veto mask (the quality guards)
    margin: bool = False  # fly: margin bounds; both rules: strict prefixes
    dtype: torch.dtype = torch.float32  # of the logits (fly) or p and q (fsd)
    ties: bool = False  # tied maxima and top-k values
    full: bool = False  # every request has S drafts (timing shapes)

    def __str__(self) -> str:
        flags = [f for f in ("sampled", "veto", "margin", "ties", "full") if getattr(self, f)]
        return " ".join([f"B={self.batch} S={self.spec_len} V={self.vocab}",
                         str(self.dtype).removeprefix("torch."), *flags])


def spec_lengths(k: int) -> list[int]:
    """The max_spec_len values whose kernel specialisations an engine with K
    drafts can reach: 1, each power of two below K, and K. (vLLM's
    max_spec_len is the longest draft in the batch, 1..K; the kernels
    specialise on its next power of two, and on the value 1.)"""
    k = max(k, 1)
    return sorted({1, k, *(2 ** i for i in range(1, k.bit_length()) if 2 ** i < k)})


def probe_shapes(k: int, vocab: int) -> list[CaseShape]:
    """The start-up check's batches: at each of ``spec_lengths(k)``, greedy
    and sampled rows, each with and without a veto mask, with margin bounds
    and strict prefixes in half of them."""
    combos = ((False, False, False), (False, True, True), (True, False, True),
              (True, True, False))
    return [CaseShape(3, s, vocab, sampled=sampled, veto=veto, margin=margin)
            for s in spec_lengths(k) for sampled, veto, margin in combos]


def make_case(rule: str, g: torch.Generator, shape: CaseShape, device, *, top_k: int = 3,
              kind: str = "js", variant: str = "resample") -> dict:
    """One batch for ``rule``: the reference's keyword arguments on
    ``device``. ``top_k`` is fly's entropy top-k; ``kind`` and ``variant``
    are fsd's divergence and variant."""
    if rule == "fsd":
        args = _fsd_case(g, shape, kind, variant)
    else:
        args = _fly_case(g, shape, top_k)
    device = torch.device(device)
    if "uniform_probs" in args and device.type == "cpu":
        args["uniform_probs"] = args["uniform_probs"].float()  # as the glue does
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _draft_counts(g: torch.Generator, shape: CaseShape) -> torch.Tensor:
    """[B] drafts per request in 0..S, the last with S."""
    S = shape.spec_len
    if shape.full:
        return torch.full((shape.batch,), S, dtype=torch.int64, device=g.device)
    n = torch.randint(0, S + 1, (shape.batch,), generator=g, device=g.device)
    n[-1] = S
    return n


def _pick(g: torch.Generator, values: tuple[float, ...], size: int) -> torch.Tensor:
    """[size] float32 values drawn from ``values``."""
    idx = torch.randint(0, len(values), (size,), generator=g, device=g.device)
    return torch.tensor(values, dtype=torch.float32, device=g.device)[idx]


def _clear(compared: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """[B] thresholds: each of ``wanted`` raised until it lies at least
    CLEARANCE * max(1, |x|) from every finite value x in ``compared`` ([N])."""
    values = compared[torch.isfinite(compared)].double().cpu()
    gap = CLEARANCE * values.abs().clamp(min=1.0)
    out = []
    for t in wanted.tolist():
        while math.isfinite(t) and ((values - t).abs() < gap).any():
            t += 0.7 * CLEARANCE * max(1.0, abs(t))
        out.append(t)
    return torch.tensor(out, dtype=torch.float32, device=wanted.device)


def _sampled_rows(g: torch.Generator, B: int, T: int, V: int) -> dict:
    dev = g.device
    return dict(
        is_greedy=torch.rand(B, generator=g, device=dev) < 0.5,
        uniform_probs=torch.rand(T, generator=g, dtype=torch.float64, device=dev),
        recovered_token_ids=torch.randint(0, V, (T,), generator=g, device=dev).int(),
    )


def _common(g: torch.Generator, shape: CaseShape, n: torch.Tensor, argmax: torch.Tensor,
            keep: float) -> dict:
    """Drafts (``keep`` of them the argmax), cumsum, bonus tokens, veto and
    strict prefixes: the arguments both rules take."""
    dev, T, B, V, S = g.device, argmax.shape[0], shape.batch, shape.vocab, shape.spec_len
    other = torch.randint(-1, V, (T,), generator=g, device=dev)
    args = dict(
        draft_token_ids=torch.where(torch.rand(T, generator=g, device=dev) < keep, argmax,
                                    other).int(),
        cu_num_draft_tokens=n.cumsum(0).int(),
        bonus_token_ids=torch.randint(0, V, (B, 1), generator=g, device=dev).int(),
        max_spec_len=S,
    )
    if shape.veto:
        args["veto"] = torch.rand(T, generator=g, device=dev) < 0.3
    if shape.margin:
        args["loose_from"] = torch.randint(0, S + 1, (B,), generator=g, device=dev)
    return args


def _fly_case(g: torch.Generator, shape: CaseShape, top_k: int) -> dict:
    dev, B, V, S = g.device, shape.batch, shape.vocab, shape.spec_len
    n = _draft_counts(g, shape)
    T = int(n.sum())
    logits = (torch.randn(T, V, generator=g, device=dev)
              * torch.rand(T, 1, generator=g, device=dev) * 4)
    if shape.ties:
        logits = logits.round()
    if T:
        logits[torch.rand(T, V, generator=g, device=dev) < 0.2] = -INF
        logits[0] = -INF
        logits[0, V - 1] = 1.0  # a single finite logit: entropy 0
    logits = logits.to(shape.dtype)
    args = _common(g, shape, n, logits.float().argmax(-1), keep=0.6)
    window = torch.randint(1, max(S, 2), (B,), generator=g, device=dev)
    args.update(
        target_logits=logits,
        entropy_threshold=_clear(topk_entropy(logits.float(), top_k),
                                 _pick(g, ENTROPY_THRESHOLDS, B)),
        window=window,
        # vLLM's convention (span W) or the paper's (W - 1), per request.
        window_span=window - torch.randint(0, 2, (B,), generator=g, device=dev),
        entropy_top_k=top_k,
    )
    if shape.margin:
        args["margin"] = _pick(g, MARGINS, B)
    if shape.sampled:
        args.update(_sampled_rows(g, B, T, V), target_probs=logits.float().softmax(-1))
        if torch.rand(1, generator=g, device=dev).item() < 0.5:  # a drafter's q
            args["draft_probs"] = torch.randn(T, V, generator=g, device=dev).softmax(-1)
    return args


def _probs(g: torch.Generator, T: int, V: int, shape: CaseShape) -> torch.Tensor:
    """[T, V] softmax rows with exact zeros (masked entries)."""
    dev = g.device
    x = torch.randn(T, V, generator=g, device=dev) * torch.rand(T, 1, generator=g, device=dev) * 4
    x[torch.rand(T, V, generator=g, device=dev) < 0.2] = -INF
    x[:, 0] = x[:, 0].clamp_min(-30.0)  # no all-masked row
    p = x.softmax(-1)
    if shape.ties and T:  # a second index holds each row's maximum
        rows = torch.arange(T, device=dev)
        p[rows, torch.randint(0, V, (T,), generator=g, device=dev)] = p.max(-1).values
    return p.to(shape.dtype)


def _fsd_case(g: torch.Generator, shape: CaseShape, kind: str, variant: str) -> dict:
    dev, B, V = g.device, shape.batch, shape.vocab
    n = _draft_counts(g, shape)
    T = int(n.sum())
    p, q = _probs(g, T, V, shape), _probs(g, T, V, shape)
    same = torch.rand(T, generator=g, device=dev) < 0.2
    q[same] = p[same]  # identical distributions: D = 0
    if T:
        q[-1] = 0
        q[-1, p[-1].float().argmin()] = 1  # near-disjoint supports
    args = _common(g, shape, n, p.float().argmax(-1), keep=0.5)
    div = divergence(p, q, kind)
    req = torch.repeat_interleave(torch.arange(B, device=dev), n)
    wanted = []
    for b in range(B):  # about the request's own median divergence
        d = div[(req == b) & torch.isfinite(div)]
        wanted.append(float(d.median()) if d.numel() else 0.1)
    args.update(
        target_probs=p, draft_probs=q, kind=kind, variant=variant,
        threshold=_clear(div, torch.tensor(wanted, device=dev)),
        exact=torch.rand(B, generator=g, device=dev) < 0.3,
    )
    if torch.rand(1, generator=g, device=dev).item() < 0.5:  # the glue's greedy drafter
        args["draft_token_probs"] = torch.ones(T, device=dev)
    if shape.sampled:
        args.update(_sampled_rows(g, B, T, V))
        if variant == "resample":
            args["resampled_token_ids"] = torch.randint(0, V, (T,), generator=g,
                                                        device=dev).int()
    return args
