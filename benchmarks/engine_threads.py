"""Engine process and thread settings on a small CPU machine, measured.

    python benchmarks/engine_threads.py --model TARGET --drafter DRAFT \
        [--limit 6] [--max-tokens 64] [--concurrency 1,3] [--out DIR]

Runs the same benchmark (run_bench.py, GSM8K prompts, greedy, strict
speculation and no speculation) under each setting below, each in fresh
processes, and writes one table of output tokens/s (report.md, results.json):

    in-process        VLLM_ENABLE_V1_MULTIPROCESSING=0, OMP_NUM_THREADS = cores
                      (what the demo and the offline benchmark use)
    mp, auto bind     VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's default binding
                      (VLLM_CPU_OMP_THREADS_BIND=auto: what `vllm serve` gets)
    mp, all cores     multiprocess, VLLM_CPU_OMP_THREADS_BIND=0-(cores-1)
    mp, nobind        multiprocess, VLLM_CPU_OMP_THREADS_BIND=nobind,
                      OMP_NUM_THREADS = cores

On CPU vLLM's multiprocess engine runs a multiprocess executor, whose "auto"
binding reserves one core for the engine-core process and gives the model
worker's OpenMP threads the rest: on 2 cores, one thread. The worker logs
the binding it got ("OpenMP thread binding info"); the report quotes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings(cores: int) -> dict[str, dict[str, str]]:
    every = f"0-{cores - 1}" if cores > 1 else "0"
    return {
        "in-process": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(cores)},
        "mp, auto bind": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                          "VLLM_CPU_OMP_THREADS_BIND": "auto"},
        "mp, all cores": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                          "VLLM_CPU_OMP_THREADS_BIND": every},
        "mp, nobind": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(cores)},
    }


def binding(raw_dir: Path) -> str:
    """The worker's logged OpenMP binding (core ids), or '-' (in-process)."""
    for log in sorted(raw_dir.glob("*.log")):
        m = re.search(r"local_rank=0, core ids=(\[[^\]]*\])", log.read_text(errors="replace"))
        if m:
            return m.group(1)
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--drafter", required=True, help="draft model, or 'ngram'")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,3")
    ap.add_argument("--modes", default="nospec,strict")
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("--engine", default='{"dtype": "bfloat16"}')
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 2
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"engine-threads-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    chosen = settings(cores)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    for i, (name, env_over) in enumerate(chosen.items(), 1):
        sub = out / re.sub(r"[^a-z0-9]+", "-", name).strip("-")
        print(f"[engine-threads] [{i}/{len(chosen)}] {name}: {env_over}", file=sys.stderr,
              flush=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                            "VLLM_ENABLE_V1_MULTIPROCESSING")}
        env.update(env_over)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run_bench.py"),
               "--model", args.model, "--drafter", args.drafter, "-k", str(args.k),
               "--modes", args.modes, "--datasets", "gsm8k", "--limit", str(args.limit),
               "--max-tokens", str(args.max_tokens), "--temperatures", "0",
               "--concurrency", args.concurrency, "--engine", args.engine, "--out", str(sub)]
        r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            print(f"[engine-threads] {name} failed (rc {r.returncode})", file=sys.stderr)
            rows.append({"setting": name, "env": env_over, "failed": r.returncode})
            continue
        res = json.loads((sub / "results.json").read_text())
        bound = binding(sub / "raw")
        for t in res["table"]:
            rows.append({"setting": name, "env": env_over, "binding": bound,
                         "mode": t["mode"], "concurrency": t["concurrency"],
                         "tok_s": t["metrics"]["tok_s"],
                         "mean_accepted_length": t["metrics"]["mean_accepted_length"]})
    base = {(r["mode"], r["concurrency"]): r["tok_s"] for r in rows
            if r["setting"] == "in-process" and "tok_s" in r}
    lines = ["# Engine process and thread settings", "",
             f"- command: `{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- machine: {cores} cores; one run per setting, GSM8K prompts, greedy, "
             f"{args.limit} requests, {args.max_tokens} new tokens; read tok/s as ratios "
             "within this run", "",
             "| setting | worker's OpenMP cores | mode | at once | tok/s | vs in-process "
             "| mean acc. len |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['setting']} | – | failed (rc {r['failed']}) | | | | |")
            continue
        b = base.get((r["mode"], r["concurrency"]))
        mal = r["mean_accepted_length"]
        ratio = f"{r['tok_s'] / b:.2f}x" if b else "–"
        lines.append(f"| {r['setting']} | {r['binding']} | {r['mode']} | {r['concurrency']} "
                     f"| {r['tok_s']:.1f} | {ratio} | {f'{mal:.2f}' if mal else '–'} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)},
                                                 indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
