"""Robustness of the serving path: load, faults and bad input, with figures.

    # against a running server (a MI355X node, or one started by hand)
    python benchmarks/serve_robustness.py --url http://NODE:8000
    # start a local server first (here: the embedded SmolLM2 with n-gram FLy)
    python benchmarks/serve_robustness.py --launch smollm2 \\
        --speculative-config configs/smollm2-demo-ngram.json

The checks are in fly_vllm/bench/robustness.py. Written to --out: report.md
and results.json (requests, completions, clean errors, failures, health after
each check and, for a launched server, its resident memory after each load
round). Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

from fly_vllm.bench import robustness as rb
from fly_vllm.bench.harness import environment
from fly_vllm.bench.serve import discover_model

CPU_SERVE_ARGS = "--enforce-eager --max-model-len 2048 --max-num-seqs 16"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="server root, e.g. http://node:8000")
    where.add_argument("--launch", metavar="MODEL",
                       help="start `fly-vllm serve MODEL` here ('smollm2': the embedded one)")
    ap.add_argument("--speculative-config",
                    help="fly.json for --launch ('none': serve without speculation)")
    ap.add_argument("--serve-args", default=CPU_SERVE_ARGS,
                    help=f"more `vllm serve` arguments for --launch (default {CPU_SERVE_ARGS!r})")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128, help="requests per load round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32, help="per load request")
    ap.add_argument("--checks", default=",".join(rb.CHECKS),
                    help=f"comma-separated subset of {','.join(rb.CHECKS)} (default: all)")
    ap.add_argument("--tie-nats", type=float, default=0.0,
                    help="mixed_batch: accept a changed strict answer whose first changed "
                         "token was a near-tie within this many nats (default 0: identical; "
                         "bf16 servers can flip near-ties when the batch changes)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    unknown = set(args.checks) - set(rb.CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(rb.CHECKS)}")
    if args.launch and not args.speculative_config:
        ap.error("--launch needs --speculative-config (a fly.json)")
    return args


def write_report(out: Path, env: dict, settings: dict, checks: list[dict]) -> None:
    lines = ["# Serving robustness", "", f"- command: `{env['command']}`",
             f"- date: {env['date']}", f"- machine: {env['machine']}",
             f"- versions: {json.dumps(env['versions'])}",
             f"- server: {json.dumps(settings)}", "",
             "| check | requests | completed | clean 4xx | failures | healthy after | s |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['name']} | {c['requests']} | {c['completed']} | "
                     f"{c['clean_errors']} | {len(c['failures'])} | {c['healthy_after']} | "
                     f"{c['seconds']} |")
    load = next((c for c in checks if c["name"] == "load"), {"detail": {"rounds": []}})
    lines += ["", "Load rounds:", "", "| round | completed | clean errors | failures | wall s "
              "| slowest request s | output tokens | server RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in load["detail"]["rounds"]:
        lines.append(f"| {r['round']} | {r['completed']} | {r['clean_errors']} | {r['failures']} "
                     f"| {r['wall_s']} | {r['max_request_s']} | {r['output_tokens']} | "
                     f"{r.get('server_rss_mib', 'n/a')} |")
    bad = next((c for c in checks if c["name"] == "bad input"), {"detail": {"answers": []}})
    lines += ["", "Bad input, and the server's answer:", ""]
    lines += [f"- {a['case']}: {a['answer']}" for a in bad["detail"]["answers"]]
    ties = [t for c in checks for t in c["detail"].get("near_ties", [])]
    if ties:
        lines += ["", f"Strict answers that changed in a mixed batch at a near-tie of the "
                  f"target (gap in nats at the first changed token): {ties}"]
    failures = [(c["name"], f) for c in checks for f in c["failures"]]
    lines += ["", "Failures:" if failures else "No failures.", ""]
    lines += [f"- {name}: {f}" for name, f in failures]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("benchmarks/results") / f"robustness-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    progress = lambda msg: print(f"[fly-robustness] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.launch:
        from fly_vllm.bench.server import launched
        from fly_vllm.models import resolve_model

        model = resolve_model(None if args.launch == "smollm2" else args.launch)
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        progress(f"starting fly-vllm serve {model} (log: {out / 'server.log'})")
        spec = None if args.speculative_config == "none" else args.speculative_config
        ctx = launched(model, spec, out / "server.log",
                       *shlex.split(args.serve_args))
    else:
        ctx = nullcontext(None)
    with ctx as server:
        base = server.base if server else args.url.rstrip("/")
        model = discover_model(base)
        settings = {"url": args.url or "launched locally", "model": model,
                    "speculative_config": args.speculative_config,
                    "serve_args": args.serve_args if server else None,
                    "checks": args.checks, "tie_nats": args.tie_nats}
        checks = rb.run_all(base, model, only=args.checks, tie_nats=args.tie_nats,
                            rss=server.rss_bytes if server else None, progress=progress,
                            load={"clients": args.clients, "requests_per_round": args.requests,
                                  "rounds": args.rounds, "max_tokens": args.max_tokens})
    rows = [rb.as_dict(c) for c in checks]
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "settings": settings, "checks": rows}, indent=1))
    write_report(out, env, settings, rows)
    print((out / "report.md").read_text())
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
