"""A plain-Python reference of FLy's rule, written from the paper's code and
vLLM's native FLy, one request and one position at a time. The tests compare
the tensor verifier against it."""

from __future__ import annotations

import math
import struct

NEG_INF = float("-inf")


def f32(x: float) -> float:
    """x rounded to float32, as the tensor verifier computes."""
    return struct.unpack("f", struct.pack("f", x))[0]


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
    margin: float = math.inf,
    loose_from: int = 0,
) -> tuple[list[int], list[bool]]:
    """Returns (emitted tokens, loose flag per emitted draft).

    A mismatch is loosely accepted only at positions >= ``loose_from`` (the
    strict prefix), where the top-k entropy is >= ``threshold`` and the
    target's logit margin over the draft, max logit - draft logit (in
    float32), is <= ``margin``; then the window and the guards decide."""
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
        row = logits[i]
        valid = 0 <= d < vocab
        gap = (math.inf if not valid or row[d] == NEG_INF
               else f32(row[argmax(row)] - row[d]))
        uncertain = (i >= loose_from and topk_entropy(row, top_k) >= threshold
                     and gap <= margin)
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


def first_parting(a: list[int], b: list[int]) -> int:
    """Index of the first token where two outputs differ (the shorter length
    if one is a prefix of the other; the length if they are equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else len(a)
