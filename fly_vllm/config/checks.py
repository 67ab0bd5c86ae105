"""Value checks shared by the config's parts and per-request settings: each
raises ``FlyConfigError`` with one message naming the key and the allowed
values."""

from __future__ import annotations

import math
from typing import Any

from fly_vllm.config.schema import FSD_MAX_THRESHOLD, FlyConfigError

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

