"""Load one OpenAI-compatible endpoint, or compare several, from outside.

    python benchmarks/bench_serve.py --endpoint fly=http://NODE:8000 \\
        --endpoint strict=http://NODE:8001 --concurrency 1,8,32 --limit 64

An endpoint is ``NAME=URL`` (the server root). ``--xargs NAME=JSON`` sends
per-request settings to that endpoint's requests (vLLM's ``vllm_xargs``),
so one FLy server can be compared with itself in strict mode:
``--endpoint fly=URL --endpoint strict=URL --xargs 'strict={"fly_strict": true}'``.

For each concurrency level the prompts are split into ``--rounds`` slices.
Every slice is sent to every endpoint in turn, alternating the order from
round to round (A B, B A, ...), so drift of the machine or the network
falls on all endpoints alike; the phases never overlap, so each endpoint's
``/metrics`` delta is its own even when two names share one server.
Requests stream; a request rate (Poisson arrivals, seeded) is optional, and
concurrency caps the requests in flight.

Per endpoint and level: requests done and failed, output tokens/s,
requests/s, time to first token, time per output token (after the first)
and end-to-end latency at p50/p90/p99, and, from ``/metrics``, the mean
accepted length, the acceptance rate and FLy's loose-accept rate. Each
endpoint's throughput and p50 latencies are also given as ratios to the
first endpoint's. Written to --out: report.md, results.json, serve.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fly_vllm.bench import datasets as ds
from fly_vllm.bench.offline import PROGRESS, acceptance, counter_delta
from fly_vllm.bench.remote import fetch_metrics, stream_chat

QUANTILES = (50, 90, 99)


@dataclass
class Endpoint:
    name: str
    url: str
    model: str | None = None
    xargs: dict = field(default_factory=dict)


def parse_endpoint(text: str) -> Endpoint:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"an endpoint is NAME=URL with an http(s) URL, e.g. fly=http://node:8000; "
            f"got {text!r}")
    return Endpoint(name, url.rstrip("/"))


def parse_xargs(text: str) -> tuple[str, dict]:
    name, sep, blob = text.partition("=")
    try:
        value = json.loads(blob)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--xargs {name}: not JSON ({e})") from None
    if not sep or not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"--xargs is NAME=JSON object, e.g. 'strict={{\"fly_strict\": true}}'; "
            f"got {text!r}")
    return name, value


def discover_model(url: str) -> str:
    import requests

    r = requests.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def percentiles(xs: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation between order statistics)."""
    if not xs:
        return {f"p{q}": None for q in QUANTILES}
    if len(xs) == 1:
        return {f"p{q}": xs[0] for q in QUANTILES}
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    return {f"p{q}": cuts[q - 1] for q in QUANTILES}


