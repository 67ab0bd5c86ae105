"""The quality guards: drafts that may never be accepted loosely.

Each guard on in the config gives a [T] bool mask (True: veto a loose
accept of this draft); the rules take their union as ``veto``:

- ``digits``: the draft's digits differ from the target's choice's;
- ``structured``: the request has structured output (grammar, JSON schema);
- ``eos_stop``: the draft is EOS, one of the request's stop tokens, or a
  token that carries (part of) one of its stop strings.
"""

from __future__ import annotations

from typing import Any

import torch

from fly_vllm.config import FlyConfig
from fly_vllm.core.settings import RequestSettings


class TokenTables:
    """Per token id: a digit key, and its text (for stop strings), built
    from the target's tokenizer on first use."""

    def __init__(self, model_config: Any):
        self._model_config = model_config
        self._tables = None

    def get(self) -> tuple[torch.Tensor, list[str], int | None]:
        if self._tables is None:
            from transformers import AutoTokenizer

            mc = self._model_config
            tok = AutoTokenizer.from_pretrained(
                mc.tokenizer, trust_remote_code=mc.trust_remote_code)
            vocab = mc.get_vocab_size()
            texts = tok.batch_decode([[i] for i in range(min(vocab, len(tok)))])
            texts += [""] * (vocab - len(texts))
            keys = [hash("".join(c for c in t if c.isdigit())) & ((1 << 62) - 1)
                    if any(c.isdigit() for c in t) else 0 for t in texts]
            self._tables = (torch.tensor(keys, dtype=torch.int64), texts, tok.eos_token_id)
        return self._tables


def any_guard(fly: FlyConfig) -> bool:
    return fly.guard_digits or fly.guard_structured or fly.guard_eos_stop


def guard_masks(
    fly: FlyConfig,
    tables: TokenTables | None,
    settings: list[RequestSettings],  # [B]
    num_draft_tokens: list[int],  # [B]
    draft_token_ids: torch.Tensor,  # [T]
    target_logits: torch.Tensor,  # [T, V]
) -> dict[str, torch.Tensor]:
    """Per guard that is on, its [T] bool veto mask."""
    if not any_guard(fly):
        return {}
    device = target_logits.device
    T = draft_token_ids.shape[0]
    req_of = [b for b, k in enumerate(num_draft_tokens) for _ in range(k)]
    masks = {}
    if fly.guard_structured:
        masks["structured"] = torch.tensor(
            [settings[b].structured for b in req_of], dtype=torch.bool, device=device)
    if fly.guard_digits or fly.guard_eos_stop:
        keys, texts, eos = tables.get()
        drafts = draft_token_ids.long().cpu().clamp(0, len(texts) - 1)
    if fly.guard_digits:
        target = target_logits.argmax(-1).cpu()
        masks["digits"] = (keys[drafts] != keys[target]).to(device)
    if fly.guard_eos_stop:
        flags = []
        for i, b in enumerate(req_of):
            d = int(drafts[i])
            st = settings[b]
            text = texts[d]
            piece = text.strip()
            flags.append(d == eos or d in st.stop_ids or any(
                s and (s in text or (piece and piece in s)) for s in st.stop_strs))
        masks["eos_stop"] = torch.tensor(flags, dtype=torch.bool, device=device)
    assert all(m.shape[0] == T for m in masks.values())
    return masks
