"""Distil a small draft model for a target (knowledge distillation).

    python -m fly_vllm.distill --out DRAFT_DIR [--target M] [--steps N] ...

The draft shares the target's tokenizer (so vLLM can pair them) and is a small
Llama (default: hidden 256, 3 layers, tied embeddings, about 15 M parameters
for SmolLM2's 49,152-token vocabulary, ~30 MB in bf16). It learns to match the
target's next-token distribution (KL(target || draft), temperature 1) on text
from GSM8K-train and ShareGPT, rendered with the chat template. The target's
logits are computed on the fly, so only the student is trained.

It is written for a GPU (minutes there); on a CPU it runs, slowly, within
``--max-minutes``. At the end it reports top-1 agreement with the target on
held-out text (the GSM8K items after the training slice and ShareGPT items
after those) and writes ``DRAFT_DIR`` (an HF checkpoint) with
``fly_manifest.json``: how it was made, the data, the agreement, and the
sha256 of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path


def _texts(tokenizer, n_gsm8k: int, n_sharegpt: int, skip: int = 0) -> list[str]:
    from fly_vllm.bench import datasets as ds

    out = []
    for item in ds.load_gsm8k(skip + n_gsm8k)[skip:]:
        # The reference solution: the kind of text the target writes.
        msgs = item.messages + [{"role": "assistant", "content": item.meta["solution"]}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    if n_sharegpt:
        share = ds.load_sharegpt(skip + n_sharegpt)[skip:]
        for item in share:
            out.append(tokenizer.apply_chat_template(item.messages, tokenize=False,
                                                     add_generation_prompt=True))
    return out


def student_config(target_config, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=target_config.vocab_size, hidden_size=hidden,
        intermediate_size=int(hidden * 2.5) // 64 * 64 or hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        max_position_embeddings=target_config.max_position_embeddings,
        bos_token_id=target_config.bos_token_id, eos_token_id=target_config.eos_token_id,
        pad_token_id=getattr(target_config, "pad_token_id", None),
        tie_word_embeddings=True, rope_theta=getattr(target_config, "rope_theta", 10000.0),
    )


def batches(token_lists, batch: int, seq: int, rng: random.Random):
    """Endless stream of [batch, seq] windows cut from the concatenated texts."""
    import torch

    stream = [t for ids in token_lists for t in ids]
    if len(stream) <= seq + 1:
        stream = stream * (seq // max(len(stream), 1) + 2)
    while True:
        starts = [rng.randrange(0, len(stream) - seq) for _ in range(batch)]
        yield torch.tensor([stream[s:s + seq] for s in starts])


def agreement(student, teacher, token_lists, seq: int, device) -> float:
    import torch

    hits = total = 0
    with torch.no_grad():
        for ids in token_lists:
            x = torch.tensor([ids[:seq]], device=device)
            if x.shape[1] < 2:
                continue
            a = teacher(x).logits.argmax(-1)
            b = student(x).logits.argmax(-1)
            hits += int((a == b).sum())
            total += a.numel()
    return hits / max(total, 1)


def distill(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from fly_vllm.models import resolve_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target_path = resolve_model(args.target)
    tok = AutoTokenizer.from_pretrained(target_path)
    teacher = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    teacher.to(device).eval()
    torch.manual_seed(args.seed)
    student = LlamaForCausalLM(student_config(teacher.config, args.hidden, args.layers,
                                              args.heads)).to(device)
    n_params = sum(p.numel() for p in student.parameters())
    print(f"[distill] target {target_path}; student {n_params / 1e6:.1f} M params "
          f"on {device}", file=sys.stderr, flush=True)

    train = [tok(t)["input_ids"] for t in _texts(tok, args.gsm8k, args.sharegpt)]
    held = [tok(t)["input_ids"] for t in _texts(tok, args.heldout, args.heldout,
                                                 skip=max(args.gsm8k, args.sharegpt))]
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    before = agreement(student, teacher, held, args.seq, device)
    t0 = time.time()
    losses = []
    step = 0
    for step, x in enumerate(batches(train, args.batch, args.seq, rng), 1):
        x = x.to(device)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(x).logits.float(), -1)
        s_logp = F.log_softmax(student(x).logits.float(), -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") / x.shape[1]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % args.log_every == 0 or step == 1:
            print(f"[distill] step {step}/{args.steps} KL {loss:.3f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        if step >= args.steps or (time.time() - t0) / 60 > args.max_minutes:
            break
    after = agreement(student, teacher, held, args.seq, device)
    out = Path(args.out)
    student.to(torch.bfloat16 if args.save_bf16 else torch.float32)
    student.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    weights = out / "model.safetensors"
    manifest = {
        "what": "FLy draft distilled from the target (KL(target||draft) on chat-"
                "formatted GSM8K-train answers and ShareGPT prompts)",
        "target": str(target_path), "params": n_params,
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "seq",
                                                 "batch", "lr", "seed", "gsm8k",
                                                 "sharegpt", "heldout")},
        "steps": step, "minutes": round((time.time() - t0) / 60, 2), "device": str(device),
        "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "heldout_top1_agreement": {"before": before, "after": after},
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "bytes": weights.stat().st_size,
    }
    (out / "fly_manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"[distill] held-out top-1 agreement {before:.3f} -> {after:.3f}; wrote {out}",
          file=sys.stderr, flush=True)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fly_vllm.distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default=None, help="default: embedded SmolLM2-135M")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gsm8k", type=int, default=7000, help="GSM8K-train items to train on")
    ap.add_argument("--sharegpt", type=int, default=7000, help="ShareGPT items to train on")
    ap.add_argument("--heldout", type=int, default=100, help="held-out items of each")
    ap.add_argument("--max-minutes", type=float, default=60.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--save-bf16", action=argparse.BooleanOptionalAction, default=True)
    distill(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
