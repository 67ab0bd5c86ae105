"""The learned judge's score: z = w' . x + b' per verified draft, where x is
features.assemble(...) [D] and w', b' the head's weights with its scaler
folded in (head.py). The gate (gate.py) turns z into a decision.

The score's path, chosen as the verifier's is (verify_path.py): on CUDA and
ROCm devices the hidden-state part of ``w' . x`` is one Triton pass per draft
(kernels/judge_score.py: no [T, D] copy), the few scalar features stay in
torch; elsewhere, or with ``FLY_VLLM_VERIFIER=torch``, all of it is torch.
The first step with drafts runs both and compares them; where the kernel
fails to load, compile or launch, or disagrees, ONE warning says so and the
torch path scores from then on (``path`` says which runs), and the fallback
counts in ``vllm:fly_verifier_fallbacks_total`` as the verifier's does.
With tensor parallelism the check's outcome is agreed over the ranks, and a
later failure stops the engine, as for the verifier (verify_path rule 5).
"""

from __future__ import annotations

import logging
import os

import torch

from fly_vllm import parallel
from fly_vllm.judge.features import HIDDEN, assemble, components
from fly_vllm.judge.head import JudgeHead

logger = logging.getLogger("vllm.fly_vllm")  # under vLLM's handler
# The first step's check: z is a sum of D terms that the two paths add in
# another order, so they must agree within Z_RTOL of sum(|w'_i x_i|) + |b'|
# (fp32 order: ~1e-7; TF32 matmuls: ~1e-5), where a wrong row or weight
# slice moves z by ~1/sqrt(D) of that.
Z_RTOL = 1e-4


def score_path(device: torch.device | str) -> str:
    """"triton" on CUDA and ROCm devices (torch's "cuda" type), unless
    ``FLY_VLLM_VERIFIER=torch`` forces torch as it does for the verifier;
    else "torch"."""
    from fly_vllm.verify_path import ENV

    if torch.device(device).type != "cuda" or os.environ.get(ENV, "").strip() == "torch":
        return "torch"
    return "triton"


class JudgeScore:
    """A head's score z = w' . x + b' per draft, on one device and path."""

    def __init__(self, head: JudgeHead, device: torch.device | str = "cpu"):
        self.spec = head.features
        self.weight, self.bias = head.folded(device)
        self._bias = float(self.bias)  # a host copy for the kernel: no sync per step
        # The folded weight per component (spec order), each its own
        # allocation so the kernel reads aligned rows; the scalars' together.
        sizes = [head.pair["hidden_size"] if n in HIDDEN else 1 for n in self.spec]
        parts = dict(zip(self.spec, (w.clone() for w in self.weight.split(sizes))))
        self._w_post, self._w_pre = parts.get("h_post"), parts.get("h_pre")
        self._scalars = tuple(n for n in self.spec if n not in HIDDEN)
        self._w_scalars = torch.cat([parts[n] for n in self._scalars]) if self._scalars else None
        # Triton where the spec reads a hidden state and the device runs it.
        hidden = self._w_post is not None or self._w_pre is not None
        self.path = score_path(device) if hidden else "torch"
        self._checked = False
        self.failure: str | None = None  # why the kernel was dropped

    def _features(self, hidden, rows, target_logits, draft_token_ids) -> torch.Tensor:
        parts = components(hidden, rows, target_logits, draft_token_ids, names=self.spec)
        return assemble(parts, self.spec)  # [T, D]

    def _logit_torch(self, *args) -> torch.Tensor:
        x = self._features(*args)
        return x @ self.weight.to(x.device) + self.bias.to(x.device)

    def _logit_triton(self, hidden, rows, target_logits, draft_token_ids) -> torch.Tensor:
        from fly_vllm.kernels.judge_score import judge_score_triton

        s = None
        if self._scalars:
            parts = components(hidden, rows, target_logits, draft_token_ids,
                               names=self._scalars)
            s = assemble(parts, self._scalars) @ self._w_scalars.to(hidden.device)
        return judge_score_triton(hidden, rows, self._w_post, self._w_pre, self._bias, s)

    def _fall_back(self, why: str) -> None:
        from fly_vllm.verify_path import device_text

        from fly_vllm import metrics

        self.path, self.failure = "torch", why
        metrics.worker_store().add("verifier_fallbacks", 1)
        logger.warning("fly-vllm: the judge's Triton score failed on %s: %s; scoring with "
                       "the torch path from now on (same results, slower)",
                       device_text(self.weight.device), why)

    def logit(
        self,
        hidden: torch.Tensor,  # [R, H] sample_hidden_states
        rows: torch.Tensor,  # [T] target_logits_indices
        target_logits: torch.Tensor,  # [T, V]
        draft_token_ids: torch.Tensor,  # [T]
    ) -> torch.Tensor:
        """z = w' . x + b' per draft, [T] float32 (on ``self.path``)."""
        args = (hidden, rows, target_logits, draft_token_ids)
        if self.path != "triton":
            return self._logit_torch(*args)
        from fly_vllm.verify_path import _pre_launch_errors, error_text

        if self._checked:
            try:
                return self._logit_triton(*args)
            except _pre_launch_errors() as e:  # as the verifier: nothing else is caught
                if parallel.tp_group() is not None:  # not on this rank alone
                    raise RuntimeError(
                        f"fly-vllm: the judge's Triton score failed at a later step "
                        f"({error_text(e)}); with tensor parallelism one rank cannot fall "
                        "back alone; set FLY_VLLM_VERIFIER=torch") from e
                self._fall_back(f"{error_text(e)} (at a later step)")
                return self._logit_torch(*args)
        x = self._features(*args)
        ref = x @ self.weight + self.bias
        if rows.shape[0] == 0:
            return ref
        try:  # the first step with drafts: the kernel against torch
            z = self._logit_triton(*args)
            scale = x.abs() @ self.weight.abs() + self.bias.abs()
            bad = not bool(((z - ref).abs() <= Z_RTOL * scale).all())
            why = "disagrees with the torch path" if bad else None
        except Exception as e:  # load, compile or launch
            why = f"could not run it: {error_text(e)}"
        self._checked = True
        # Every tensor-parallel rank scores the same step here and must take
        # the same path (fly_vllm.parallel).
        if parallel.any_rank(why is not None) and why is None:
            why = "another tensor-parallel rank's check failed"
        if why is not None:
            self._fall_back(why)
        return ref
