"""fly.json: reading, validating and translating a FLy speculative config.

A FLy config is a vLLM speculative config with ``"method": "fly"`` and an
optional ``"fly"`` block::

    {
      "method": "fly",
      "model": "meta-llama/Llama-3.1-8B-Instruct",   # any vLLM drafter
      "num_speculative_tokens": 15,
      "fly": {"entropy_threshold": 0.3, "window": 6}
    }

Every key outside ``"fly"`` goes to vLLM unchanged; ``"method": "fly"`` is
replaced by the drafter's own method (inferred, or ``fly.drafter``). The
validated ``"fly"`` block travels to the workers in
``VllmConfig.additional_config["fly"]``.

This module imports neither torch nor vLLM at import time, so a config can be
checked on a machine without either (``fly-vllm check-config FILE``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

FLY_METHOD = "fly"
ADDITIONAL_CONFIG_KEY = "fly"
WINDOW_CONVENTIONS = ("vllm", "paper")
MAX_ENTROPY_TOP_K = 8
DEFAULT_WINDOW = 6
RULES = ("fly", "fsd")
FSD_DIVERGENCES = ("js", "kl_draft_target", "kl_target_draft", "tv")
FSD_VARIANTS = ("resample", "fallback")
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
_FLY_ONLY = ("entropy_threshold", "window", "entropy_top_k", "window_convention")
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
            (the paper's). 0 makes every mismatch uncertain.
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
        return {k: v for k, v in self.to_dict().items() if k not in other}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlyConfig:
        return cls(**d)


_FLY_KEYS = {f.name for f in dataclasses.fields(FlyConfig)}
# Keys vLLM fills in itself; a user never writes them.
_INTERNAL_VLLM_KEYS = {
    "target_model_config",
    "target_parallel_config",
    "draft_model_config",
    "draft_parallel_config",
}


def _strip_comments(text: str) -> str:
    """Drop whole-line ``//`` and ``#`` comments, so fly.json files can carry
    their own documentation. Line numbers are kept for JSON error messages."""
    return "\n".join(
        "" if line.lstrip().startswith(("//", "#")) else line
        for line in text.splitlines()
    )


def load_speculative_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """Read ``--speculative-config``: a dict, inline JSON, or a path to a file.

    Raises:
        FlyConfigError: missing file, or invalid JSON (with line and column).
    """
    if isinstance(value, dict):
        return dict(value)
    text = value.strip()
    source = "inline JSON"
    if not text.startswith("{"):
        path = os.path.expanduser(text)
        if not os.path.isfile(path):
            raise FlyConfigError(
                f"speculative config file {text!r} does not exist (expected a path "
                "to a JSON file, or inline JSON starting with '{')"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        source = f"file {value!r}"
    try:
        parsed = json.loads(_strip_comments(text))
    except json.JSONDecodeError as e:
        raise FlyConfigError(
            f"speculative config ({source}) is not valid JSON: {e.msg} "
            f"at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(parsed, dict):
        raise FlyConfigError(
            f"speculative config ({source}) must be a JSON object, "
            f"got {type(parsed).__name__}"
        )
    return parsed


def is_fly(spec: dict[str, Any] | None) -> bool:
    return bool(spec) and (spec.get("method") == FLY_METHOD or "fly" in spec)


def _vllm_speculative_keys() -> set[str] | None:
    """Field names of the installed vLLM's SpeculativeConfig, or None."""
    try:
        from vllm.config.speculative import SpeculativeConfig
    except Exception:  # vLLM absent: vLLM itself will check its keys.
        return None
    return {f.name for f in dataclasses.fields(SpeculativeConfig)} - _INTERNAL_VLLM_KEYS


def max_topk_entropy(k: int) -> float:
    """The largest value the (unnormalised) top-k entropy can take, in nats:
    ln k for k >= 3, k/e for k <= 2 (where -sum p log p over k probabilities
    summing to at most 1 peaks at p = 1/e). A threshold above it gates every
    mismatch, which is strict verification in disguise."""
    return math.log(k) if k >= 3 else k / math.e


def _check_threshold(value: float, top_k: int, where: str) -> None:
    ceiling = max_topk_entropy(top_k)
    if value > ceiling:
        raise FlyConfigError(
            f"{where} entropy_threshold {value!r} is above {ceiling:.4g}, the largest "
            f"top-{top_k} entropy there is, so every mismatch would be gated; "
            f"allowed 0..{ceiling:.4g} (use strict: true for exact verification)")


def _check_number(
    key: str, value: Any, *, kind: type, lo: float, hi: float | None = None
) -> None:
    ok_type = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
    if not ok_type or (kind is float and not math.isfinite(value)):
        raise FlyConfigError(
            f"fly.{key} must be a finite {'number' if kind is float else 'integer'} "
            f"{rng}; got {value!r}"
        )
    if value < lo or (hi is not None and value > hi):
        raise FlyConfigError(f"fly.{key} must be {rng}; got {value!r}")


