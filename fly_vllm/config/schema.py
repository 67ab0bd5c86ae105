"""What a FLy config holds: the ``"fly"`` block's settings, their defaults
and allowed values (``FlyConfig``), and the error every check raises.

Imports neither torch nor vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The rules' own names (a leaf module the rules import too).
from fly_vllm.rule_names import FSD_DIVERGENCES, FSD_VARIANTS, GATES, RULES, WINDOW_CONVENTIONS

FLY_METHOD = "fly"
ADDITIONAL_CONFIG_KEY = "fly"
MAX_ENTROPY_TOP_K = 8
DEFAULT_WINDOW = 6
# The largest value each divergence takes (KL is unbounded).
FSD_MAX_THRESHOLD = {"js": math.log(2), "tv": 1.0}
DEFAULT_FSD_THRESHOLD = 0.4  # the authors' example, with "js"
# Flex decoding's default: no drafts above this batch size. Measured on the
# 2-core CPU machine with the Qwen2.5-Coder pair (benchmarks/results/flex/):
# FLy against no speculation was 1.92x at 1, 1.10x at 2, 0.98x-1.30x at 4
# (three runs) and 0.77x at 16 requests at once.
DEFAULT_FLEX_MAX_BATCH = 4
# Drafters that propose tokens without a distribution: FSD cannot use them.
NO_DISTRIBUTION_DRAFTERS = ("ngram", "ngram_gpu", "suffix", "medusa", "custom_class")
# llama.cpp's FLy port: a mismatch is a candidate iff log p(top1) - log p(d)
# is below 0.3 nats (ggml-org/llama.cpp discussion 24804).
DEFAULT_MARGIN = 0.3
_FLY_ONLY = ("entropy_threshold", "window", "entropy_top_k", "window_convention", "gate",
             "margin", "judge_path", "judge_threshold")
# Keys of one gate only: the entropy test's, and the margin test's.
_ENTROPY_ONLY = ("entropy_threshold", "entropy_top_k")
_MARGIN_ONLY = ("margin",)
_JUDGE_ONLY = ("judge_path", "judge_threshold")
# The keys each gate does not read (a key of another gate is an error).
GATE_UNUSED = {"entropy": _MARGIN_ONLY + _JUDGE_ONLY, "margin": _ENTROPY_ONLY + _JUDGE_ONLY,
               "both": _JUDGE_ONLY, "judge": _ENTROPY_ONLY + _MARGIN_ONLY}
_FSD_ONLY = ("fsd_divergence", "fsd_threshold", "fsd_variant")


class FlyConfigError(ValueError):
    """An invalid FLy speculative config. The message names the key and the
    allowed values; it is meant to be shown to the user as it is."""


@dataclass(frozen=True)
class FlyConfig:
    """FLy's own settings (the ``"fly"`` block of a speculative config).

    Attributes:
        entropy_threshold: Top-k entropy, in nats, at or above which a
            mismatch is *uncertain* and may be loosely accepted. Default 0.3
            (the paper's). 0 makes every mismatch uncertain. Gates
            ``"entropy"`` and ``"both"`` only.
        gate: which test a mismatch must pass to be a loose candidate:
            ``"entropy"`` (default, the paper's: top-k entropy >=
            ``entropy_threshold``), ``"margin"`` (llama.cpp's port:
            log p(argmax) - log p(draft) <= ``margin``, the target's own
            preference for its choice, in nats, on the distribution
            verification uses) or ``"both"``. The window and every guard
            apply whatever the gate.
        margin: the margin gate's bound in nats (>= 0). Default 0.3 (the
            llama.cpp port's). Gates ``"margin"`` and ``"both"`` only.
        judge_path: the judge's head file (gate ``"judge"`` only, required
            there). Checked when the config is read: it must load, and it
            must be for this pair (target, drafter, hidden size, vocabulary).
        judge_threshold: a mismatch is a candidate iff the head's
            p(important) < this, in [0, 1] (higher accepts more). Default:
            the head's own, chosen at training for 90% recall of important
            mismatches.
        strict_prefix_tokens: N. A request's first N generated tokens are
            verified exactly; the loose rule (FLy's or FSD's) applies after
            them. Default 0. An answer picks its path in its first tokens.
        window: W. An uncertain mismatch at draft position i is accepted only
            if the draft positions after it all match natively. Default
            ``min(6, K - 1)``, as in vLLM 0.33's native FLy.
        entropy_top_k: k of the top-k entropy (1..8). Default 3.
        strict: True turns loose acceptance off: exact (lossless)
            speculative decoding through the same code path.
        window_convention: ``"vllm"`` (default): the W positions *after* the
            candidate must match, i + 1 .. i + W, as vLLM's native FLy does.
            ``"paper"``: the authors' code, which counts the candidate as the
            window's first position and checks i + 1 .. i + W - 1. Both allow a
            rescue only where i + W < the request's number of drafts.
        drafter: The vLLM speculative method that proposes the drafts
            (``"draft_model"``, ``"ngram"``, ``"eagle"``, ...). Default: inferred
            from the other keys, as vLLM infers it.
        guard_digits: Never loosely accept a draft whose digits differ from
            the target's choice (numbers are where a "synonym" is an error).
        guard_structured: Never loosely accept inside structured (guided)
            output: such requests are verified exactly.
        guard_eos_stop: Never loosely accept the end-of-sequence token, a
            request's stop token, or a token carrying (part of) a stop string.
        All guards are off by default, so a config means what vLLM's native
        FLy means; each is counted when it vetoes.
        rule: ``"fly"`` (default: the entropy gate and deferred window) or
            ``"fsd"`` (FSD's divergence acceptance; needs a drafter with a
            distribution, such as a draft model).
        fsd_divergence: D of FSD: ``"js"`` (default; Jensen-Shannon, natural
            log), ``"kl_draft_target"``, ``"kl_target_draft"`` or ``"tv"``.
        fsd_threshold: T of FSD: a draft is accepted iff D <= T. Default 0.4
            (the authors' example with ``"js"``; required for the others).
        fsd_variant: ``"resample"`` (default, the authors' code: the test
            alone decides; the correction comes from the target's p) or
            ``"fallback"`` (where D > T, vLLM's exact p/q test decides).
        multilevel: FLy's multi-level acceleration of a draft-model drafter:
            an n-gram lookup over the context proposes tokens, the drafter
            checks them in one forward pass and keeps the prefix it agrees
            with. The drafts are the greedy drafter's own, in fewer drafter
            passes. Default off. Needs a draft model and greedy drafting.
        multilevel_ngram_max, multilevel_ngram_min: the n-gram sizes tried,
            longest first (default 4 down to 1, the authors').
        multilevel_ngram_tokens: how many tokens one lookup proposes (default
            6, the authors').
        flex: FlexDraft's training-free flex decoding. Default off. On, it
            (1) truncates each request's drafts where the running product of
            the drafter's top probabilities falls below ``flex_confidence``,
            keeping at least ``flex_min_drafts``; and (2) schedules K by batch
            size (``flex_batch_schedule``) through vLLM's
            ``num_speculative_tokens_per_batch_size``.
        flex_confidence: the running-product threshold (default 0.01,
            FlexDraft's); 0 keeps every draft.
        flex_min_drafts: drafts kept whatever the confidence (default 1).
            A truncated request is verified like any request with fewer
            drafts: FLy can rescue position i only if i + W < its number of
            drafts, so truncation also narrows where loose accepts can happen.
        flex_max_batch: the batch size above which nothing is drafted, for
            the default schedule (default ``DEFAULT_FLEX_MAX_BATCH``,
            measured on the CPU machine: benchmarks/results/flex/).
        flex_batch_schedule: ``"auto"`` (default): K up to
            ``flex_max_batch``, then no speculation; or vLLM's own list of
            ``[first, last, K]`` batch-size ranges; or ``null`` for fixed K.
        flex_idle_drafter: ``"skip"`` (default): in steps the schedule gives
            K = 0 the draft model does not run, and a request's skipped
            positions are fed to it in one catch-up pass when drafting
            resumes; ``"run"``: vLLM's behaviour, the drafter keeps its KV
            current by running every step.
    """

    entropy_threshold: float = 0.3
    gate: str = "entropy"
    margin: float = DEFAULT_MARGIN
    judge_path: str | None = None
    judge_threshold: float | None = None
    strict_prefix_tokens: int = 0
    window: int = DEFAULT_WINDOW
    entropy_top_k: int = 3
    strict: bool = False
    window_convention: str = "vllm"
    drafter: str | None = None
    guard_digits: bool = False
    guard_structured: bool = False
    guard_eos_stop: bool = False
    rule: str = "fly"
    fsd_divergence: str = "js"
    fsd_threshold: float = DEFAULT_FSD_THRESHOLD
    fsd_variant: str = "resample"
    multilevel: bool = False
    multilevel_ngram_max: int = 4
    multilevel_ngram_min: int = 1
    multilevel_ngram_tokens: int = 6
    flex: bool = False
    flex_confidence: float = 0.01
    flex_min_drafts: int = 1
    flex_max_batch: int = 0  # 0 = DEFAULT_FLEX_MAX_BATCH, filled in by parse
    flex_batch_schedule: Any = "auto"
    flex_idle_drafter: str = "skip"

    @property
    def window_span(self) -> int:
        """How many positions after a candidate must match natively."""
        return self.window if self.window_convention == "vllm" else self.window - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rule_settings(self) -> dict[str, Any]:
        """The settings that apply under this config's rule: ``to_dict``
        without the other rule's keys (an FSD config has no entropy gate)."""
        other = _FSD_ONLY if self.rule == "fly" else _FLY_ONLY
        if self.rule == "fly":
            other += GATE_UNUSED[self.gate]
        return {k: v for k, v in self.to_dict().items() if k not in other}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlyConfig:
        return cls(**d)


_FLY_KEYS = {f.name for f in dataclasses.fields(FlyConfig)}
