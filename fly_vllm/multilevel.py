"""FLy's multi-level acceleration: an n-gram lookup speeds up the drafter.

vLLM's draft-model proposer runs the drafter K times per step, one token per
request per pass. With ``fly.multilevel`` on, after vLLM's own first pass
(which yields d1), each further pass feeds, per request, the last draft token
followed by up to ``multilevel_ngram_tokens`` tokens that an n-gram lookup
over the request's context (prompt, output and drafts so far) proposes. The
drafter's argmax at each fed position checks the next candidate; the agreeing
prefix is kept, plus the drafter's own token after it. A greedy drafter so
produces exactly the drafts it would have produced alone, in fewer passes
wherever the text repeats itself (code, math restating the question).

The lookup (``ngram_propose``) tries the longest suffix n-gram first
(``multilevel_ngram_max`` down to ``multilevel_ngram_min``) and takes its
earliest earlier occurrence, as the authors' ``draft_with_ngram`` does. Where
nothing matches, the pass feeds the last draft alone (the authors reuse the
previous proposal or placeholder ids; that changes only the pass count).

KV cache: a pass writes the drafter's KV for every fed token at its position;
entries of rejected candidates lie beyond the request's new sequence length
and are overwritten by the next pass or the next step, exactly as vLLM's own
rejected drafts are. Fed positions never pass position(d1) + K - 2, the last
one vLLM's loop writes, so no slot outside the step's allocation is touched.

The lookup runs on the host, so each further pass costs one device-to-host
copy of the drafter's argmax; the context comes from the runner's token table
and this step's target tokens (``host_contexts``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from fly_vllm.drafter import forward, step_rows

logger = logging.getLogger(__name__)


def ngram_propose(context: np.ndarray, max_n: int = 4, min_n: int = 1,
                  num_tokens: int = 6) -> np.ndarray:
    """Up to ``num_tokens`` tokens that followed the earliest earlier
    occurrence of the context's longest matching suffix n-gram.

    Args:
        context: [L] token ids, the last being the newest.
    Returns:
        [<= num_tokens] token ids (empty when no n-gram of size min_n..max_n
        occurs earlier in the context).
    """
    length = context.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows that end before the last token, so a continuation exists.
        windows = sliding_window_view(context[: length - 1], n)
        hits = np.flatnonzero((windows == context[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return context[start:start + num_tokens]
    return context[:0]


def agreed_prefix(predicted: np.ndarray, candidates: np.ndarray) -> int:
    """How many leading candidates the drafter's argmax predictions confirm:
    ``predicted[j]`` is the drafter's token after the fed token j, which must
    equal ``candidates[j]`` (fed at j + 1) for the candidate to stand."""
    n = candidates.shape[0]
    miss = np.flatnonzero(predicted[:n] != candidates)
    return int(miss[0]) if miss.size else n


def host_contexts(runner: Any, args: dict, batch: int) -> list:
    """Each request's recent token ids on the host, ending with the token the
    first draft follows: the runner's token table up to this step's first
    target position, this step's accepted tokens, and ``next_token_ids``.

    The lookup only proposes candidates and the drafter confirms each one, so
    a stale or short context costs passes, never a different draft. None for
    every request when no runner is known (the lookup is then skipped).

    Args:
        runner: vLLM's model runner (its ``input_batch`` token table).
        args: ``propose``'s arguments by name.
    """
    if runner is None:
        return [None] * batch
    ib = runner.input_batch
    qsl, first, valid = step_rows(args, batch)
    tokens = args["target_token_ids"].tolist()
    nxt = args["next_token_ids"].tolist()
    out = []
    for b in range(batch):
        lo, hi = qsl[b], qsl[b] + valid[b]
        known = int(ib.num_tokens_no_spec[b]) if b < ib.num_reqs else 0
        head = ib.token_ids_cpu[b, :max(0, min(known, first[b] if hi > lo else known))]
        out.append(np.concatenate([head, np.asarray(tokens[lo:hi] + [nxt[b]],
                                                    dtype=head.dtype)]))
    return out


@dataclasses.dataclass
class DrafterCounts:
    """One ``propose`` call's drafter work, for the metrics."""

    passes: int = 0
    ngram_tokens: int = 0


def multilevel_propose(proposer: Any, mod: Any, first_pass, k: int, contexts: list,
                       fly, first_top: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, DrafterCounts, torch.Tensor | None]:
    """Extend vLLM's first draft token to K tokens with the lookup.

    Args:
        proposer: vLLM's DraftModelProposer, right after its first pass.
        mod: ``vllm.v1.spec_decode.llm_base_proposer`` (forward context,
            CUDAGraphMode and PADDING_SLOT_ID as that vLLM version has them).
        first_pass: (d1 [B, 1], token_indices_to_sample [B], metadata) of the
            first pass.
        k: K, the draft tokens wanted per request.
        contexts: per request, its token ids ending with the token d1
            follows, or None where the host's tokens do not line up (that
            request then drafts one token per pass, as without the lookup).
        fly: the FlyConfig (n-gram sizes).
        first_top: [B] the drafter's top probability for d1 (flex decoding),
            or None when no confidences are wanted.
    Returns:
        ([B, K] draft token ids, the drafter's counts for this call, [B, K]
        float32 top probabilities of the drafts or None).
    """
    d1, sample_idx, cad = first_pass
    device = d1.device
    batch = d1.shape[0]
    pos_d1 = (proposer.positions[sample_idx].long() + 1).cpu().numpy()
    drafts = [[int(t)] for t in d1[:, 0].tolist()]
    tops = None if first_top is None else [[float(p)] for p in first_top.tolist()]
    counts = DrafterCounts(passes=1)
    while any(len(d) < k for d in drafts):
        lens = np.ones(batch, dtype=np.int64)
        starts = np.empty(batch, dtype=np.int64)
        feed, cands = [], []
        for b, d in enumerate(drafts):
            room = k - len(d) - 1
            c = np.zeros(0, dtype=np.int64)
            if room > 0 and contexts[b] is not None:
                c = ngram_propose(np.concatenate([contexts[b], np.asarray(d)]),
                                  fly.multilevel_ngram_max, fly.multilevel_ngram_min,
                                  min(room, fly.multilevel_ngram_tokens))
            cands.append(c)  # empty once a request has its K drafts (room < 0)
            lens[b] += c.shape[0]
            starts[b] = pos_d1[b] + len(d) - 1
            feed.append(d[-1])
            feed.extend(int(t) for t in c)
        feeding = np.array([len(d) < k for d in drafts])
        logits = forward(proposer, mod, cad, feed, lens, starts, feeding)
        pred = logits.argmax(dim=-1).cpu().numpy()
        if tops is not None:
            from fly_vllm.flex import top_probability

            top = top_probability(logits).cpu().numpy()
        counts.passes += 1
        offset = 0
        for b, d in enumerate(drafts):
            if len(d) < k:
                p = pred[offset:offset + lens[b]]
                acc = agreed_prefix(p, cands[b])
                d.extend(int(t) for t in cands[b][:acc])
                d.append(int(p[acc]))
                if tops is not None:
                    tops[b].extend(float(x) for x in top[offset:offset + acc + 1])
                counts.ngram_tokens += acc
            offset += lens[b]
    out = torch.tensor(drafts, dtype=d1.dtype, device=device)
    conf = None if tops is None else torch.tensor(tops, dtype=torch.float32, device=device)
    return out, counts, conf