def _infer_drafter(spec: dict[str, Any]) -> str | None:
    """The vLLM method for the drafter, or None to let vLLM infer it from
    ``model`` (draft_model, eagle, medusa, ... by checkpoint)."""
    model = spec.get("model")
    if model in ("ngram", "[ngram]"):
        return "ngram"
    if model is not None:
        return None
    if "prompt_lookup_max" in spec or "prompt_lookup_min" in spec:
        return "ngram"
    raise FlyConfigError(
        "method 'fly' needs a drafter: give \"model\" (a draft model path or id, "
        "for draft_model/eagle/...) or \"prompt_lookup_min\"/\"prompt_lookup_max\" "
        "(n-gram drafting), or name one in fly.drafter"
    )


def parse_fly_config(spec: dict[str, Any]) -> tuple[dict[str, Any], FlyConfig]:
    """Validate a FLy speculative config and split it.

    Args:
        spec: The speculative config as the user wrote it (``method: fly``).

    Returns:
        ``(vllm_spec, fly)``: the dict to hand to vLLM's SpeculativeConfig
        (``method`` replaced by the drafter's, the ``fly`` block removed) and
        the validated FLy settings.

    Raises:
        FlyConfigError: one clear message naming the key and allowed values.
    """
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    method = spec.pop("method", FLY_METHOD)
    if method != FLY_METHOD:
        raise FlyConfigError(
            f"a \"fly\" block needs \"method\": \"fly\"; got \"method\": {method!r}"
        )
    block = spec.pop("fly", None) or {}
    if not isinstance(block, dict):
        raise FlyConfigError(f"\"fly\" must be a JSON object; got {block!r}")

    unknown = sorted(set(block) - _FLY_KEYS)
    if unknown:
        raise FlyConfigError(
            f"unknown key fly.{unknown[0]}; allowed keys in \"fly\": "
            + ", ".join(sorted(_FLY_KEYS))
        )
    allowed = _vllm_speculative_keys()
    if allowed is not None:
        bad = sorted(set(spec) - allowed)
        if bad:
            raise FlyConfigError(
                f"unknown speculative config key {bad[0]!r}; vLLM's SpeculativeConfig "
                "accepts: " + ", ".join(sorted(allowed))
                + "; FLy's own keys go under \"fly\""
            )

    rsm = spec.get("rejection_sample_method")
    if rsm not in (None, "standard"):
        raise FlyConfigError(
            f"rejection_sample_method={rsm!r} conflicts with method 'fly', which "
            "replaces verification; remove it (allowed: \"standard\")"
        )

    k = spec.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise FlyConfigError(
            "method 'fly' needs num_speculative_tokens (K), an integer >= 2 "
            f"(the window must fit inside one step); got {k!r}"
        )

    drafter = block.get("drafter")
    if drafter is not None:
        if not isinstance(drafter, str) or drafter == FLY_METHOD:
            raise FlyConfigError(
                f"fly.drafter must name a vLLM speculative method such as "
                f"\"draft_model\" or \"ngram\"; got {drafter!r}"
            )
    else:
        drafter = _infer_drafter(spec)
    if drafter is not None:
        spec["method"] = drafter

    threshold = block.get("entropy_threshold", FlyConfig.entropy_threshold)
    _check_number("entropy_threshold", threshold, kind=float, lo=0)
    top_k = block.get("entropy_top_k", FlyConfig.entropy_top_k)
    _check_number("entropy_top_k", top_k, kind=int, lo=1, hi=MAX_ENTROPY_TOP_K)
    _check_threshold(threshold, top_k, "fly.")
    window = block.get("window", min(DEFAULT_WINDOW, k - 1))
    _check_number("window", window, kind=int, lo=1)
    if window >= k:
        raise FlyConfigError(
            f"fly.window must be smaller than num_speculative_tokens (K={k}), "
            f"since the window is resolved inside one step: allowed 1..{k - 1}; "
            f"got {window}"
        )
    convention = block.get("window_convention", "vllm")
    if convention not in WINDOW_CONVENTIONS:
        raise FlyConfigError(
            f"fly.window_convention must be one of {list(WINDOW_CONVENTIONS)}; "
            f"got {convention!r}"
        )
    fsd = _check_fsd(block, spec, drafter)
    multilevel = _check_multilevel(block, spec, drafter, fsd["rule"])
    flex = _check_flex(block, spec, k, drafter)
    flags = {}
    for key in ("strict", "guard_digits", "guard_structured", "guard_eos_stop"):
        flags[key] = block.get(key, False)
        if not isinstance(flags[key], bool):
            raise FlyConfigError(f"fly.{key} must be true or false; got {flags[key]!r}")

    fly = FlyConfig(
        entropy_threshold=float(threshold),
        window=window,
        entropy_top_k=top_k,
        window_convention=convention,
        drafter=drafter,
        **flags,
        **fsd,
        **multilevel,
        **flex,
    )
    return spec, fly


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


