"""Running vLLM's draft model over ragged token lists, outside its own loop.

Shared by the multi-level drafter (multilevel.py: candidates checked in one
pass) and flex decoding's idle drafter (``DrafterSync``: while the batch
schedule gives K = 0 the drafter does not run at all, and a request's drafter
KV catches up in one pass when drafting resumes).

A pass feeds ``lens[b]`` tokens for request b at positions ``starts[b]``
onwards, writing the drafter's KV at those positions through the step's block
table (vLLM's draft model shares the target's). Every request of the batch
stays in the pass, so every per-request field of vLLM's metadata keeps its
meaning; a request with nothing to do feeds one token whose KV is not written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


def pass_metadata(cad: Any, lens: np.ndarray, starts: np.ndarray, block_size: int,
                   max_model_len: int, padding_slot: int, device: torch.device):
    """Attention metadata for one pass with ``lens[b]`` fed tokens per request
    at positions ``starts[b]`` onwards. Returns (cad, positions [N], slots [N]).

    Every request of the step stays in the pass (a request whose drafts are
    complete feeds one token whose KV is not written), so every per-request
    field of vLLM's metadata keeps its meaning."""
    batch = lens.shape[0]
    qsl = np.zeros(batch + 1, dtype=np.int32)
    np.cumsum(lens, out=qsl[1:])
    req = np.repeat(np.arange(batch), lens)
    positions = starts[req] + (np.arange(qsl[-1]) - qsl[:-1][req])
    seq_lens = np.minimum(starts + lens, max_model_len).astype(np.int32)
    pos_t = torch.from_numpy(positions).to(device)
    clamped = pos_t.clamp(max=max_model_len - 1)
    req_t = torch.from_numpy(req).to(device)
    bt = cad.block_table_tensor
    slots = bt[req_t, clamped // block_size].long() * block_size + clamped % block_size
    slots = slots.masked_fill(pos_t >= max_model_len, padding_slot)
    fields = {f.name for f in dataclasses.fields(cad)}
    new = {
        "query_start_loc": torch.from_numpy(qsl).to(device),
        "query_start_loc_cpu": torch.from_numpy(qsl),
        "seq_lens": torch.from_numpy(seq_lens).to(device),
        "num_actual_tokens": int(qsl[-1]),
        "max_query_len": int(lens.max()),
        "max_seq_len": int(seq_lens.max()),
        "slot_mapping": slots,
    }
    if "positions" in fields:
        new["positions"] = clamped
    if getattr(cad, "seq_lens_cpu_upper_bound", None) is not None:
        new["seq_lens_cpu_upper_bound"] = torch.from_numpy(seq_lens)
    for cache in ("_num_computed_tokens_cache", "_token_to_req_indices_cache"):
        if cache in fields:
            new[cache] = None
    return cad.replace(**new), clamped, slots


def forward(proposer: Any, mod: Any, cad: Any, feed: list[int], lens: np.ndarray,
            starts: np.ndarray, write: np.ndarray) -> torch.Tensor:
    """One drafter pass; returns its logits, [sum(lens), V].

    Args:
        proposer: vLLM's DraftModelProposer (buffers, model, metadata builders).
        mod: ``vllm.v1.spec_decode.llm_base_proposer`` (set_forward_context,
            CUDAGraphMode and PADDING_SLOT_ID as that vLLM version has them).
        cad: the step's CommonAttentionMetadata (block table, per-request fields).
        feed: the fed token ids, request after request.
        lens, starts: [B] tokens fed and the first one's position, per request.
        write: [B] bool, whether the request's KV is written.
    """
    device = proposer.input_ids.device
    new_cad, positions, slots = pass_metadata(
        cad, lens, starts, proposer.block_size, proposer.max_model_len,
        mod.PADDING_SLOT_ID, device)
    skip = torch.from_numpy(np.repeat(~np.asarray(write, dtype=bool), lens))
    slots = slots.masked_fill(skip.to(device), mod.PADDING_SLOT_ID)
    n = int(lens.sum())
    proposer.input_ids[:n] = torch.tensor(feed, dtype=proposer.input_ids.dtype,
                                          device=device)
    proposer.positions[:n] = positions
    _, per_layer = proposer.build_per_group_and_layer_attn_metadata(new_cad, draft_index=1)
    with mod.set_forward_context(
        per_layer, proposer.vllm_config, num_tokens=n,
        cudagraph_runtime_mode=mod.CUDAGraphMode.NONE,
        slot_mapping=proposer._get_slot_mapping(n, slots),
    ):
        out = proposer.model(input_ids=proposer.input_ids[:n],
                             positions=proposer.positions[:n], inputs_embeds=None)
    hidden = out[0] if proposer.model_returns_tuple() else out
    return proposer.model.compute_logits(hidden[:n])


def step_rows(args: dict, batch: int) -> tuple[list[int], list[int], list[int]]:
    """This step's target tokens per request, from ``propose``'s arguments:
    (query start offsets [B + 1], first position [B], valid tokens [B];
    rejected drafts are padding at the end of a request's query)."""
    qsl = args["common_attn_metadata"].query_start_loc_cpu.tolist()
    positions = args["target_positions"]
    pos = (positions[0] if positions.dim() > 1 else positions).tolist()
    rejected = args.get("num_rejected_tokens_gpu")
    rejected = [0] * batch if rejected is None else rejected.tolist()
    first = [pos[qsl[b]] if qsl[b + 1] > qsl[b] else 0 for b in range(batch)]
    valid = [qsl[b + 1] - qsl[b] - rejected[b] for b in range(batch)]
    return qsl, first, valid


class DrafterSync:
    """Where each request's drafter KV is valid up to, so that steps without
    drafts (K = 0) can skip the drafter and a later drafting step can catch
    up the skipped positions first.

    ``synced[req_id]`` is the first position whose drafter KV is missing. A
    request first seen in a drafting step at position s > 0 (a prefix-cache
    hit) is trusted to be synced up to s; one first seen in a skipped step is
    synced up to that step's first position.
    """

    def __init__(self) -> None:
        self.synced: dict[str, int] = {}

    def drafted(self, req_ids: list[str], args: dict) -> None:
        """After vLLM's drafter ran on this step: its first pass wrote the KV
        of every valid target token."""
        _, first, valid = step_rows(args, len(req_ids))
        for rid, f, v in zip(req_ids, first, valid):
            self.synced[rid] = f + v
        for gone in set(self.synced) - set(req_ids):
            del self.synced[gone]

    def skipped(self, req_ids: list[str], args: dict) -> None:
        """A step without the drafter: a request seen for the first time
        lacks the drafter's KV from this step's first position on."""
        _, first, _ = step_rows(args, len(req_ids))
        for rid, f in zip(req_ids, first):
            self.synced.setdefault(rid, f)

    def catch_up(self, proposer: Any, mod: Any, runner: Any, req_ids: list[str],
                 args: dict) -> int:
        """Before vLLM's drafter runs: feed each request's skipped positions
        (from the runner's token table) in as few passes as the drafter's
        buffers allow. Returns the number of tokens caught up."""
        batch = len(req_ids)
        _, first, _ = step_rows(args, batch)
        todo = np.array([max(0, f - self.synced.get(rid, f))
                         for rid, f in zip(req_ids, first)], dtype=np.int64)
        done = np.zeros(batch, dtype=np.int64)
        total = int(todo.sum())
        table = runner.input_batch.token_ids_cpu
        budget = max(1, proposer.input_ids.shape[0] // max(batch, 1))
        cad = args["common_attn_metadata"]
        while (done < todo).any():
            take = np.minimum(todo - done, budget)
            write = take > 0
            lens = np.where(write, take, 1)
            starts = np.empty(batch, dtype=np.int64)
            feed: list[int] = []
            for b, f in enumerate(first):
                start = f - todo[b] + done[b] if write[b] else max(f - 1, 0)
                starts[b] = start
                feed.extend(int(t) for t in table[b, start:start + lens[b]])
            forward(proposer, mod, cad, feed, lens, starts, write)
            done += take
        for rid, f in zip(req_ids, first):
            self.synced[rid] = max(self.synced.get(rid, f), f)
        return total
