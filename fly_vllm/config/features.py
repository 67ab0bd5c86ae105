"""The optional parts of the ``"fly"`` block, each checked on its own: the
acceptance rule and FSD's keys, FLy's gate, the multi-level drafter, flex
decoding."""

from __future__ import annotations

import math
from typing import Any

from fly_vllm.config.checks import _check_fsd_threshold, _check_number, _switch
from fly_vllm.config.schema import (
    _ENTROPY_ONLY,
    _FLY_ONLY,
    _FSD_ONLY,
    _JUDGE_ONLY,
    _MARGIN_ONLY,
    DEFAULT_FLEX_MAX_BATCH,
    DEFAULT_FSD_THRESHOLD,
    FSD_DIVERGENCES,
    FSD_VARIANTS,
    GATE_UNUSED,
    GATES,
    NO_DISTRIBUTION_DRAFTERS,
    RULES,
    FlyConfig,
    FlyConfigError,
)

def _check_fsd(block: dict[str, Any], spec: dict[str, Any], drafter: str | None
               ) -> dict[str, Any]:
    """Validate the rule and FSD's keys; returns the FSD fields of FlyConfig."""
    rule = block.get("rule", "fly")
    if rule not in RULES:
        raise FlyConfigError(f"fly.rule must be one of {list(RULES)}; got {rule!r}")
    stray = [k for k in (_FSD_ONLY if rule == "fly" else _FLY_ONLY) if k in block]
    if stray:
        raise FlyConfigError(
            f"fly.{stray[0]} applies to rule {'fsd' if rule == 'fly' else 'fly'!r} "
            f"only, and this config uses rule {rule!r}; remove it, or set fly.rule")
    if rule == "fly":
        return {"rule": rule}
    if drafter in NO_DISTRIBUTION_DRAFTERS:
        raise FlyConfigError(
            f"fly.rule 'fsd' compares the target's distribution with the drafter's, "
            f"and the {drafter!r} drafter proposes tokens without one; use a draft "
            "model (\"model\": a draft checkpoint) or rule 'fly'")
    if spec.get("draft_sample_method", "greedy") != "greedy":
        raise FlyConfigError(
            "fly.rule 'fsd' drafts greedily, as the authors' code does; remove "
            f"draft_sample_method={spec['draft_sample_method']!r} (allowed: \"greedy\")")
    if spec.get("use_heterogeneous_vocab"):
        raise FlyConfigError(
            "fly.rule 'fsd' needs the drafter and the target to share one vocabulary; "
            "remove use_heterogeneous_vocab")
    kind = block.get("fsd_divergence", "js")
    if kind not in FSD_DIVERGENCES:
        raise FlyConfigError(
            f"fly.fsd_divergence must be one of {list(FSD_DIVERGENCES)}; got {kind!r}")
    variant = block.get("fsd_variant", "resample")
    if variant not in FSD_VARIANTS:
        raise FlyConfigError(
            f"fly.fsd_variant must be one of {list(FSD_VARIANTS)}; got {variant!r}")
    if "fsd_threshold" not in block and kind != "js":
        raise FlyConfigError(
            f"fly.fsd_threshold is required with fsd_divergence {kind!r}: the default "
            f"{DEFAULT_FSD_THRESHOLD} is the authors' value for 'js', and thresholds "
            "mean different things for each divergence")
    thr = _check_fsd_threshold(block.get("fsd_threshold", DEFAULT_FSD_THRESHOLD), kind,
                               "fly.")
    return {"rule": rule, "fsd_divergence": kind, "fsd_threshold": thr,
            "fsd_variant": variant}


def flex_schedule(k: int, max_batch: int) -> list[list[int]]:
    """The default batch-size schedule (``flex_batch_schedule: "auto"``) as
    vLLM's ``[first, last, K]`` ranges: K up to max_batch, then 0 (no drafts).

    A middle step with a smaller K was measured and dropped: at 2 requests at
    once, K = 2 lost to K = 4 (0.98x against 1.10x no speculation), since it
    halves the accepted length and, with K <= W, leaves FLy no loose accept."""
    return [[1, max_batch, k], [max_batch + 1, 1 << 30, 0]]


