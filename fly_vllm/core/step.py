"""One verification step, in the rules' layout: what a runner adapter hands
the verification core.

Notation, as in vLLM's V1 rejection sampler (``fly_vllm.verifier``): B
requests, T draft tokens (request b has n_b <= S of them, S =
``max_spec_len``), V the vocabulary. Runner V1 passes its inputs nearly as
they are; runner V2's adapter gathers its draft rows out of its flat logits
(fly_vllm/runners/v2.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Step:
    draft_token_ids: torch.Tensor  # [T] int; < 0: a placeholder (never accepted)
    num_draft_tokens: list[int]  # [B] n_b, on the host
    cu_num_draft_tokens: torch.Tensor  # [B] inclusive cumsum of n_b, on the device
    target_logits: torch.Tensor  # [T, V] the target's processed logits at each draft
    bonus_token_ids: torch.Tensor  # [B, 1] the token after n_b accepted drafts
    max_spec_len: int  # S: output rows are [B, S + 1]
    # Each row's (req_id, SamplingParams), None where unknown (warm-up).
    requests: list[tuple[str, Any] | None]
    # -> [B] (list or tensor): output tokens each request had before this
    # step; called only when a request has a strict prefix or the recorder runs.
    num_generated: Callable[[], Any]
    # Sampled rows (all None when every row is greedy). vLLM's own test and
    # draws: accept d iff p(d) / q(d) >= u, else the recovered token.
    is_greedy: torch.Tensor | None = None  # [B] bool
    target_probs: torch.Tensor | None = None  # [T, V] softmax of target_logits
    draft_probs: torch.Tensor | None = None  # [T, V] the proposal q; None: one-hot
    uniform_probs: torch.Tensor | None = None  # [T] u
    recovered_token_ids: torch.Tensor | None = None  # [T] the correction at a rejection
    # Rule fsd: the drafter's distribution for D(p, q) ([T, V]; None: none
    # captured, so the step is verified exactly), q(d) for the native test
    # ([T]; None: one-hot, a greedy drafter), and how this runner draws the
    # resample variant's correction from p for the rows it is given ([B]
    # bools -> [T] tokens; None: the adapter draws it after verification).
    fsd_draft_probs: torch.Tensor | None = None
    fsd_draft_token_probs: torch.Tensor | None = None
    resample: Callable[[list[bool]], torch.Tensor] | None = None
    # The learned judge and mining's recorder: the target's final hidden
    # states [R, H] and each draft's row in them [T].
    hidden: torch.Tensor | None = None
    hidden_rows: torch.Tensor | None = None
    warmup: bool = False  # vLLM's dummy runs: verify, record nothing

    @property
    def req_ids(self) -> list:
        return [r[0] if r is not None else None for r in self.requests]