def _timed(client, ep: Endpoint, req: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        rec = stream_chat(client, ep.model, req, extra_body={"vllm_xargs": ep.xargs}
                          if ep.xargs else None, timeout=timeout)
        rec["error"] = None
    except Exception as e:  # every failure is recorded, none stops the run
        rec = {"id": req.get("id"), "n_tokens": 0, "ttft": None,
               "latency": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    n, ttft = rec["n_tokens"], rec["ttft"]
    rec["tpot"] = (rec["latency"] - ttft) / (n - 1) if ttft is not None and n > 1 else None
    rec.pop("text", None)
    return rec


def run_phase(ep: Endpoint, reqs: list[dict], concurrency: int, rate: float | None,
              seed: int = 0, timeout: float = 600) -> dict:
    """Send `reqs` to one endpoint with at most `concurrency` in flight,
    arriving as a Poisson process of `rate` requests/s (None: all at once)."""
    from openai import OpenAI

    client = OpenAI(base_url=ep.url + "/v1", api_key="EMPTY", timeout=timeout,
                    max_retries=0)
    rng = random.Random(seed)
    before = fetch_metrics(ep.url)
    done = [0]
    lock = threading.Lock()

    def task(req):
        rec = _timed(client, ep, req, timeout)
        with lock:
            done[0] += 1
            print(f"{PROGRESS}    {ep.name}: {done[0]}/{len(reqs)}", file=sys.stderr,
                  flush=True)
        return rec

    t0 = time.perf_counter()
    arrival = 0.0
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = []
        for req in reqs:
            if rate:
                arrival += rng.expovariate(rate)
                time.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            futures.append(pool.submit(task, req))
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    after = fetch_metrics(ep.url)
    counters = counter_delta(after, before) if before is not None and after is not None \
        else None
    return {"results": results, "wall_s": wall, "counters": counters}


def summarize(phases: list[dict]) -> dict:
    results = [r for p in phases for r in p["results"]]
    ok = [r for r in results if r["error"] is None]
    wall = sum(p["wall_s"] for p in phases)
    tokens = sum(r["n_tokens"] for r in ok)
    ms = lambda xs: percentiles([x * 1000 for x in xs if x is not None])  # noqa: E731
    out = {
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "output_tokens": tokens, "wall_s": wall,
        "output_tok_s": tokens / wall if wall else None,
        "requests_s": len(ok) / wall if wall else None,
        "ttft_ms": ms([r["ttft"] for r in ok]),
        "tpot_ms": ms([r["tpot"] for r in ok]),
        "latency_ms": ms([r["latency"] for r in ok]),
        **acceptance({}),
    }
    if all(p["counters"] is not None for p in phases):
        c: dict = {}
        for p in phases:
            for k, v in p["counters"].items():
                if not isinstance(v, list):
                    c[k] = c.get(k, 0) + v
        out.update(acceptance(c), counters=c)
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def compare(endpoints: list[Endpoint], reqs: list[dict], levels: list[int],
            rate: float | None = None, rounds: int = 2, seed: int = 0,
            timeout: float = 600) -> dict:
    """Run every endpoint at every concurrency level, interleaved by round."""
    rounds = max(1, min(rounds, len(reqs)))
    slices = [reqs[i::rounds] for i in range(rounds)]
    rows, schedule = [], []
    for level in levels:
        phases: dict[str, list[dict]] = {ep.name: [] for ep in endpoints}
        for r, chunk in enumerate(slices):
            order = endpoints if r % 2 == 0 else endpoints[::-1]
            for ep in order:
                print(f"{PROGRESS}concurrency {level}, round {r + 1}/{rounds}: {ep.name} "
                      f"({len(chunk)} requests)", file=sys.stderr, flush=True)
                phases[ep.name].append(run_phase(ep, chunk, level, rate, seed + r, timeout))
                schedule.append({"concurrency": level, "round": r, "endpoint": ep.name})
        base = summarize(phases[endpoints[0].name])
        for ep in endpoints:
            s = summarize(phases[ep.name])
            s["vs_" + endpoints[0].name] = {
                "output_tok_s": _ratio(s["output_tok_s"], base["output_tok_s"]),
                "tpot_p50": _ratio(s["tpot_ms"]["p50"], base["tpot_ms"]["p50"]),
                "ttft_p50": _ratio(s["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
            }
            rows.append({"endpoint": ep.name, "concurrency": level, **s})
    return {"rows": rows, "schedule": schedule}


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def write_report(out: Path, env: dict, settings: dict, result: dict) -> None:
    base = settings["endpoints"][0]["name"]
    lines = [f"# Serving benchmark: {', '.join(e['name'] for e in settings['endpoints'])}",
             "", f"- command: `{env['command']}`", f"- date: {env['date']}",
             f"- client machine: {env['machine']}",
             f"- client versions: {json.dumps(env['versions'])}",
             "- endpoints: " + "; ".join(
                 f"{e['name']} = {e['url']} (model {e['model']}"
                 + (f", vllm_xargs {json.dumps(e['xargs'])}" if e["xargs"] else "") + ")"
                 for e in settings["endpoints"]),
             f"- prompts: {settings['items']}, max_tokens {settings['max_tokens']}, "
             f"temperature {settings['temperature']}, request rate "
             f"{settings['request_rate'] or 'unlimited'}, {settings['rounds']} interleaved "
             "rounds per level", "",
             "Latencies in ms as p50 / p90 / p99. TPOT is time per output token after "
             "the first. Ratios are to the first endpoint at the same concurrency "
             "(tok/s: higher is better; TPOT, TTFT: lower is better).", "",
             f"| conc. | endpoint | ok / failed | out tok/s | req/s | TTFT ms | TPOT ms | "
             f"latency ms | mean acc. len | accept rate | loose rate | tok/s vs {base} | "
             f"TPOT vs {base} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    q = lambda d: " / ".join(_f(d[f"p{x}"]) for x in QUANTILES)  # noqa: E731
    for r in result["rows"]:
        rel = r["vs_" + base]
        lines.append(
            f"| {r['concurrency']} | {r['endpoint']} | {r['ok']} / {r['failed']} | "
            f"{_f(r['output_tok_s'])} | {_f(r['requests_s'], '{:.2f}')} | {q(r['ttft_ms'])} | "
            f"{q(r['tpot_ms'])} | {q(r['latency_ms'])} | "
            f"{_f(r['mean_accepted_length'], '{:.2f}')} | "
            f"{_f(r['acceptance_rate'], '{:.1%}')} | {_f(r['loose_rate'], '{:.1%}')} | "
            f"{_f(rel['output_tok_s'], '{:.2f}x')} | {_f(rel['tpot_p50'], '{:.2f}x')} |")
    errors = [(r["endpoint"], r["concurrency"], e) for r in result["rows"] for e in r["errors"]]
    if errors:
        lines += ["", "Errors (first five distinct per row):", ""]
        lines += [f"- {name}, concurrency {c}: {e}" for name, c, e in errors]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["endpoint"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["endpoint"] == name]
        xs = [r["concurrency"] for r in rows]
        (line,) = a.plot(xs, [r["output_tok_s"] for r in rows], "o-", label=name)
        color = line.get_color()
        b.plot(xs, [r["tpot_ms"]["p50"] for r in rows], "o-", color=color,
               label=f"{name} p50")
        b.plot(xs, [r["tpot_ms"]["p90"] for r in rows], "x--", color=color, alpha=0.5,
               label=f"{name} p90")
    for ax, title in ((a, "output tokens/s"), (b, "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight (concurrency)")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=110)
    plt.close(fig)
    return "serve.png"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", type=parse_endpoint, action="append", required=True,
                    help="NAME=URL (repeat to compare; the first is the baseline)")
    ap.add_argument("--xargs", type=parse_xargs, action="append", default=[],
                    help="NAME=JSON: vllm_xargs for that endpoint's requests")
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    ap.add_argument("--datasets", default="gsm8k,humaneval,mtbench,sharegpt")
    ap.add_argument("--data", default=None, help="GSM8K-format jsonl")
    ap.add_argument("--limit", type=int, default=16, help="items per dataset (default 16)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32], help="comma-separated levels (default 1,8,32)")
    ap.add_argument("--request-rate", type=float, default=None,
                    help="requests/s, Poisson arrivals (default: all at once)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = [e.name for e in args.endpoint]
    if len(set(names)) != len(names):
        ap.error(f"endpoint names must differ; got {names}")
    for name, _ in args.xargs:
        if name not in names:
            ap.error(f"--xargs names {name!r}, which is not an endpoint ({names})")
    if any(c < 1 for c in args.concurrency) or args.rounds < 1:
        ap.error("concurrency levels and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from fly_vllm.bench.harness import build_requests, environment

    args = parse_args(argv)
    xargs = dict(args.xargs)
    for ep in args.endpoint:
        ep.xargs = xargs.get(ep.name, {})
        ep.model = args.model or discover_model(ep.url)
    items = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        try:
            items += ds.load(name, args.limit, args.data)
        except ds.GSM8KNotFound as e:
            raise SystemExit(f"bench_serve: {e}") from None
    reqs = build_requests(items, args.max_tokens, args.temperature)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("benchmarks/results") / f"serve-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    settings = {"endpoints": [vars(ep) for ep in args.endpoint],
                "items": {d: sum(1 for it in items if it.dataset == d)
                          for d in dict.fromkeys(it.dataset for it in items)},
                "max_tokens": args.max_tokens, "temperature": args.temperature,
                "concurrency": args.concurrency, "request_rate": args.request_rate,
                "rounds": args.rounds, "seed": args.seed}
    print(f"{PROGRESS}{len(reqs)} prompts x {len(args.endpoint)} endpoints x "
          f"concurrency {args.concurrency}; writing {out}", file=sys.stderr, flush=True)
    result = compare(args.endpoint, reqs, args.concurrency, args.request_rate,
                     args.rounds, args.seed, args.timeout)
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "settings": settings, **result}, indent=1))
    write_report(out, env, settings, result)
    plot(out, result)
    print((out / "report.md").read_text())
    failed = sum(r["failed"] for r in result["rows"])
    print(f"{PROGRESS}wrote {out}/report.md, results.json, serve.png"
          + (f"; {failed} requests failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
