"""A plain-Python reference of FLy's rule, written from the paper's code and
vLLM's native FLy, one request and one position at a time. The tests compare
the tensor verifier against it."""

from __future__ import annotations

import math

NEG_INF = float("-inf")


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    if m == NEG_INF:
        return [0.0] * len(row)
    e = [math.exp(x - m) if x != NEG_INF else 0.0 for x in row]
    s = sum(e)
    return [x / s for x in e]


def topk_entropy(row: list[float], k: int) -> float:
    probs = sorted(softmax(row), reverse=True)[:k]
    return -sum(p * math.log(p) for p in probs if p > 0)


def argmax(row: list[float]) -> int:
    best = 0
    for i, x in enumerate(row):
        if x > row[best]:
            best = i
    return best


def verify_request(
    drafts: list[int],
    logits: list[list[float]],
    bonus: int,
    *,
    threshold: float,
    window: int,
    span: int,
    top_k: int = 3,
    greedy: bool = True,
    uniforms: list[float] | None = None,
    recovered: list[int] | None = None,
    draft_probs: list[list[float]] | None = None,
    veto: list[bool] | None = None,
) -> tuple[list[int], list[bool]]:
    """Returns (emitted tokens, loose flag per emitted draft)."""
    n = len(drafts)
    vocab = len(logits[0]) if logits else 0
    native = []
    finite = []
    for i, d in enumerate(drafts):
        valid = 0 <= d < vocab
        if greedy:
            native.append(valid and d == argmax(logits[i]))
            finite.append(valid and logits[i][d] > NEG_INF)
        else:
            p = softmax(logits[i])[d] if valid else 0.0
            q = (draft_probs[i][d] if draft_probs else 1.0) if valid else 0.0
            native.append(valid and q > 0 and p / q >= uniforms[i])
            finite.append(valid and p > 0 and q > 0)
    emitted: list[int] = []
    loose: list[bool] = []
    for i, d in enumerate(drafts):
        if native[i]:
            emitted.append(d)
            loose.append(False)
            continue
        uncertain = topk_entropy(logits[i], top_k) >= threshold
        fits = i + window < n
        vetoed = bool(veto and veto[i])
        if (uncertain and finite[i] and fits and not vetoed
                and all(native[i + 1 : i + 1 + span])):
            emitted.append(d)
            loose.append(True)
            continue
        emitted.append(argmax(logits[i]) if greedy else recovered[i])
        return emitted, loose
    emitted.append(bonus)
    return emitted, loose
