"""What installing fly-vllm costs against vLLM's own speculative decoding.

    python benchmarks/overhead.py [--rounds 3] [--max-tokens 128] [--out DIR]
    python benchmarks/overhead.py --paired [--rounds 5] [--modes ...]

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
drift on a shared machine falls on all modes alike. On a machine whose speed
drifts within a round, ``--paired`` pairs more tightly: every mode's engine
stays up in its own process (the same in-process engine as above) and the
modes take turns prompt by prompt, so each prompt's timings are seconds
apart; a FLy mode's ratio is then its speed over vLLM's n-gram's on the same
prompt and round, reported as the median over all pairs with a
distribution-free 95% interval, beside the ratio of total times per round. Reported: tok/s per mode
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


def serve_worker(spec_json: str, max_model_len: int = 1024) -> int:
    """One mode's engine, kept up: reads prompts (JSON lines) on stdin and
    answers each with its tokens and wall time, until stdin closes."""
    import time

    from vllm import LLM, SamplingParams

    from fly_vllm.bench.offline import DEFAULT_ENGINE
    from fly_vllm.demo import PROMPTS
    from fly_vllm.models import resolve_model

    engine = {**DEFAULT_ENGINE, "max_model_len": max_model_len, "max_num_seqs": 1}
    llm = LLM(model=resolve_model(None), speculative_config=json.loads(spec_json), **engine)
    warm = SamplingParams(max_tokens=32, temperature=0.0)
    llm.chat([[{"role": "user", "content": PROMPTS[0]}]], warm, use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        params = SamplingParams(max_tokens=ask["max_tokens"], temperature=0.0)
        t0, c0 = time.perf_counter(), time.process_time()
        out = llm.chat([[{"role": "user", "content": ask["prompt"]}]], params,
                       use_tqdm=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu,
                                      "token_ids": list(out[0].outputs[0].token_ids)}),
              flush=True)
    return 0


class _Engine:
    """A serve_worker process (its own process group, killed on close)."""

    def __init__(self, name: str, spec: dict | None, log: Path):
        import subprocess

        from fly_vllm.bench.offline import worker_env

        self.name, self._log = name, open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-worker", json.dumps(spec)],
            env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, start_new_session=True)
        self._read("READY")

    def _read(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        raise SystemExit(f"[overhead] {self.name}: its engine stopped; see {self._log.name}")

    def ask(self, prompt: str, max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT"))

    def close(self) -> None:
        import os
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median and a distribution-free interval for it: the order
    statistics k and n + 1 - k with P(k <= Binomial(n, 1/2) < n + 1 - k) at
    least ``level``."""
    xs, n = sorted(values), len(values)
    pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    k = 0  # the widest tail such that the interval still covers `level`
    while k + 1 <= n // 2 and 1 - 2 * sum(pmf[:k + 1]) >= level:
        k += 1
    lo, hi = (xs[k - 1], xs[n - k]) if k else (xs[0], xs[-1])
    return statistics.median(xs), lo, hi