def _check_flex(block: dict[str, Any], spec: dict[str, Any], k: int,
                drafter: str | None) -> dict[str, Any]:
    """Validate flex decoding's keys; returns its FlyConfig fields. With the
    batch schedule on, writes vLLM's ``num_speculative_tokens_per_batch_size``
    into ``spec``."""
    keys = ("flex_confidence", "flex_min_drafts", "flex_max_batch", "flex_batch_schedule",
            "flex_idle_drafter")
    if not _switch(block, "flex", keys, "flex decoding"):
        return {"flex": False}
    conf = block.get("flex_confidence", FlyConfig.flex_confidence)
    _check_number("flex_confidence", conf, kind=float, lo=0, hi=1)
    if conf > 0:
        if drafter in NO_DISTRIBUTION_DRAFTERS:
            raise FlyConfigError(
                f"fly.flex_confidence truncates drafts by the drafter's confidence, and "
                f"the {drafter!r} drafter has none; set fly.flex_confidence to 0 (the "
                "batch schedule still applies) or use a draft model")
        if spec.get("draft_sample_method", "greedy") != "greedy" or spec.get(
                "use_heterogeneous_vocab"):
            raise FlyConfigError(
                "fly.flex_confidence reads a greedy drafter's own logits; remove "
                "draft_sample_method / use_heterogeneous_vocab, or set "
                "fly.flex_confidence to 0")
    low = block.get("flex_min_drafts", FlyConfig.flex_min_drafts)
    _check_number("flex_min_drafts", low, kind=int, lo=1, hi=k)
    max_batch = block.get("flex_max_batch", DEFAULT_FLEX_MAX_BATCH)
    _check_number("flex_max_batch", max_batch, kind=int, lo=1)
    sched = block.get("flex_batch_schedule", "auto")
    own = spec.get("num_speculative_tokens_per_batch_size")
    if own is not None and sched is not None:
        raise FlyConfigError(
            "num_speculative_tokens_per_batch_size and fly.flex_batch_schedule both "
            "schedule K by batch size; keep one (fly.flex_batch_schedule: null keeps "
            "vLLM's)")
    if sched == "auto":
        spec["num_speculative_tokens_per_batch_size"] = flex_schedule(k, max_batch)
    elif sched is not None:
        ok = isinstance(sched, list) and sched and all(
            isinstance(e, list) and len(e) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
            and 1 <= e[0] <= e[1] and 0 <= e[2] <= k for e in sched)
        if not ok or sched[0][0] != 1 or any(
                a[1] >= b[0] for a, b in zip(sched, sched[1:])):
            raise FlyConfigError(
                "fly.flex_batch_schedule must be \"auto\", null, or a list of "
                "[first, last, K] batch-size ranges, sorted, not overlapping, the "
                f"first starting at 1, with 0 <= K <= {k}; got {sched!r}")
        spec["num_speculative_tokens_per_batch_size"] = sched
    idle = block.get("flex_idle_drafter", "skip")
    if idle not in ("skip", "run"):
        raise FlyConfigError(f"fly.flex_idle_drafter must be \"skip\" or \"run\"; got {idle!r}")
    return {"flex": True, "flex_confidence": float(conf), "flex_min_drafts": low,
            "flex_max_batch": max_batch, "flex_batch_schedule": sched,
            "flex_idle_drafter": idle}


