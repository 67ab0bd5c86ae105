"""What installing fly-vllm costs against vLLM's own speculative decoding.

    python benchmarks/overhead.py [--rounds 3] [--max-tokens 128] [--out DIR]

The setup a new user would try first: the embedded SmolLM2-135M (fp32,
vLLM's model runner V1 on this CPU), n-gram drafting (prompt lookup 2-4),
K = 8, the demo's 12 prompts, greedy, one request at a time. Modes, each
in a fresh engine process (fly_vllm.bench.offline: a warm-up request, then
the 12 timed):

    target alone   no speculation
    vllm ngram     vLLM's own speculative decoding ("method": "ngram")
    fly strict     "method": "fly" with "strict": true, same drafter and K
    fly gated      FLy's loose rule with an entropy threshold no top-3 entropy
                   reaches (ln 3): the whole loose path runs, nothing is
                   accepted loosely, so its tokens and accepts are strict's and
                   only its cost differs

Rounds are interleaved (every mode once per round, the order rotated), so
drift on a shared machine falls on all modes alike. Reported: tok/s per mode
and round, each FLy mode's ratio to vLLM's n-gram in the same round (median
and range), whether every output equals the target's own, and the
environment (command, machine, CPU flags, versions). Speed needs a quiet
machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NGRAM = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}


def modes(k: int) -> dict[str, dict | None]:
    fly = {"method": "fly", **NGRAM, "num_speculative_tokens": k}
    return {
        "target alone": None,
        "vllm ngram": {"method": "ngram", **NGRAM, "num_speculative_tokens": k},
        "fly strict": {**fly, "fly": {"strict": True}},
        "fly gated": {**fly, "fly": {"entropy_threshold": math.log(3), "window": 4}},
    }


def run_round(model: str, prompts: list[str], specs: dict, order: list[str],
              max_tokens: int, raw: Path, r: int) -> dict[str, dict]:
    from fly_vllm.bench.offline import run_mode

    out = {}
    for name in order:
        requests = [{"messages": [{"role": "user", "content": p}], "group": "prompts",
                     "max_tokens": max_tokens, "temperature": 0.0} for p in prompts]
        job = {"model": model, "spec": specs[name], "requests": requests,
               "concurrency": 1, "engine": {"max_model_len": 1024, "max_num_seqs": 1}}
        slug = name.replace(" ", "-")
        print(f"[overhead] round {r + 1}: {name}", file=sys.stderr, flush=True)
        res = run_mode(job, log_path=str(raw / f"r{r}-{slug}.log"))
        tokens = [x["token_ids"] for x in res["results"]]
        n = sum(len(t) for t in tokens)
        c = res["counters"]
        out[name] = {"tok_s": n / res["elapsed"], "elapsed_s": res["elapsed"],
                     "output_tokens": n, "token_ids": tokens,
                     "spec_decode_drafts": c.get("vllm:spec_decode_num_drafts", 0),
                     "spec_decode_accepted": c.get("vllm:spec_decode_num_accepted_tokens", 0),
                     "fly_loose_accepted": c.get("vllm:fly_loose_accepted_tokens", 0)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--modes", default=None,
                    help="comma-separated subset of the modes (default: all four)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from fly_vllm.bench.harness import environment
    from fly_vllm.demo import PROMPTS
    from fly_vllm.models import resolve_model

    model = resolve_model(None)
    specs = modes(args.k)
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",")]
        unknown = [m for m in wanted if m not in specs]
        if unknown or "vllm ngram" not in wanted:
            raise SystemExit(f"--modes: choose from {list(specs)}, with 'vllm ngram' (the "
                             f"reference); got {args.modes!r}")
        specs = {m: specs[m] for m in wanted}
    names = list(specs)
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"overhead-{dt.datetime.now():%Y%m%d-%H%M%S}")
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rounds.append(run_round(model, PROMPTS, specs, order, args.max_tokens, raw, r))
    # The target's own tokens, or, without that mode, vLLM's n-gram's (equal
    # to the target's in every run so far).
    ref = "target alone" if "target alone" in names else "vllm ngram"
    target = rounds[0][ref]["token_ids"]
    same = {n: all(rd[n]["token_ids"] == target for rd in rounds) for n in names}
    ratio = {n: [rd[n]["tok_s"] / rd["vllm ngram"]["tok_s"] for rd in rounds]
             for n in names}
    env = environment(args)
    lines = ["# What installing fly-vllm costs: strict FLy against vLLM's own n-gram "
             "speculation", "",
             f"- command: `{env['command']}`", f"- date: {env['date']}",
             f"- machine: {env['machine']}; CPU flags: {', '.join(env['cpu_flags'])}",
             f"- versions: {json.dumps(env['versions'])}; OMP_NUM_THREADS="
             f"{env['worker_env'].get('OMP_NUM_THREADS')}",
             f"- setup: SmolLM2-135M-Instruct fp32, V1 runner, n-gram 2-4, K={args.k}, the "
             f"demo's {len(PROMPTS)} prompts, greedy, one at a time, {args.max_tokens} new "
             f"tokens, {args.rounds} interleaved rounds (order rotated)", "",
             "| mode | " + " | ".join(f"round {r + 1} tok/s" for r in range(args.rounds))
             + " | vs vLLM n-gram: median [range] | mean acc. len | outputs = target's |",
             "|---|" + "---|" * (args.rounds + 3)]
    for n in names:
        rd0 = rounds[0][n]
        mal = (1 + rd0["spec_decode_accepted"] / rd0["spec_decode_drafts"]
               if rd0["spec_decode_drafts"] else None)
        lines.append(
            f"| {n} | " + " | ".join(f"{rd[n]['tok_s']:.1f}" for rd in rounds)
            + f" | {statistics.median(ratio[n]):.3f}x [{min(ratio[n]):.3f}, "
              f"{max(ratio[n]):.3f}] | {f'{mal:.2f}' if mal else '-'} | "
              f"{'all' if same[n] else 'NOT all'} |")
    if ref != "target alone":
        lines += ["", "Outputs compared with vLLM's n-gram's (the target alone was not run)."]
    lines += ["", "A ratio is this mode's tok/s over vLLM's n-gram's in the same round. "
              "Loose accepts in `fly gated`: "
              + ", ".join(str(rd["fly gated"]["fly_loose_accepted"]) for rd in rounds
                          if "fly gated" in rd)
              + " (by design none)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"env": env, "args": vars(args), "rounds": [{n: {k: v for k, v in m.items()
                                                         if k != "token_ids"}
                                                     for n, m in rd.items()} for rd in rounds],
         "ratio_to_vllm_ngram": ratio, "outputs_equal_target": same}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
