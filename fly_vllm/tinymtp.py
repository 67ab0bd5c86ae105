"""A tiny random MiMo-style target with one multi-token-prediction (MTP)
layer, for tests of vLLM's ``"method": "mtp"`` drafter offline.

What vLLM 0.32 loads (read from its models/mimo.py, mimo_mtp.py and
config/speculative.py): a ``MiMoForCausalLM`` checkpoint is a Qwen2 model
whose ``model.mtp_layers.<i>.*`` weights the target skips; ``"method":
"mtp"`` without a ``model`` drafts with the target's own checkpoint, loaded
as ``MiMoMTPModel``: for the token x[p+1] at the target's position p and the
target's final residual stream h[p] (before its norm),

    x = input_proj([hidden_layernorm(h[p]), token_layernorm(embed(x[p+1]))])
    y = final_layernorm(x + block(x))    # one Qwen2 decoder layer
    logits = lm_head(y)                  # the target's head and embedding

with the embedding zeroed at position 0; later draft steps feed back y.

A random MTP layer drafts nothing a random target accepts, and one decoder
layer cannot follow a deeper random target. So the target here has one
decoder layer, every embedding row has the same RMS (0.5), and the MTP layer
is built to be that target one position late: ``input_proj`` passes the
token's normed embedding (times the RMS, which gives the embedding back)
plus a little of h[p], and the block is the target's layer with a little
noise. Its drafts then differ from the target's greedy tokens only where
the noise, h[p] and the context it does not see (x[0], and x[1] zeroed)
tip the argmax: a near drafter, as the tests want. Building takes well
under a second, needs no download and is repeatable bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

from fly_vllm.tinymodels import _train_tokenizer, built, mark_built

EMBED_RMS = 0.5
_VERSION = 1


def build_tiny_mimo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    mtp_noise: float = 0.02,
    hidden_mix: float = 0.002,
) -> Path:
    """Write a tiny one-layer ``MiMoForCausalLM`` with one MTP layer
    (tokenizer, config.json, model.safetensors) to ``out_dir``.

    ``mtp_noise`` is the std of the noise added to the MTP block's copy of
    the target's layer (whose weights have std 0.5); ``hidden_mix`` the std
    of ``input_proj``'s weights on the normed h[p]. Measured with vLLM 0.32
    (V1, K 4, 4 prompts, greedy): without either the MTP layer drafts 56% of
    tokens right (the context it does not see), with the defaults 33%. Serve it with ``{"method": "mtp", "num_speculative_tokens": K}``
    (no ``model``). Returns the folder; an existing build of the same
    arguments is kept."""
    out = Path(out_dir)
    spec = dict(kind="mimo", version=_VERSION, seed=seed, vocab_size=vocab_size,
                hidden_size=hidden_size, mtp_noise=mtp_noise, hidden_mix=hidden_mix)
    if built(out, spec):
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, vocab_size)
    vocab = len(AutoTokenizer.from_pretrained(out))
    h, inter = hidden_size, hidden_size * 2
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.5):
        return torch.randn(*shape, generator=g) * std

    embed = rand(vocab, h)
    embed *= EMBED_RMS / embed.pow(2).mean(-1, keepdim=True).sqrt()
    layer = {
        "self_attn.q_proj.weight": rand(h, h), "self_attn.q_proj.bias": rand(h),
        "self_attn.k_proj.weight": rand(h, h), "self_attn.k_proj.bias": rand(h),
        "self_attn.v_proj.weight": rand(h, h), "self_attn.v_proj.bias": rand(h),
        "self_attn.o_proj.weight": rand(h, h),
        "mlp.gate_proj.weight": rand(inter, h), "mlp.up_proj.weight": rand(inter, h),
        "mlp.down_proj.weight": rand(h, inter),
        "input_layernorm.weight": rand(h), "post_attention_layernorm.weight": rand(h),
    }
    lm_head = rand(vocab, h)
    lm_head[1] = 0.0  # never predict EOS (id 1): generations run to max_tokens
    norm = rand(h)
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": norm,
               "lm_head.weight": lm_head,
               **{f"model.layers.0.{k}": v for k, v in layer.items()}}
    mtp = "model.mtp_layers.0."
    weights.update({f"{mtp}{k}": v + rand(*v.shape, std=mtp_noise) for k, v in layer.items()})
    weights.update({
        f"{mtp}token_layernorm.weight": torch.full((h,), EMBED_RMS),
        f"{mtp}hidden_layernorm.weight": torch.ones(h),
        f"{mtp}input_proj.weight": torch.cat([rand(h, h, std=hidden_mix), torch.eye(h)], 1),
        f"{mtp}final_layernorm.weight": norm.clone(),
    })
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
        use_sliding_window=False).to_dict()
    config.update(architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1,
                  torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    mark_built(out, spec)
    return out
