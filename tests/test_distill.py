"""Distillation on the tiny target: a few CPU steps must lower the KL and
leave a loadable draft with a manifest."""

from __future__ import annotations

import json

import pytest

from tests.conftest import real_gsm8k

GSM8K, NO_GSM8K = real_gsm8k()


@pytest.mark.skipif(GSM8K is None, reason=NO_GSM8K)
def test_distill_tiny(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from fly_vllm.distill import main

    out = tmp_path / "draft"
    main(["--out", str(out), "--target", tiny_pair["target"], "--hidden", "64",
          "--layers", "1", "--heads", "2", "--seq", "64", "--batch", "8",
          "--steps", "60", "--lr", "3e-3", "--gsm8k", "60", "--sharegpt", "20",
          "--heldout", "5", "--log-every", "1000", "--no-save-bf16"])
    manifest = json.loads((out / "fly_manifest.json").read_text())
    assert manifest["steps"] == 60
    assert manifest["last_loss"] < manifest["first_loss"]
    assert len(manifest["sha256"]) == 64
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert draft.config.vocab_size == AutoModelForCausalLM.from_pretrained(
        tiny_pair["target"]).config.vocab_size
