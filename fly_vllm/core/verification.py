"""The runner-neutral verification core: one step, whatever runner feeds it.

``VerificationCore.verify(step)`` takes a :class:`~fly_vllm.core.step.Step`
(the rules' layout) and

1. reads each request's settings (server config + its own overrides),
2. builds the quality guards' and the learned judge's vetoes,
3. runs the rule, FLy (``fly_vllm.verifier``) or FSD (``fly_vllm.fsd``),
   through the checked verifier path (Triton on GPUs, torch elsewhere);
   a batch whose every request is strict takes vLLM's rule alone
   (``exact_verify``), which needs none of the gates' statistics,
4. records the step's counts and, with ``FLY_VLLM_JUDGE_RECORD``, its first
   mismatches for judge mining.

Runner adapters (fly_vllm/runners/) only translate their runner's inputs
into a Step and the result back into their runner's outputs.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np
import torch

from fly_vllm.config import FlyConfig
from fly_vllm.core.guards import TokenTables, any_guard, guard_masks
from fly_vllm.core.recording import StepCounts
from fly_vllm.core.settings import RequestParams, SettingsTable
from fly_vllm.core.step import Step
from fly_vllm.judge.gate import JudgeGate, judge_veto, load_gate
from fly_vllm.judge.record import Recorder
from fly_vllm.verifier import FlyVerifyOutput, exact_verify, token_layout
from fly_vllm.verify_path import CheckedVerifier, Workload, select

logger = logging.getLogger("vllm.fly_vllm")  # under vLLM's handler


class Verified(NamedTuple):
    out: FlyVerifyOutput
    # [B] bool: rows whose correction at the first rejection comes from the
    # target's p (FSD's resample variant) instead of vLLM's residual; None
    # when no row's does. Runner V1 draws it inside the step (Step.resample);
    # runner V2 draws it afterwards with vLLM's own sampler.
    from_p: torch.Tensor | None = None


def select_verifier(device: torch.device, rule: str = "fly",
                    workload: Workload | None = None) -> CheckedVerifier:
    """The verifier for ``rule`` ("fly" or "fsd"), or for ``workload``'s:
    Triton kernels on GPUs (CUDA and ROCm), checked against the torch
    reference before use, which runs instead where they fail and elsewhere
    (fly_vllm.verify_path)."""
    return select(device, workload or Workload(rule=rule))


class VerificationCore:
    """Settings, guards, judge, rule and recording for one engine worker."""

    def __init__(self, fly: FlyConfig, k: int, device: torch.device | str = "cpu", *,
                 model_config: Any = None, verifier=None, judge: JudgeGate | None = None,
                 recorder: Recorder | None = None):
        self.fly, self.k = fly, k
        self.device = torch.device(device)
        vocab = model_config.get_vocab_size() if model_config is not None else None
        self.verify_fn = verifier or select_verifier(
            self.device, workload=Workload.of(fly, k, vocab))
        self.judge = judge
        self.recorder = recorder
        self.settings = SettingsTable(fly, k, judge.head.threshold if judge else None)
        self.tables = TokenTables(model_config) if model_config is not None else None
        self.counts = StepCounts(fly.rule)
        # The judge and the recorder read the step's hidden states.
        self.wants_hidden = judge is not None or recorder is not None
        self._warned_shape = False
        self._exact_for: list | None = None  # exact_only's last batch, and its answer
        self._exact_answer = False
        # Whether a step whose every draft matches natively is verified and
        # counted by this core as exact verification would: FLy's rules act
        # only at mismatches (FSD reads the drafter's distribution, and the
        # recorder every step, so they take the rule's path).
        self.exact_when_all_match = fly.rule == "fly" and recorder is None

    @classmethod
    def for_model(cls, fly: FlyConfig, k: int, device, model_config) -> VerificationCore:
        """The core an engine worker runs: its judge head checked against
        the target, mining's recorder if ``FLY_VLLM_JUDGE_RECORD`` is set."""
        return cls(fly, k, device, model_config=model_config,
                   judge=load_gate(fly, model_config, device),
                   recorder=Recorder.from_env())

    def exact_only(self, requests: list) -> bool:
        """Whether this step needs nothing but exact verification: every
        request strict, and no recorder reading per-draft decisions. The
        runner then verifies as vLLM does, and the step is counted with
        ``count_exact``. The answer for the last ``requests`` object is kept:
        a runner that hands the same list again (an unchanged batch) gets
        it without the settings being read."""
        if requests is self._exact_for:
            return self._exact_answer
        self._exact_answer = self.recorder is None and all(
            math.isinf(st.threshold) for st in self.settings.batch(requests))
        self._exact_for = requests
        return self._exact_answer

    def count_exact(self, num_accepted: torch.Tensor | np.ndarray, num_draft_tokens: list[int],
                    requests: list, warmup: bool = False) -> None:
        """Count a step the runner verified exactly: [B] accepted drafts."""
        if not warmup:
            self.counts.record_exact(num_accepted, num_draft_tokens,
                                     [r[0] if r is not None else None for r in requests])

    def describe(self) -> str:
        return self.verify_fn.describe() if hasattr(self.verify_fn, "describe") else "torch"

    def flush(self) -> None:
        self.counts.flush()

    # ------------------------------------------------------------------

    def verify(self, step: Step) -> Verified:
        settings = self.settings.batch(step.requests)
        recording = self.recorder is not None and not step.warmup
        generated = (step.num_generated() if recording
                     or any(st.strict_prefix for st in settings) else None)
        masks: dict[str, torch.Tensor] = {}
        if all(math.isinf(st.threshold) for st in settings):
            # Every request strict: vLLM's rule alone, no gate statistics.
            verified = Verified(self._exact(step))
        else:
            params = self.settings.params(settings, step.target_logits.device, generated)
            if any_guard(self.fly):
                masks = guard_masks(self.fly, self.tables, settings, step.num_draft_tokens,
                                    step.draft_token_ids, step.target_logits)
            judged = judge_veto(self.judge, [st.judge for st in settings],
                                step.num_draft_tokens, step.hidden, step.hidden_rows,
                                step.target_logits, step.draft_token_ids)
            if judged is not None:
                masks["judge"] = judged
            veto = None
            for m in masks.values():
                veto = m if veto is None else veto | m
            if self.fly.rule == "fsd":
                verified = self._fsd(step, params, veto)
            else:
                verified = Verified(self._fly(step, params, veto))
        if not step.warmup:
            self.counts.record(verified.out, step.cu_num_draft_tokens, masks, step.req_ids)
        if recording:
            gen = generated.tolist() if torch.is_tensor(generated) else list(generated)
            self.recorder.record(step.req_ids, gen, verified.out.native,
                                 step.cu_num_draft_tokens, step.draft_token_ids,
                                 step.target_logits, step.hidden, step.hidden_rows)
        return verified

    @staticmethod
    def _exact(step: Step) -> FlyVerifyOutput:
        return exact_verify(
            step.draft_token_ids, step.cu_num_draft_tokens, step.target_logits,
            step.bonus_token_ids, step.max_spec_len, is_greedy=step.is_greedy,
            target_probs=step.target_probs, draft_probs=step.draft_probs,
            uniform_probs=step.uniform_probs, recovered_token_ids=step.recovered_token_ids)

    def _fly(self, step: Step, params: RequestParams, veto) -> FlyVerifyOutput:
        return self.verify_fn(
            step.draft_token_ids, step.cu_num_draft_tokens, step.target_logits,
            step.bonus_token_ids, step.max_spec_len,
            entropy_threshold=params.threshold, window=params.window,
            window_span=params.span, entropy_top_k=self.fly.entropy_top_k,
            is_greedy=step.is_greedy, target_probs=step.target_probs,
            draft_probs=step.draft_probs, uniform_probs=step.uniform_probs,
            recovered_token_ids=step.recovered_token_ids, veto=veto,
            margin=params.margin, loose_from=params.loose_from)

    def _fsd(self, step: Step, params: RequestParams, veto) -> Verified:
        """Rule ``fsd``: FSD's divergence test on the drafter's distribution.
        Without one (vLLM's warm-up, or a request whose cached draft
        probabilities vLLM could not find) the step is verified exactly,
        which is always safe."""
        fly = self.fly
        target_probs = step.target_probs
        if target_probs is None:
            target_probs = step.target_logits.softmax(dim=-1, dtype=torch.float32)
        q = step.fsd_draft_probs
        exact = torch.isinf(params.threshold)
        all_exact = q is None or q.shape != target_probs.shape
        if all_exact:
            if q is not None and not self._warned_shape:
                self._warned_shape = True
                logger.warning(
                    "fly-vllm: FSD got draft probabilities of shape %s for target "
                    "probabilities of shape %s; verifying exactly",
                    tuple(q.shape), tuple(target_probs.shape))
            q, exact = target_probs, torch.ones_like(exact)
        from_p = resampled = None
        if step.is_greedy is not None and fly.fsd_variant == "resample" and not all_exact:
            # The resampled correction replaces vLLM's only at a sampled row's
            # loose positions (past its strict prefix, in a non-exact row).
            # Other rows draw nothing, so an exact row's seeded generator, and
            # the global RNG when no row draws, move as under vLLM.
            batch = step.cu_num_draft_tokens.shape[0]
            _, _, n = token_layout(step.cu_num_draft_tokens, step.draft_token_ids.shape[0])
            past_prefix = n > 0 if params.loose_from is None else n > params.loose_from
            from_p = ~exact & ~step.is_greedy[:batch] & past_prefix
            if step.resample is not None:
                rows = from_p.tolist()  # one [B] sync
                if any(rows):
                    resampled = step.resample(rows)
        draft_token_probs = step.fsd_draft_token_probs
        if draft_token_probs is None:  # a greedy drafter: vLLM's test sees a one-hot q
            draft_token_probs = torch.ones(step.draft_token_ids.shape[0],
                                           device=target_probs.device)
        out = self.verify_fn(
            step.draft_token_ids, step.cu_num_draft_tokens, target_probs, q,
            step.bonus_token_ids, step.max_spec_len,
            threshold=params.threshold,  # exact rows ignore it
            kind=fly.fsd_divergence, variant=fly.fsd_variant, is_greedy=step.is_greedy,
            exact=exact, uniform_probs=step.uniform_probs,
            draft_token_probs=draft_token_probs,
            recovered_token_ids=step.recovered_token_ids, resampled_token_ids=resampled,
            veto=veto, loose_from=params.loose_from)
        return Verified(out, from_p)