def _check_multilevel(block: dict[str, Any], spec: dict[str, Any], drafter: str | None,
                      rule: str) -> dict[str, Any]:
    """Validate the multi-level drafter's keys; returns its FlyConfig fields."""
    keys = ("multilevel_ngram_max", "multilevel_ngram_min", "multilevel_ngram_tokens")
    on = _switch(block, "multilevel", keys, "the multi-level drafter")
    out: dict[str, Any] = {"multilevel": on}
    for key in keys:
        default = getattr(FlyConfig, key)
        out[key] = block.get(key, default)
        _check_number(key, out[key], kind=int, lo=1)
    if out["multilevel_ngram_min"] > out["multilevel_ngram_max"]:
        raise FlyConfigError(
            "fly.multilevel_ngram_min must be at most fly.multilevel_ngram_max; got "
            f"{out['multilevel_ngram_min']} > {out['multilevel_ngram_max']}")
    if not on:
        return out
    if drafter not in (None, "draft_model"):
        raise FlyConfigError(
            f"fly.multilevel accelerates a draft model's drafting, and this config's "
            f"drafter is {drafter!r}; give \"model\": a draft checkpoint, or remove "
            "fly.multilevel")
    if rule != "fly":
        raise FlyConfigError(
            "fly.multilevel works with rule 'fly' only: the FSD drafter's "
            "distributions are not kept across the lookup's passes; remove one")
    if spec.get("draft_sample_method", "greedy") != "greedy":
        raise FlyConfigError(
            "fly.multilevel keeps the greedy drafter's own drafts, so it needs "
            f"greedy drafting; remove draft_sample_method={spec['draft_sample_method']!r}")
    if spec.get("use_heterogeneous_vocab") or spec.get("parallel_drafting"):
        raise FlyConfigError(
            "fly.multilevel needs a plain draft model (one vocabulary, one token "
            "per pass); remove use_heterogeneous_vocab / parallel_drafting")
    return out



def check_gate_keys(gate: Any, given: dict[str, Any], where: str) -> None:
    """``gate`` is one of GATES, and ``given`` holds no key of a test the
    gate does not use (a margin under the entropy gate would be ignored)."""
    if gate not in GATES:
        raise FlyConfigError(f"{where}gate must be one of {list(GATES)}; got {gate!r}")
    stray = [k for k in GATE_UNUSED[gate] if k in given]
    if stray:
        uses = ("margin" if stray[0] in _MARGIN_ONLY else
                "judge" if stray[0] in _JUDGE_ONLY else "entropy")
        also = "" if uses == "judge" else " or 'both'"
        raise FlyConfigError(
            f"{where}{stray[0]} belongs to the {uses} test, which gate {gate!r} does not "
            f"use; remove it, or set {where}gate to {uses!r}{also}")


def check_margin(value: Any, where: str) -> float:
    """The margin gate's bound: a finite number of nats >= 0."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise FlyConfigError(
            f"{where}margin must be a finite number >= 0 (nats: the most the target may "
            f"prefer its own token over the draft, log p(top) - log p(draft)); got {value!r}")
    return float(value)


def check_judge_threshold(value: Any, where: str) -> float:
    """The judge's threshold: a probability in [0, 1]."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not 0 <= value <= 1):
        raise FlyConfigError(
            f"{where}judge_threshold must be a number in [0, 1] (a mismatch is accepted "
            f"when the head's p(important) is below it); got {value!r}")
    return float(value)


def _check_judge(block: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Gate ``judge``: the head file loads, and is for this config's drafter
    (the target, hidden size and vocabulary are checked when vLLM has built
    the target's config: plugin patch 2, and the workers)."""
    path = block.get("judge_path")
    if not isinstance(path, str) or not path:
        raise FlyConfigError(
            "fly.gate 'judge' needs fly.judge_path, the head file that `fly-vllm judge "
            f"train` wrote for this pair; got {path!r}")
    from fly_vllm.judge.head import JudgeHead, JudgeHeadError

    try:
        head = JudgeHead.load(path)
        head.check_pair(drafter=spec.get("model"))
    except JudgeHeadError as e:
        raise FlyConfigError(f"fly.judge_path: {e}") from None
    thr = block.get("judge_threshold")
    return {"judge_path": path, "judge_threshold": (
        None if thr is None else check_judge_threshold(thr, "fly."))}


def _check_gate(block: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """FLy's gate: which test opens a mismatch to the window, and its bound."""
    gate = block.get("gate", FlyConfig.gate)
    check_gate_keys(gate, block, "fly.")
    out = {"gate": gate, "margin": check_margin(block.get("margin", FlyConfig.margin),
                                                "fly.")}
    if gate == "judge":
        out.update(_check_judge(block, spec or {}))
    return out


def check_strict_prefix(value: Any, where: str) -> int:
    """``strict_prefix_tokens``: an integer >= 0."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FlyConfigError(
            f"{where}strict_prefix_tokens must be an integer >= 0 (the first N generated "
            f"tokens are verified exactly); got {value!r}")
    return value