def run_paired(names: list[str], specs: dict, prompts: list[str], rounds: int,
               max_tokens: int, raw: Path) -> list[dict]:
    """Every mode's engine up at once; per round and prompt, the modes in
    turn (the order rotated each time). Returns one row per (round, prompt,
    mode): seconds and tokens."""
    engines: dict[str, _Engine] = {}
    rows = []
    try:
        for name in names:
            print(f"[overhead] starting {name}", file=sys.stderr, flush=True)
            engines[name] = _Engine(name, specs[name], raw / f"{name.replace(' ', '-')}.log")
        turn = 0
        for r in range(rounds):
            for i, prompt in enumerate(prompts):
                order = names[turn % len(names):] + names[:turn % len(names)]
                turn += 1
                for name in order:
                    res = engines[name].ask(prompt, max_tokens)
                    rows.append({"round": r + 1, "prompt": i, "mode": name, **res})
            print(f"[overhead] round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.close()
    return rows


def paired_report(rows: list[dict], names: list[str], rounds: int) -> tuple[list[str], dict]:
    """Lines of the paired report's table and its figures."""
    at = {(x["round"], x["prompt"], x["mode"]): x for x in rows}
    keys = sorted({(x["round"], x["prompt"]) for x in rows})
    ref = "target alone" if "target alone" in names else "vllm ngram"
    figures, lines = {}, [
        "| mode | tok/s (all rounds) | vs vLLM n-gram, per prompt: median [95% interval] "
        "| vs vLLM n-gram, per round: median [range] | by CPU time, per prompt: median "
        "[95% interval] | outputs = target's |",
        "|---|---|---|---|---|---|"]
    for n in names:
        secs = sum(at[k + (n,)]["seconds"] for k in keys)
        toks = sum(len(at[k + (n,)]["token_ids"]) for k in keys)
        per_prompt = [(len(at[k + (n,)]["token_ids"]) / at[k + (n,)]["seconds"])
                      / (len(at[k + ("vllm ngram",)]["token_ids"])
                         / at[k + ("vllm ngram",)]["seconds"]) for k in keys]
        per_round = []
        for r in range(1, rounds + 1):
            ks = [k for k in keys if k[0] == r]
            speed = (sum(len(at[k + (n,)]["token_ids"]) for k in ks)
                     / sum(at[k + (n,)]["seconds"] for k in ks))
            ng = (sum(len(at[k + ("vllm ngram",)]["token_ids"]) for k in ks)
                  / sum(at[k + ("vllm ngram",)]["seconds"] for k in ks))
            per_round.append(speed / ng)
        # The same ratio from the engine process's CPU seconds per token
        # instead of wall seconds: what another tenant's load, which only
        # delays the process, does not enter.
        by_cpu = [(len(at[k + (n,)]["token_ids"]) / at[k + (n,)]["cpu_seconds"])
                  / (len(at[k + ("vllm ngram",)]["token_ids"])
                     / at[k + ("vllm ngram",)]["cpu_seconds"]) for k in keys]
        med, lo, hi = median_interval(per_prompt)
        cmed, clo, chi = median_interval(by_cpu)
        same = all(at[k + (n,)]["token_ids"] == at[k + (ref,)]["token_ids"] for k in keys)
        figures[n] = {"tok_s": toks / secs, "per_prompt_ratio": per_prompt,
                      "median": med, "interval95": [lo, hi], "per_round_ratio": per_round,
                      "cpu_ratio": by_cpu, "cpu_median": cmed, "cpu_interval95": [clo, chi],
                      "outputs_equal_target": same}
        lines.append(f"| {n} | {toks / secs:.1f} | {med:.3f}x [{lo:.3f}, {hi:.3f}] | "
                     f"{statistics.median(per_round):.3f}x [{min(per_round):.3f}, "
                     f"{max(per_round):.3f}] | {cmed:.3f}x [{clo:.3f}, {chi:.3f}] | "
                     f"{'all' if same else 'NOT all'} |")
    return lines, figures


def paired_main(args, names, specs, prompts, out: Path, raw: Path, env: dict) -> int:
    rows = run_paired(names, specs, prompts, args.rounds, args.max_tokens, raw)
    table, figures = paired_report(rows, names, args.rounds)
    lines = ["# What installing fly-vllm costs: strict FLy against vLLM's own n-gram "
             "speculation, paired prompt by prompt", "",
             f"- command: `{env['command']}`", f"- date: {env['date']}",
             f"- machine: {env['machine']}; CPU flags: {', '.join(env['cpu_flags'])}",
             f"- versions: {json.dumps(env['versions'])}; OMP_NUM_THREADS="
             f"{env['worker_env'].get('OMP_NUM_THREADS')}",
             f"- setup: SmolLM2-135M-Instruct fp32, V1 runner, n-gram 2-4, K={args.k}, the "
             f"demo's {len(prompts)} prompts, greedy, one at a time, {args.max_tokens} new "
             f"tokens; every mode's engine up at once in its own process, the modes in turn "
             f"for each prompt (order rotated), {args.rounds} rounds: "
             f"{args.rounds * len(prompts)} pairs per mode", "", *table, "",
             "Per prompt: the mode's tok/s over vLLM's n-gram's on the same prompt in the same "
             "round, seconds apart; the interval is the median's distribution-free 95% "
             "interval (order statistics). Per round: total tokens over total time, over "
             "vLLM's n-gram's in the same round. By CPU time: the per-prompt ratio with "
             "the engine process's CPU seconds (all its threads) in place of wall seconds, "
             "which time lost to other processes on the machine does not enter."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"env": env, "args": vars(args), "figures": figures,
         "rows": [{k: v for k, v in x.items() if k != "token_ids"} | {
             "tokens": len(x["token_ids"])} for x in rows]}, indent=1))
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--modes", default=None,
                    help="comma-separated subset of the modes (default: all four)")
    ap.add_argument("--paired", action="store_true",
                    help="all engines up at once, the modes in turn prompt by prompt")
    ap.add_argument("--out", default=None)
    ap.add_argument("--serve-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_worker is not None:
        return serve_worker(args.serve_worker)
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
    if args.paired:
        return paired_main(args, names, specs, PROMPTS, out, raw, environment(args))
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
