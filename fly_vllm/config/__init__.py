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

The package's parts, one concept each: ``schema`` (the settings and their
defaults), ``checks`` (value checks), ``features`` (the rule, multi-level and
flex blocks), ``parse`` (reading and translating a config) and ``request``
(per-request overrides). Everything is importable from here.
"""

from fly_vllm.config.checks import max_topk_entropy
from fly_vllm.config.features import flex_schedule
from fly_vllm.config.parse import (
    check_speculative_config,
    is_fly,
    load_speculative_config,
    parse_fly_config,
)
from fly_vllm.config.request import REQUEST_KEYS, request_overrides
from fly_vllm.config.schema import (
    ADDITIONAL_CONFIG_KEY,
    DEFAULT_FLEX_MAX_BATCH,
    DEFAULT_MARGIN,
    DEFAULT_FSD_THRESHOLD,
    DEFAULT_WINDOW,
    FLY_METHOD,
    FSD_DIVERGENCES,
    FSD_MAX_THRESHOLD,
    FSD_VARIANTS,
    GATES,
    MAX_ENTROPY_TOP_K,
    NO_DISTRIBUTION_DRAFTERS,
    RULES,
    WINDOW_CONVENTIONS,
    FlyConfig,
    FlyConfigError,
)

__all__ = [
    "ADDITIONAL_CONFIG_KEY", "DEFAULT_FLEX_MAX_BATCH", "DEFAULT_MARGIN", "DEFAULT_FSD_THRESHOLD",
    "DEFAULT_WINDOW", "FLY_METHOD", "FSD_DIVERGENCES", "FSD_MAX_THRESHOLD", "FSD_VARIANTS",
    "GATES", "MAX_ENTROPY_TOP_K", "NO_DISTRIBUTION_DRAFTERS", "REQUEST_KEYS", "RULES",
    "WINDOW_CONVENTIONS", "FlyConfig", "FlyConfigError", "check_speculative_config",
    "flex_schedule", "is_fly", "load_speculative_config", "max_topk_entropy",
    "parse_fly_config", "request_overrides",
]
