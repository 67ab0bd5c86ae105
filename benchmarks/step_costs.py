"""Where a speculative step's time goes: vLLM's own verification against
fly-vllm's, measured inside the engine (model runner V1, this CPU).

    python benchmarks/step_costs.py [--rounds 2] [--out DIR]

The setup of benchmarks/overhead.py (SmolLM2-135M fp32, n-gram 2-4, K = 8,
the demo's 12 prompts, greedy, one at a time, 128 tokens); each mode in a
fresh in-process engine, whose runner methods are wrapped with timers after
the warm-up request:

    execute_model        the target's forward pass (and the drafter's input)
    sample_tokens        verification, bonus sampling, bookkeeping
    rejection forward    vLLM's RejectionSampler.forward (FLy's, for FLy)
    verification         vLLM's rejection_sample, or FLy's fly_rejection_sample

Reported per mode and round: milliseconds per step of each, and tok/s. A
step's per-call Python runs with caches the forward pass has just evicted,
so these are several times what the same calls take in a tight loop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NGRAM = {"prompt_lookup_min": 2, "prompt_lookup_max": 4, "num_speculative_tokens": 8}
MODES = {
    "vllm ngram": {"method": "ngram", **NGRAM},
    "fly strict": {"method": "fly", **NGRAM, "fly": {"strict": True}},
    "fly gated": {"method": "fly", **NGRAM,
                  "fly": {"entropy_threshold": math.log(3), "window": 4}},
}


def _timed(owner, name: str, key: str, total: dict, calls: Counter) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[key] += time.perf_counter() - t
            calls[key] += 1

    setattr(owner, name, wrapper)


def worker(mode: str, max_tokens: int) -> dict:
    """One mode in this process: per-step milliseconds and tok/s."""
    from vllm import LLM, SamplingParams

    from fly_vllm.demo import PROMPTS
    from fly_vllm.models import resolve_model

    llm = LLM(model=resolve_model(None), speculative_config=MODES[mode], max_model_len=1024,
              max_num_seqs=1, enforce_eager=True, dtype="float32", seed=0)
    import vllm.v1.sample.rejection_sampler as rs
    import vllm.v1.worker.gpu_model_runner as runner

    total: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.chat([[{"role": "user", "content": PROMPTS[0]}]], params, use_tqdm=False)  # warm-up
    _timed(runner.GPUModelRunner, "execute_model", "execute_model", total, calls)
    _timed(runner.GPUModelRunner, "sample_tokens", "sample_tokens", total, calls)
    _timed(rs.RejectionSampler, "forward", "rejection forward", total, calls)
    if mode.startswith("fly"):
        from fly_vllm.runners import v1

        _timed(v1.FlyRejectionSampler, "fly_rejection_sample", "verification", total, calls)
    else:
        _timed(rs, "rejection_sample", "verification", total, calls)
    t0, tokens = time.perf_counter(), 0
    for prompt in PROMPTS:
        out = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)
        tokens += len(out[0].outputs[0].token_ids)
    wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "steps": calls["sample_tokens"],
            **{k: 1e3 * v / calls[k] for k, v in total.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.max_tokens)))
        return 0
    from fly_vllm.bench.harness import environment
    from fly_vllm.bench.offline import worker_env

    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"step-costs-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(MODES)
    for r in range(args.rounds):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            print(f"[step-costs] round {r + 1}: {mode}", file=sys.stderr, flush=True)
            p = subprocess.run([sys.executable, __file__, "--worker", mode, "--max-tokens",
                                str(args.max_tokens)], env=worker_env(), capture_output=True,
                               text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
            rows.append({"round": r + 1, "mode": mode, **json.loads(line[0][7:])})
    env = environment(args)
    keys = ("execute_model", "sample_tokens", "rejection forward", "verification")
    lines = ["# Where a step's time goes: vLLM's verification against fly-vllm's", "",
             f"- command: `{env['command']}`", f"- date: {env['date']}",
             f"- machine: {env['machine']}; CPU flags: {', '.join(env['cpu_flags'])}",
             f"- versions: {json.dumps(env['versions'])}; OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', env['worker_env'].get('OMP_NUM_THREADS'))}",
             "- setup: SmolLM2-135M-Instruct fp32, V1 runner, n-gram 2-4, K=8, the demo's 12 "
             f"prompts, greedy, one at a time, {args.max_tokens} tokens; ms per step", "",
             "| round | mode | steps | tok/s | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['round']} | {row['mode']} | {row['steps']} | {row['tok_s']:.1f} | "
                     + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in keys) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
