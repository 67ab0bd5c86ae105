"""Tiny random Llama checkpoints for tests and smoke runs.

A byte-level BPE tokenizer is trained on a small built-in corpus (seconds), then
random `LlamaForCausalLM` weights are saved with `save_pretrained`, so vLLM can
load the folder like any Hugging Face checkpoint. Nothing is downloaded.

Two models built with the same tokenizer but different seeds disagree on most
tokens, which is what the loose-acceptance tests need; a model paired with
itself agrees on every token.

EAGLE-3 and EAGLE-1 draft heads for such a target: fly_vllm/tinyheads.py.
"""

from __future__ import annotations

import json
from pathlib import Path

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens and verifies them in one pass.",
    "A draft model proposes; the target model disposes.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "fly", "window": 6, "threshold": 0.3, "ok": true}',
    "Question: what is 12 plus 30? Answer: 42.",
]


def _train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(out_dir)


MARKER = "fly_tiny.json"  # a finished build's arguments, beside its files


def built(out: Path, spec: dict) -> bool:
    """Whether ``out`` holds a finished build of ``spec`` (its marker)."""
    marker = out / MARKER
    return marker.exists() and json.loads(marker.read_text()) == spec


def mark_built(out: Path, spec: dict) -> None:
    """Record a finished build of ``spec`` in ``out`` (written last)."""
    (out / MARKER).write_text(json.dumps(spec))


def build_tiny_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    logit_scale: float = 1.0,
    perturb: tuple[str | Path, float] | None = None,
) -> Path:
    """Write a tiny random Llama (tokenizer + fp32 weights) to `out_dir`.

    `logit_scale` multiplies the LM head: a small scale flattens the
    distributions (high entropy, so FLy's gate opens); a large one sharpens them.
    `perturb=(other_dir, noise)` copies the weights of the tiny model in
    `other_dir` (same sizes) and adds Gaussian noise of std `noise`: a draft
    that agrees with it on most tokens, but not all.
    Returns the folder. Rebuilding an existing folder is skipped.
    """
    out = Path(out_dir)
    spec = dict(seed=seed, vocab_size=vocab_size, hidden_size=hidden_size,
                num_layers=num_layers, logit_scale=logit_scale,
                perturb=None if perturb is None else [str(perturb[0]), perturb[1]])
    if built(out, spec):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, vocab_size)
    from transformers import AutoTokenizer

    real_vocab = len(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden_size // 2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.lm_head.weight.mul_(logit_scale)
        if perturb is not None:
            base = LlamaForCausalLM.from_pretrained(perturb[0]).state_dict()
            for name, p in model.named_parameters():
                p.copy_(base[name] + perturb[1] * torch.randn_like(p))
        # Never predict EOS, so generations always run to max_tokens.
        model.lm_head.weight[config.eos_token_id].fill_(0.0)
    model.save_pretrained(out, safe_serialization=True)
    mark_built(out, spec)
    return out


# ---------------------------------------------------------------------------
# EAGLE draft heads for the tiny target
#
# vLLM's EAGLE-3 head (Eagle3LlamaForCausalLM, vllm/model_executor/models/
# llama_eagle3.py) and EAGLE-1 head (EagleLlamaForCausalLM, llama_eagle.py)
# are written again below in plain torch, trained on the target's greedy
# text decoded by transformers, and saved under the names vLLM's loaders
# read. What vLLM 0.32 feeds them (from its source: v1/spec_decode/
# llm_base_proposer.py, v1/worker/gpu_model_runner.py, models/llama.py,
# models/interfaces.py):
#
# * Drafter slot p sits at the target's position p; its token is x[p+1]
#   (the input ids shifted left by one, the sampled token in the last slot)
#   and its hidden state the target's at p, so it predicts token p + 2.
# * EAGLE-3: the hidden state is the concatenation, in ascending layer
#   order, of the target's residual streams after k decoder layers (pre
#   final norm; k = 0 is the embedding output) for k in the head config's
#   `eagle_aux_hidden_state_layer_ids`. Without that field vLLM takes
#   (2, L // 2, L - 3), useless for L = 2. The head's fc maps them to H.
#   `num_aux_hidden_states` sizes fc (default 3; the id list is read only
#   from an `eagle_config` dict), so both are written.
# * EAGLE-1: the hidden state is the target's final, normed hidden state.
# * Later draft steps feed the head's own output back as the hidden state
#   (EAGLE-3: the residual before its final norm, not through fc; EAGLE-1:
#   its only output), with the drafted token, at the next position. The
#   drafter's KV cache holds target-fed entries up to p and its own after.
# * A checkpoint without `embed_tokens` shares the target's embedding; one
#   without `lm_head` shares the target's LM head, as does one whose
#   lm_head equals the target's (EAGLE-1's model has no LM head of its
#   own). The EAGLE-3 heads here use the target's embedding and their own
#   trained LM head; the EAGLE-1 heads use both of the target's.
# * `d2t` (target id = draft id + d2t[draft id]) is read only when
#   `draft_vocab_size` differs from the target's vocab size; `t2d` is
#   always skipped. These heads draft over the whole vocabulary and ship
#   neither (a `d2t` would find no parameter to load into).
#