def _switch(block: dict[str, Any], name: str, keys: tuple[str, ...], what: str) -> bool:
    """An on/off key of the "fly" block; its settings without it on are an error."""
    on = block.get(name, False)
    if not isinstance(on, bool):
        raise FlyConfigError(f"fly.{name} must be true or false; got {on!r}")
    stray = [key for key in keys if key in block]
    if stray and not on:
        raise FlyConfigError(
            f"fly.{stray[0]} configures {what}, which is off; set fly.{name} to true, "
            "or remove it")
    return on


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


def _number_from_text(v: Any) -> Any:
    """A per-request value as vllm_xargs may carry it: "0.5" -> 0.5; any
    other value unchanged (the caller's check rejects what is not a number)."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def _check_fsd_threshold(value: Any, divergence: str, where: str) -> float:
    value = _number_from_text(value)
    hi = FSD_MAX_THRESHOLD.get(divergence)
    rng = f"between 0 and {hi:.4g}" if hi is not None else ">= 0"
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0 or (hi is not None and value > hi)):
        raise FlyConfigError(
            f"{where}fsd_threshold must be a finite number {rng} for divergence "
            f"{divergence!r} (a draft is accepted iff D <= T); got {value!r}")
    return float(value)


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


def check_speculative_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """Load and, if it is a FLy config, validate it. Returns the loaded dict
    unchanged (translation happens when vLLM builds its config)."""
    spec = load_speculative_config(value)
    if is_fly(spec):
        parse_fly_config(spec)
    return spec


# --------------------------------------------------------------------------
# Per-request control.

REQUEST_KEYS = ("strict", "entropy_threshold", "window", "fsd_threshold")


def _as_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise FlyConfigError(f"per-request fly {key} must be true or false; got {v!r}")


def request_overrides(extra_args: dict[str, Any] | None, k: int,
                      top_k: int = 3, fly: FlyConfig | None = None) -> dict[str, Any]:
    """Validate a request's own FLy settings.

    They come from ``SamplingParams.extra_args``, either as a ``"fly"`` dict
    (offline) or as flat ``fly_<key>`` entries (the OpenAI server's
    ``vllm_xargs``, which takes flat values only). Keys: ``strict`` (true:
    exact verification for this request), ``entropy_threshold`` (0 up to
    the largest top-k entropy, `max_topk_entropy(top_k)`, with `top_k` the
    server's) and ``window`` (1..K-1) for rule ``fly``; ``fsd_threshold``
    for rule ``fsd`` (the server's ``fly`` config decides which apply).
    Returns the overrides as a dict (empty if none).

    Raises:
        FlyConfigError: an unknown key, a wrong type or a value out of range.
    """
    if not extra_args:
        return {}
    given: dict[str, Any] = {}
    nested = extra_args.get("fly")
    if nested is not None:
        if not isinstance(nested, dict):
            raise FlyConfigError(f"extra_args['fly'] must be an object; got {nested!r}")
        given.update(nested)
    for key, v in extra_args.items():
        if key.startswith("fly_"):
            given[key[len("fly_"):]] = v
    out: dict[str, Any] = {}
    rule = fly.rule if fly is not None else "fly"
    allowed = [key for key in REQUEST_KEYS
               if key == "strict" or (key in _FSD_ONLY) == (rule == "fsd")]
    for key, v in given.items():
        if key not in allowed:
            raise FlyConfigError(
                f"unknown per-request fly key {key!r} for a server with rule {rule!r}; "
                f"allowed: {', '.join(allowed)}"
                " (over HTTP: vllm_xargs {\"fly_strict\": true, ...})")
        if key == "strict":
            out[key] = _as_bool(key, v)
        elif key == "fsd_threshold":
            out[key] = _check_fsd_threshold(v, fly.fsd_divergence, "per-request fly ")
        elif key == "entropy_threshold":
            v = _number_from_text(v)
            if (not isinstance(v, (int, float)) or isinstance(v, bool)
                    or not math.isfinite(v) or v < 0):
                raise FlyConfigError(
                    f"per-request fly entropy_threshold must be a finite number >= 0; "
                    f"got {v!r}")
            _check_threshold(float(v), top_k, "per-request fly")
            out[key] = float(v)
        else:
            if isinstance(v, str) and v.isdigit():
                v = int(v)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < k:
                raise FlyConfigError(
                    f"per-request fly window must be an integer in 1..{k - 1} "
                    f"(K={k}); got {v!r}")
            out[key] = v
    return out
