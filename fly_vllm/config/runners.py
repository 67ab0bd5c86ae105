"""Which vLLM model runner verifies a FLy config, and what each one lacks.

vLLM picks its runner (``VllmConfig.use_v2_model_runner``): V2 by default
for dense models since vLLM 0.25, V1 where ``VLLM_USE_V2_MODEL_RUNNER=0``,
where Triton is missing (vLLM on CPU), or where V2 lacks one of vLLM's own
features. fly-vllm verifies on both (fly_vllm/runners/). A FLy feature one
runner cannot serve is named here with the reason, so that plugin patch 3
either keeps V1 (vLLM chose V2 by default: as vLLM does for its own
features, with a warning) or refuses the config (V2 was required): plugin
patch 2 already, while the speculative config is read, where the
environment requires V2.

Reads the configs' attributes only: no torch, no vLLM import.
"""

from __future__ import annotations

from typing import Any

from fly_vllm.config.schema import FlyConfig

ENV = "VLLM_USE_V2_MODEL_RUNNER"


def v2_unsupported(fly: FlyConfig) -> list[str]:
    """The features of this config that model runner V2 cannot serve, each
    with its reason (empty: V2 serves it)."""
    out = []
    if fly.flex:
        out.append("fly.flex (flex decoding truncates and skips V1's drafter)")
    if fly.multilevel:
        out.append("fly.multilevel (the n-gram lookup drafts inside V1's drafter)")
    return out


def refusal(missing: list[str]) -> str:
    """The error for a config that requires V2 and uses what V2 lacks."""
    return (f"fly-vllm on model runner V2 ({ENV}=1) does not support "
            f"{'; '.join(missing)}; set {ENV}=0 to verify on V1, or remove it")


def v2_required(vllm_config: Any) -> list[str]:
    """vLLM features that run only on V2 and that FLy cannot verify with."""
    out = []
    if getattr(vllm_config, "watermark_config", None) is not None:
        out.append("watermarking (V2 only; FLy's loose accepts would break its "
                   "detection)")
    return out
