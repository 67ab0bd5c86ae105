"""Reading a speculative config (a dict, inline JSON or a file) and turning a
FLy config into vLLM's speculative config plus the validated ``FlyConfig``."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from fly_vllm.config.checks import _check_number, _check_threshold
from fly_vllm.config.features import (
    _check_flex,
    _check_fsd,
    _check_gate,
    _check_multilevel,
    check_strict_prefix,
)
from fly_vllm.config.schema import (
    _FLY_KEYS,
    DEFAULT_WINDOW,
    FLY_METHOD,
    MAX_ENTROPY_TOP_K,
    WINDOW_CONVENTIONS,
    FlyConfig,
    FlyConfigError,
)

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
    """Field names of the installed vLLM's SpeculativeConfig, or None.

    Read from its source, not imported: importing vllm.config takes
    seconds (20 on a small CPU machine), and a config check should not. The
    fields of a dataclass are its class body's annotated names, ClassVars
    aside (tests/test_config.py checks this equals the imported dataclass's
    fields)."""
    try:
        found = importlib.util.find_spec("vllm")  # finds, does not import
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        return None  # vLLM absent: vLLM itself will check its keys
    path = Path(next(iter(found.submodule_search_locations))) / "config" / "speculative.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SpeculativeConfig":
            return {n.target.id for n in node.body
                    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                    and "ClassVar" not in ast.unparse(n.annotation)} - _INTERNAL_VLLM_KEYS
    return None


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

    if spec.get("enable_adaptive_verification"):
        raise FlyConfigError(
            "enable_adaptive_verification conflicts with method 'fly': it changes each "
            "request's draft count on the device, after FLy's per-request settings are "
            "read; remove it")

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
    # The learned judge may run without a window (AutoJudge's rule).
    _check_number("window", window, kind=int, lo=0 if block.get("gate") == "judge" else 1)
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
    gate = _check_gate(block, spec) if fsd["rule"] == "fly" else {}
    prefix = check_strict_prefix(block.get("strict_prefix_tokens", 0), "fly.")
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
        strict_prefix_tokens=prefix,
        drafter=drafter,
        **gate,
        **flags,
        **fsd,
        **multilevel,
        **flex,
    )
    return spec, fly


def check_speculative_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """Load and, if it is a FLy config, validate it. Returns the loaded dict
    unchanged (translation happens when vLLM builds its config)."""
    spec = load_speculative_config(value)
    if is_fly(spec):
        parse_fly_config(spec)
    return spec

