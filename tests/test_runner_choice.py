"""Which model runner verifies a FLy config (plugin patch 3): the one vLLM
picks; a FLy feature V2 cannot serve keeps V1 when vLLM chose V2 by
default, and refuses the config, naming the runner and the feature, when
VLLM_USE_V2_MODEL_RUNNER=1 requires V2."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fly_vllm.config import FlyConfig, FlyConfigError

pytest.importorskip("vllm")


def config(watermark=None):
    return SimpleNamespace(speculative_config=SimpleNamespace(), watermark_config=watermark)


@pytest.fixture
def choose(monkeypatch):
    from fly_vllm import plugin

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plugin._WARNED_V1.clear()
    return plugin._choose_runner


def test_v2_serves_every_rule(choose):
    for fly in (FlyConfig(), FlyConfig(gate="margin"), FlyConfig(strict=True),
                FlyConfig(strict_prefix_tokens=4)):
        assert choose(fly, config(), True) is True
    assert choose(FlyConfig(rule="fsd"), config(), True) is True
    # Where vLLM picks V1 (no Triton, or its own V2-unsupported features), V1.
    assert choose(FlyConfig(), config(), False) is False


@pytest.mark.parametrize("fly,cfg,words", [
    (FlyConfig(flex=True), config(), "fly.flex"),
    (FlyConfig(multilevel=True), config(), "fly.multilevel"),
])
def test_a_feature_v2_lacks_keeps_v1_or_is_refused(choose, monkeypatch, caplog, fly, cfg,
                                                    words):
    with caplog.at_level(logging.WARNING, logger="vllm.fly_vllm"):
        assert choose(fly, cfg, True) is False
    assert words in caplog.text and "using the V1 model runner" in caplog.text
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(FlyConfigError, match="model runner V2") as e:
        choose(fly, cfg, True)
    assert words in str(e.value) and "VLLM_USE_V2_MODEL_RUNNER=0" in str(e.value)


def test_watermarking_is_refused_on_either_path(choose):
    with pytest.raises(FlyConfigError, match="watermarking"):
        choose(FlyConfig(), config(watermark=object()), True)


def test_adaptive_verification_is_refused_when_the_config_is_read():
    from fly_vllm.config import parse_fly_config

    with pytest.raises(FlyConfigError, match="enable_adaptive_verification"):
        parse_fly_config({"method": "fly", "model": "m", "num_speculative_tokens": 4,
                          "enable_adaptive_verification": True})
