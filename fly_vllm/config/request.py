"""Per-request FLy settings: what a request may override (offline
``SamplingParams.extra_args``, or the server's flat ``vllm_xargs``) and how
each value is checked."""

from __future__ import annotations

import math
from typing import Any

from fly_vllm.config.checks import _check_fsd_threshold, _check_threshold, _number_from_text
from fly_vllm.config.features import (
    check_gate_keys,
    check_judge_threshold,
    check_margin,
    check_strict_prefix,
)
from fly_vllm.config.schema import FlyConfig, FlyConfigError

REQUEST_KEYS = ("strict", "strict_prefix_tokens", "gate", "entropy_threshold", "margin",
                "judge_threshold", "window", "fsd_threshold")
# Keys of one rule only (the others apply to both).
_RULE_KEYS = {"fly": ("gate", "entropy_threshold", "margin", "judge_threshold", "window"),
              "fsd": ("fsd_threshold",)}


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
    exact verification for this request) and ``strict_prefix_tokens`` (an
    integer >= 0) for both rules; ``gate`` (entropy, margin, both),
    ``entropy_threshold`` (0 up to the largest top-k entropy,
    `max_topk_entropy(top_k)`, with `top_k` the server's), ``margin`` (nats,
    >= 0), ``judge_threshold`` (0..1; gate judge, which needs the server's
    head) and ``window`` (1..K-1; 0..K-1 under the judge) for rule ``fly``; ``fsd_threshold`` for
    rule ``fsd`` (the server's ``fly`` config decides which apply). A key of
    a test the request's gate (its own, else the server's) does not use is
    an error. Returns the overrides as a dict (empty if none).

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
    other = _RULE_KEYS["fsd" if rule == "fly" else "fly"]
    allowed = [key for key in REQUEST_KEYS if key not in other]
    for key, v in given.items():
        if key not in allowed:
            raise FlyConfigError(
                f"unknown per-request fly key {key!r} for a server with rule {rule!r}; "
                f"allowed: {', '.join(allowed)}"
                " (over HTTP: vllm_xargs {\"fly_strict\": true, ...})")
        if key == "strict":
            out[key] = _as_bool(key, v)
        elif key == "strict_prefix_tokens":
            if isinstance(v, str) and v.isdigit():
                v = int(v)
            out[key] = check_strict_prefix(v, "per-request fly ")
        elif key == "gate":
            check_gate_keys(v, {}, "per-request fly ")
            if v == "judge" and (fly is None or fly.judge_path is None):
                raise FlyConfigError(
                    "per-request fly gate 'judge' needs a server started with a judge head "
                    "(fly.gate 'judge' and fly.judge_path); this one has none")
            out[key] = v
        elif key == "judge_threshold":
            out[key] = check_judge_threshold(_number_from_text(v), "per-request fly ")
        elif key == "margin":
            out[key] = check_margin(_number_from_text(v), "per-request fly ")
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
            out[key] = v
    if rule == "fly":
        gate = out.get("gate", fly.gate if fly is not None else FlyConfig.gate)
        check_gate_keys(gate, out, "per-request fly ")
        if "window" in out:
            v, lo = out["window"], 0 if gate == "judge" else 1
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < k:
                raise FlyConfigError(
                    f"per-request fly window must be an integer in {lo}..{k - 1} "
                    f"(K={k}); got {v!r}")
    return out
