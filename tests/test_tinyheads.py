"""The tiny EAGLE-3 and EAGLE-1 heads of fly_vllm.tinyheads.

Without an engine: the files and config fields vLLM 0.32 reads, the cache,
and how well the heads draft, measured by eagle_head_agreement (the head
written again in torch, as vLLM runs it): on held-out greedy text far better
than a random head, on the end-to-end prompts (which the heads are trained
on) well enough for the e2e check, and worse when given another text's
hidden states, so they do read what vLLM feeds them. In vLLM the heads run
in tests/test_v2_e2e.py (vLLM's own EAGLE-3 keeps the target's greedy text;
FLy with either head on both runners).
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import SCRATCH

# tests/test_e2e.py's prompts, which the heads are trained on (among others).
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Question: what is 12 plus 30? Answer:",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Numbers: 0 1 2 3",
]


@pytest.fixture(scope="module")
def heads() -> dict:
    from fly_vllm.tinyheads import build_tiny_eagle, build_tiny_eagle3
    from fly_vllm.tinymodels import build_tiny_llama

    target = build_tiny_llama(SCRATCH / "target", seed=0)  # the tiny_pair target
    return {
        "target": target,
        "eagle3": build_tiny_eagle3(SCRATCH / "eagle3", target),
        "eagle": build_tiny_eagle(SCRATCH / "eagle", target),
        # The same shape, untrained: its drafts are what chance gives.
        "random": build_tiny_eagle3(SCRATCH / "eagle3-random", target, init="random",
                                    train_steps=0),
    }


def _config(folder) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_eagle3_checkpoint(heads):
    target, cfg, w = _config(heads["target"]), _config(heads["eagle3"]), _weights(heads["eagle3"])
    H, V, L = target["hidden_size"], target["vocab_size"], target["num_hidden_layers"]
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    # Every residual stream of the 2-layer target: vLLM's default (2, 1, -1) is unusable.
    assert cfg["eagle_aux_hidden_state_layer_ids"] == list(range(L + 1))
    assert cfg["num_aux_hidden_states"] == L + 1
    assert cfg["hidden_size"] == H and cfg["vocab_size"] == cfg["draft_vocab_size"] == V
    assert cfg["norm_before_residual"] is True
    assert w["fc.weight"].shape == (H, (L + 1) * H)
    assert w["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * H  # [embed, hidden]
    assert "midlayer.hidden_norm.weight" in w and "norm.weight" in w
    assert w["lm_head.weight"].shape == (V, H)
    # Layers after the first keep vLLM's own names.
    assert {k.split(".")[1] for k in w if k.startswith("layers.")} == {"1"}
    # The target's embedding is shared; the full vocabulary needs no d2t/t2d.
    assert not any(k.startswith(("embed_tokens", "d2t", "t2d")) for k in w)


def test_eagle_checkpoint(heads):
    target, cfg, w = _config(heads["target"]), _config(heads["eagle"]), _weights(heads["eagle"])
    H = target["hidden_size"]
    assert cfg["architectures"] == ["EagleLlamaForCausalLM"]
    assert cfg["vocab_size"] == target["vocab_size"]
    assert w["fc.weight"].shape == (H, 2 * H)
    # vLLM's EAGLE-1 layer 0 has no input norm, and no final norm or LM head.
    assert "layers.0.input_layernorm.weight" not in w and "layers.1.input_layernorm.weight" in w
    assert not any(k.startswith(("embed_tokens", "lm_head", "norm")) for k in w)


def test_builds_are_cached(heads):
    from fly_vllm.tinyheads import build_tiny_eagle, build_tiny_eagle3

    stamp = (heads["eagle3"] / "model.safetensors").stat().st_mtime_ns
    t = time.monotonic()
    assert build_tiny_eagle3(SCRATCH / "eagle3", heads["target"]) == heads["eagle3"]
    assert build_tiny_eagle(SCRATCH / "eagle", heads["target"]) == heads["eagle"]
    assert time.monotonic() - t < 10
    assert (heads["eagle3"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_heads_draft_held_out_text(heads):
    from fly_vllm.tinyheads import eagle_head_agreement

    e3 = eagle_head_agreement(heads["eagle3"], heads["target"])
    e1 = eagle_head_agreement(heads["eagle"], heads["target"])
    rnd = eagle_head_agreement(heads["random"], heads["target"])
    # Entry j: share of positions whose drafts 1..j+1 all match. Measured:
    # EAGLE-3 [0.45, 0.22, 0.12, 0.07], EAGLE-1 [0.35, 0.13, 0.06, 0.04],
    # random [0.005, 0, 0, 0].
    assert rnd[0] < 0.03
    assert e3[0] > 0.3 and sum(e3) / 4 > 0.1
    assert e1[0] > 0.2
    assert all(a >= b for a, b in zip(e3, e3[1:]))


@pytest.mark.parametrize("kind", ["eagle3", "eagle"])
def test_heads_read_hidden_states(heads, kind):
    from fly_vllm.tinyheads import eagle_head_agreement

    own = eagle_head_agreement(heads[kind], heads["target"], prompts=PROMPTS)
    other = eagle_head_agreement(heads[kind], heads["target"], prompts=PROMPTS,
                                 shuffle_hidden=True)
    # On the prompts it was trained on. Measured: EAGLE-3 0.79, and 0.61
    # with another text's hidden states; EAGLE-1 0.73 and 0.48.
    assert sum(own) / 4 > 0.6
    assert sum(other) / 4 < sum(own) / 4 - 0.1
