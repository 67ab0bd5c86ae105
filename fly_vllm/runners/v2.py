"""The adapter for vLLM's model runner V2 (``vllm/v1/worker/gpu/``).

V2's ``RejectionSampler`` verifies a flat batch: request b owns the logits
rows ``cu_num_logits[b] .. cu_num_logits[b + 1] - 1``, one per draft and
then its bonus row (n_b + 1 rows), and the draft verified at row r is the
input token of row r + 1. It returns ``sampled`` [B, K + 1] and
``num_sampled`` [B] (accepted drafts + 1). Randomness is vLLM's own:
``u = tl_rand32(seed, pos)`` for the ratio test and Gumbel draws keyed by
(seed, pos) for corrections and bonus tokens; there are no torch generators.

A step, inside ``RejectionSampler._verify`` (per chunk of requests):

1. vLLM verifies exactly, unchanged: processed logits, its rows and counts.
2. The draft rows are gathered into a :class:`~fly_vllm.core.Step` (the
   rules' layout), with the same u vLLM draws (``fly_vllm.kernels.
   v2_uniform``) and the draft distribution V2 caches (``draft_logits``
   [max_num_reqs, K, V], before temperature; present only with
   ``draft_sample_method: "probabilistic"``). Rule fsd reads the greedy
   drafter's logits that plugin patch 14 keeps, in the same layout.
3. The verification core applies each request's rule.
4. A row the core decides as vLLM did keeps vLLM's tokens, and a strict
   request always does, so strict verification is vLLM's token for token
   (a step whose every request is strict skips 2 and 3: vLLM's rows,
   counted).
   Any other row (a loose accept, or FSD's correction from p) takes the
   core's drafts up to its accepted length L, then the token vLLM itself
   would emit at row L: vLLM's ``rejection_sample`` run on a one-draft
   batch made of each request's row L (the same logits row, draft
   distribution, seed and position), so the same draw as vLLM's; at
   L = n_b that is the bonus token.

Imported only inside vLLM worker processes that run V2 (see plugin.py).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.spec_decode import rejection_sampler as v2_module
from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler

from fly_vllm.core import Step, VerificationCore, Verified
from fly_vllm.kernels.v2_uniform import v2_uniforms
from fly_vllm.verifier import token_layout


def refused_settings(sampler: RejectionSampler) -> list[str]:
    """V2 verification settings FLy cannot extend (each changes what
    "exact" means, or hides the layout): refused when the sampler is built;
    the config checks refuse them earlier (plugin patch 3)."""
    out = []
    if sampler.synthetic_conditional_rates is not None:
        out.append("rejection_sample_method 'synthetic'")
    if sampler.use_block_verification:
        out.append("rejection_sample_method 'block'")
    if sampler.enable_adaptive_verification:
        out.append("enable_adaptive_verification")
    if sampler.watermark_key is not None:
        out.append("watermarking")
    return out


class FlyV2RejectionSampler(RejectionSampler):
    """vLLM V2's RejectionSampler, with FLy's rules on top (module doc)."""

    def __init__(self, sampler, spec_config, device, core: VerificationCore, warmup,
                 runner=None, *, watermark_key: int | None = None):
        super().__init__(sampler, spec_config, device, watermark_key=watermark_key)
        refused = refused_settings(self)
        if refused:
            raise ValueError(f"fly-vllm cannot verify on model runner V2 with "
                             f"{', '.join(refused)}")
        self.core = core
        self._warmup = warmup
        self._runner = weakref.ref(runner) if runner is not None else (lambda: None)
        # Request state index -> (req_id, SamplingParams); V2 keeps no
        # sampling params per request, so plugin patch 11 hands them over.
        self.requests: dict[int, tuple[str, Any]] = {}
        # This step's hidden states [num_tokens, H] (plugin patch 12), for the
        # judge and the recorder; and the InputBatch of the call in progress.
        self.hidden: torch.Tensor | None = None
        # Rule fsd: the greedy drafter's logits [max_num_reqs, K, V] (patch 14).
        self.fsd_draft_logits: torch.Tensor | None = None
        self._batch = None

    @property
    def wants_hidden(self) -> bool:
        return self.core.wants_hidden

    def register(self, state: int, req_id: str, params: Any) -> None:
        self.requests[state] = (req_id, params)

    def __call__(self, logits, input_batch, draft_logits=None, invalid_drafts=None):
        self._batch = input_batch
        try:
            return super().__call__(logits, input_batch, draft_logits, invalid_drafts)
        finally:
            self._batch = None

    # ------------------------------------------------------------------

    def _verify(self, logits, draft_logits, draft_sampled, pos, cu_num_logits, idx_mapping,
                idx_mapping_np, expanded_idx_mapping, expanded_local_pos,
                seq_lens_upper_bound_np, verify_draft_sampled):
        processed, sampled, num_sampled = super()._verify(
            logits, draft_logits, draft_sampled, pos, cu_num_logits, idx_mapping,
            idx_mapping_np, expanded_idx_mapping, expanded_local_pos,
            seq_lens_upper_bound_np, verify_draft_sampled)
        cu_np, first_row = self._host_layout(idx_mapping_np, cu_num_logits)
        n_np = np.maximum(np.diff(cu_np) - 1, 0)
        if int(n_np.sum()) == 0:
            return processed, sampled, num_sampled
        requests = [self.requests.get(int(s)) for s in idx_mapping_np]
        if self.core.exact_only(requests):  # every request strict: vLLM's rows
            self.core.count_exact(num_sampled.long() - 1, n_np.tolist(), requests,
                                  self._warmup.get())
            return processed, sampled, num_sampled
        step, strict = self._step(processed, draft_logits, verify_draft_sampled, pos,
                                  cu_num_logits, idx_mapping, idx_mapping_np, n_np,
                                  first_row, requests)
        verified = self.core.verify(step)
        if not strict.all():
            sampled, num_sampled = self._emit(
                verified, strict, sampled, num_sampled, processed, draft_logits,
                verify_draft_sampled, pos, cu_num_logits, idx_mapping)
        return processed, sampled, num_sampled

    def _host_layout(self, idx_mapping_np: np.ndarray, cu_num_logits: torch.Tensor
                     ) -> tuple[np.ndarray, int]:
        """This chunk's cu_num_logits on the host, from the batch's own copy
        (no device sync), and the batch row of its first logits row."""
        batch = self._batch
        if batch is None:  # called outside __call__ (tests): read the device copy
            return cu_num_logits.cpu().numpy(), 0
        full = batch.cu_num_logits_np
        start = 0
        if len(idx_mapping_np) != batch.num_reqs:  # one chunk of several
            start = int(np.flatnonzero(batch.idx_mapping_np == idx_mapping_np[0])[0])
        cu = full[start:start + len(idx_mapping_np) + 1]
        return cu - cu[0], int(cu[0])

    def _step(self, processed, draft_logits, verify_draft_sampled, pos, cu_num_logits,
              idx_mapping, idx_mapping_np, n_np, first_row, requests
              ) -> tuple[Step, np.ndarray]:
        """The rules' layout of this chunk, and which requests are strict [B]."""
        device = processed.device
        states = self.sampler.sampling_states
        n = torch.from_numpy(n_np).to(device)
        cu_draft = n.cumsum(0).to(torch.int32)  # [B]
        T = int(n_np.sum())
        req, local, _ = token_layout(cu_draft, T)
        rows = cu_num_logits[:-1].long()[req] + local  # [T] each draft's logits row
        state = idx_mapping.long()[req]  # [T]
        settings = self.core.settings.batch(requests)
        strict = np.array([np.isinf(st.threshold) for st in settings])
        target = processed[rows]  # [T, V]
        step = Step(
            draft_token_ids=verify_draft_sampled[rows + 1],
            num_draft_tokens=n_np.tolist(),
            cu_num_draft_tokens=cu_draft,
            target_logits=target,
            # The token after the last draft, and every correction, is drawn
            # in _emit with vLLM's sampler: the core's are placeholders.
            bonus_token_ids=torch.full((len(n_np), 1), -1, dtype=torch.int64,
                                       device=device),
            max_spec_len=self.num_speculative_steps,
            requests=requests,
            num_generated=lambda: self._num_generated(pos, cu_num_logits, idx_mapping_np),
            warmup=self._warmup.get(),
        )
        batch = self._batch
        if self.hidden is not None and batch is not None:
            step.hidden = self.hidden
            step.hidden_rows = batch.logits_indices[first_row + rows]
        temp_np = states.temperature.np[idx_mapping_np]
        fsd = self.core.fly.rule == "fsd"
        q_logits = None
        if draft_logits is not None and (temp_np != 0).any():
            q_logits = draft_logits[state, local].float()  # [T, V], before temperature
        if fsd and self.fsd_draft_logits is not None:
            # FSD's divergence reads the greedy drafter at temperature 1, as on V1.
            step.fsd_draft_probs = self.fsd_draft_logits[state, local].float().softmax(-1)
        if (temp_np != 0).any():
            temp = states.temperature.gpu[state]  # [T]
            step.is_greedy = torch.from_numpy(temp_np == 0).to(device)
            step.target_probs = target.softmax(dim=-1, dtype=torch.float32)
            step.uniform_probs = v2_uniforms(states.seeds.gpu, state, pos[rows])
            step.recovered_token_ids = torch.zeros(T, dtype=torch.int64, device=device)
            if q_logits is not None:
                # The proposal the drafts were sampled from: q at the
                # request's temperature (greedy rows never read it). Rule fsd
                # drafts greedily: its q(d) is one-hot, as vLLM sees it.
                scale = torch.where(temp > 0, temp, torch.ones_like(temp)).unsqueeze(-1)
                step.draft_probs = (q_logits / scale).softmax(dim=-1)
        return step, strict

    def _num_generated(self, pos, cu_num_logits, idx_mapping_np) -> torch.Tensor:
        """[B] output tokens each request had before this step: its first
        row is the position of its last sampled token."""
        prompt = self.sampler.req_states.prompt_len.np[idx_mapping_np].astype(np.int64)
        first = pos[cu_num_logits[:-1].long()].long()
        return first - torch.from_numpy(prompt).to(first.device) + 1

    def _emit(self, verified: Verified, strict: np.ndarray, sampled, num_sampled,
              processed, draft_logits, verify_draft_sampled, pos, cu_num_logits,
              idx_mapping):
        """vLLM's rows where the core agrees with vLLM (and for strict
        requests); elsewhere the core's drafts and vLLM's own token at L."""
        out = verified.out
        device = sampled.device
        accepted = out.num_accepted.long()  # [B] L
        redo = accepted != num_sampled.long() - 1
        if verified.from_p is not None:
            redo = redo | verified.from_p
        redo = redo & ~torch.from_numpy(strict).to(device)
        token = self._tokens_at(accepted, verified.from_p, processed, draft_logits,
                                verify_draft_sampled, pos, cu_num_logits, idx_mapping)
        rows = out.output_token_ids.to(sampled.dtype)
        rows.scatter_(1, accepted.unsqueeze(1), token.to(sampled.dtype).unsqueeze(1))
        sampled = torch.where(redo.unsqueeze(1), rows, sampled)
        num_sampled = torch.where(redo, (accepted + 1).to(num_sampled.dtype), num_sampled)
        return sampled, num_sampled

    def _tokens_at(self, accepted, from_p, processed, draft_logits, verify_draft_sampled,
                   pos, cu_num_logits, idx_mapping) -> torch.Tensor:
        """[B]: the token vLLM emits at row L of each request, rejecting the
        draft there (from vLLM's residual, or from p where ``from_p``; the
        argmax for greedy requests) or, at L = n_b, its bonus token. Drawn by
        vLLM's rejection_sample on a batch of one draft per request: rows
        (L, L) of its logits, the draft at L (-1 where the correction comes
        from p or L is the bonus row), the same position, seed, temperature
        and draft distribution."""
        device = processed.device
        B = accepted.shape[0]
        starts = cu_num_logits[:-1].long()
        n = cu_num_logits[1:].long() - starts - 1
        row = starts + accepted  # [B]
        after = (row + 1).clamp(max=verify_draft_sampled.shape[0] - 1)
        no_draft = accepted >= n
        if from_p is not None:
            no_draft = no_draft | from_p
        draft = torch.where(no_draft, torch.full_like(row, -1),
                            verify_draft_sampled[after].long())
        drafts = torch.stack([torch.zeros_like(draft), draft], 1).reshape(-1)
        two = lambda x: x.repeat_interleave(2)  # noqa: E731
        reqs = torch.arange(B, device=device)
        states = self.sampler.sampling_states
        q = None
        if draft_logits is not None:
            step = accepted.clamp(max=draft_logits.shape[1] - 1)
            q = draft_logits[idx_mapping.long(), step].unsqueeze(1).contiguous()
        sampled, _ = v2_module.rejection_sample(
            processed[two(row)],
            q,
            drafts.to(verify_draft_sampled.dtype),
            torch.arange(0, 2 * B + 1, 2, dtype=cu_num_logits.dtype, device=device),
            two(pos[row]),
            reqs.to(idx_mapping.dtype),
            two(reqs).to(idx_mapping.dtype),
            torch.arange(2, device=device).repeat(B),
            states.temperature.gpu[idx_mapping.long()].contiguous(),
            states.seeds.gpu[idx_mapping.long()].contiguous(),
            1,
            None,
            use_fp64=self.sampler.use_fp64_gumbel,
        )
        return sampled[:, 0]

    def flush(self) -> None:
        self.core.flush()
