"""``fly-vllm calibrate``: pick the loosest setting that meets a quality target.

Given a model pair (a target and a FLy speculative config naming the
drafter), a prompt file and a target agreement (say 0.995), it

1. runs every prompt exactly (per-request ``strict``: lossless speculation,
   the target's own greedy output) as the reference;
2. runs every prompt again for each point of a grid, through per-request
   overrides on the same engine: for FLy, each gate (``--gates``: the
   entropy test's ``entropy_threshold``, the margin test's ``margin``, or
   both) x ``window``; for FSD, ``fsd_threshold`` (the rule comes from the
   config); each point at every ``--strict-prefix`` N;
3. measures, per point, the agreement with the reference (the share of
   prompts whose answer is the same) and the mean accepted length (vLLM's
   counters: 1 + accepted / drafts);
4. writes the point with the largest mean accepted length whose agreement
   meets the target, if that length beats strict verification's (else
   strict), as a ready fly.json, with the calibration set's size, the
   agreement and its exact 95% lower bound in its header comments.

``--holdout F`` keeps a share F of the prompts (a seeded shuffle) out of the
choice: the point is chosen on the others and its agreement is reported on
the held-out prompts, an out-of-sample figure that the header states too.
Choosing the best of many points on the same prompts that report it
overstates its agreement; the held-out figure does not.

Agreement, ``--agreement``:
    ``answer`` (default): the last number of the output (``####`` answers
        first), as GSM8K is scored; prompts whose reference has no number
        compare whole texts.
    ``exact``: the whole output text.

Prompt file: one prompt per line, or JSON lines with ``"prompt"`` (plain
completion) or ``"messages"`` (chat, with the model's template).

``--json`` keeps every row, with the prompts each point disagrees on (their
``"id"``, else their 0-based position in the file's prompts).

Greedy decoding throughout (the reference is the target's greedy output).
With n prompts, a point that agrees on all n only shows agreement >= 0.05 **
(1 / n) at 95% confidence: 0.995 needs about 600 prompts to be shown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from fly_vllm.bench.scoring import binom_bound, exact_ci, gsm8k_extract
from fly_vllm.config import (
    FSD_MAX_THRESHOLD,
    GATES,
    FlyConfigError,
    is_fly,
    load_speculative_config,
    max_topk_entropy,
    parse_fly_config,
)

DEFAULT_FLY_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_FLY_WINDOWS = (1, 2, 3, 4, 6)
DEFAULT_MARGINS = (0.1, 0.3, 0.7)
DEFAULT_GATES = ("entropy", "margin")
# The judge's thresholds when neither --judge-thresholds nor the head's own
# table (its summary's "thresholds", chosen by recall at training) gives any.
DEFAULT_JUDGE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_FSD_THRESHOLDS = {"js": (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
                          "tv": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)}


def binom_lower_bound(k: int, n: int, alpha: float = 0.05) -> float:
    """One-sided exact (Clopper-Pearson) lower confidence bound for a
    proportion k / n: the p with P[Bin(n, p) >= k] = alpha."""
    return binom_bound(k, n, alpha) if n > 0 else 0.0


def answer_of(text: str, how: str) -> str:
    if how == "answer":
        got = gsm8k_extract(text)
        if got is not None:
            return got
    return text.strip()


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompts as ``{"prompt": str}`` or ``{"messages": [...]}``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            item: Any = line.rstrip("\n")
            if line.lstrip().startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: invalid JSON line: {e.msg}") from None
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not (
                    isinstance(item.get("prompt"), str) or isinstance(item.get("messages"), list)):
                raise SystemExit(f"{path}:{lineno}: expected a text line, or a JSON object "
                                 "with \"prompt\" (a string) or \"messages\" (a list)")
            out.append(item)
    if not out:
        raise SystemExit(f"{path}: no prompts")
    return out


def disagreements(texts: list[str], ref: list[str], prompts: list[dict[str, Any]],
                  how: str) -> list:
    """The prompts whose output's answer (``answer_of(text, how)``) differs
    from the reference answer: their ``"id"``, else their position."""
    return [prompts[i].get("id", i) for i, (t, r) in enumerate(zip(texts, ref))
            if answer_of(t, how) != r]


def generate_outputs(llm, prompts: list[dict[str, Any]], params) -> list[Any]:
    """One vLLM output per prompt, in order: prompts with ``"prompt"``
    through ``llm.generate``, the others (``"messages"``) through
    ``llm.chat``."""
    outputs: list[Any] = [None] * len(prompts)
    plain = [i for i, p in enumerate(prompts) if "prompt" in p]
    chat = [i for i, p in enumerate(prompts) if "prompt" not in p]
    for key, call, idx in (("prompt", llm.generate, plain), ("messages", llm.chat, chat)):
        if idx:
            outs = call([prompts[i][key] for i in idx], params, use_tqdm=False)
            for i, o in zip(idx, outs):
                outputs[i] = o
    return outputs


def generate_texts(llm, prompts: list[dict[str, Any]], params) -> list[str]:
    """One output text per prompt, in order (see ``generate_outputs``)."""
    return [o.outputs[0].text for o in generate_outputs(llm, prompts, params)]


def split_holdout(n: int, share: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(calibration, held-out) prompt positions: a seeded shuffle of 0..n-1,
    round(share * n) of them held out (both parts kept in file order)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:round(share * n)])
    keep = set(held)
    return [i for i in range(n) if i not in keep], held


def part_stats(stats: list[dict], idx: list[int]) -> float | None:
    """Mean accepted length (1 + accepted / steps) over the prompts ``idx``
    from per-request totals (``fly_vllm.request_stats``)."""
    steps = sum(stats[i]["steps"] for i in idx)
    acc = sum(stats[i]["native_accepted_tokens"] + stats[i]["loose_accepted_tokens"]
              for i in idx)
    return 1 + acc / steps if steps else None


def grid_points(fly, k: int, thresholds: list[float] | None,
                windows: list[int] | None, gates: list[str] | None = None,
                margins: list[float] | None = None,
                prefixes: list[int] | None = None,
                judge_thresholds: list[float] | None = None) -> list[dict[str, Any]]:
    """The per-request overrides to try: for FLy, each gate x window,
    loosest-last within each (``gates`` default: the entropy gate alone; a
    "both" point pairs every threshold with every margin; the judge tries
    ``judge_thresholds``, else the head's recall table, at W 0 too); for FSD, each
    threshold; every point at each strict prefix N (0: none). Each FLy point
    names its gate, so it means the same whatever the server's gate."""
    prefixes = sorted(set(prefixes or [0]))
    if any(n < 0 for n in prefixes):
        raise SystemExit("--strict-prefix values must be >= 0")

    def with_prefixes(points: list[dict]) -> list[dict]:
        return [{**p, **({"strict_prefix_tokens": n} if n else {})}
                for n in prefixes for p in points]

    if fly.rule == "fsd":
        ts = thresholds or DEFAULT_FSD_THRESHOLDS.get(fly.fsd_divergence)
        if ts is None:
            raise SystemExit(f"--thresholds is required for fsd_divergence "
                             f"{fly.fsd_divergence!r} (no default grid)")
        hi = FSD_MAX_THRESHOLD.get(fly.fsd_divergence, math.inf)
        return with_prefixes([{"fsd_threshold": float(t)} for t in ts if 0 <= t <= hi])
    gates = list(gates or ("entropy",))
    bad = [g for g in gates if g not in GATES]
    if bad:
        raise SystemExit(f"unknown gate {bad[0]!r} in --gates; use {', '.join(GATES)}")
    top = max_topk_entropy(fly.entropy_top_k)
    ts = [float(t) for t in sorted(thresholds or DEFAULT_FLY_THRESHOLDS, reverse=True)
          if 0 <= t <= top]
    ms = [float(m) for m in sorted(margins or DEFAULT_MARGINS) if m >= 0]
    ws = [int(w) for w in windows or DEFAULT_FLY_WINDOWS if 1 <= w < k]
    tests = {"entropy": [{"entropy_threshold": t} for t in ts],
             "margin": [{"margin": m} for m in ms],
             "both": [{"entropy_threshold": t, "margin": m} for t in ts for m in ms]}
    if "judge" in gates:
        if fly.judge_path is None:
            raise SystemExit("--gates judge needs a config with a judge head "
                             "(fly.gate 'judge', fly.judge_path)")
        tests["judge"] = [{"judge_threshold": t}
                          for t in judge_grid(fly.judge_path, judge_thresholds)]
    pts = [{"gate": g, **test, "window": w}
           for g in gates for w in ([0, *ws] if g == "judge" else ws) for test in tests[g]]
    if not pts:
        raise SystemExit(f"no grid point fits: windows must be 1..{k - 1} (K={k}), "
                         f"thresholds 0..{top:.4g} and margins >= 0")
    return with_prefixes(pts)


def judge_grid(path: str, given: list[float] | None) -> list[float]:
    """The judge thresholds to try, loosest last: ``given``, else those of the
    head's recall table, else DEFAULT_JUDGE_THRESHOLDS."""
    from fly_vllm.judge.head import JudgeHead

    if given:
        ts = given
    else:
        rows = JudgeHead.load(path).summary.get("thresholds") or []
        ts = [r["threshold"] for r in rows if r.get("threshold") is not None]
        ts = ts or list(DEFAULT_JUDGE_THRESHOLDS)
    return sorted({float(t) for t in ts if 0 <= t <= 1})


def choose(rows: list[dict], target: float, floor: float | None = None) -> dict | None:
    """The row with the largest mean accepted length whose agreement meets
    the target (ties: the higher agreement), or None if there is none.

    ``floor`` is strict verification's mean accepted length: a loose point
    that does not accept more than it (FSD's ``resample`` at a tight T
    rejects native matches) is never chosen, as strict is then both exact
    and faster."""
    ok = [r for r in rows if r["agreement"] >= target and r["mean_accepted_length"]
          and (floor is None or r["mean_accepted_length"] > floor)]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["mean_accepted_length"], r["agreement"]))


def write_config(path: str, spec: dict, point: dict | None, report: list[str]) -> None:
    """The base config with the chosen point in its ``fly`` block (strict if
    no point met the target), the report as ``//`` comments on top."""
    spec = json.loads(json.dumps(spec))
    block = spec.setdefault("fly", {})
    block.pop("strict", None)
    if point is None:
        block["strict"] = True
    else:
        # The chosen gate's keys replace the base config's: a margin point
        # drops the entropy test's keys, an entropy point the margin.
        unused = {"margin": ("entropy_threshold", "entropy_top_k"),
                  "entropy": ("margin",)}.get(point.get("gate"), ())
        for key in unused:
            block.pop(key, None)
        block.update(point)
    with open(path, "w", encoding="utf-8") as f:
        for line in report:
            f.write(f"// {line}\n")
        json.dump(spec, f, indent=2)
        f.write("\n")


def plot_curve(path: str, rows: list[dict], chosen: dict | None, retention: float,
               n: int) -> None:
    """The curve as a picture: agreement against mean accepted length, one
    marker per setting, a bar down to its exact 95% lower bound, the
    required agreement as a dashed line and the chosen point ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        x, y = r["mean_accepted_length"] or 0.0, r["agreement"]
        strict = r["point"] == {"strict": True}
        ax.errorbar([x], [y], yerr=[[y - r["lower"]], [0.0]], fmt="s" if strict else "o",
                    color="black" if strict else "tab:blue", capsize=3, ms=5)
        label = "strict" if strict else _short_point(r["point"])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if chosen is not None and r["point"] == chosen["point"]:
            ax.plot([x], [y], "o", ms=13, mfc="none", mec="tab:red", label="chosen")
    ax.axhline(retention, ls="--", color="tab:red", lw=1, label=f"required {retention:g}")
    ax.set(xlabel="mean accepted length (tokens per step)",
           ylabel="agreement with the target",
           title=f"fly-vllm calibrate: {n} prompts (bars: exact 95% lower bound)",
           ylim=(min(0.0, min(r["lower"] for r in rows)), 1.04))
    ax.margins(x=0.12)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_point(p: dict) -> str:
    names = {"entropy_threshold": "t", "window": "W", "fsd_threshold": "T", "margin": "m",
             "strict_prefix_tokens": "N", "judge_threshold": "j"}
    return " ".join(f"{names.get(k, k)}={v:g}" for k, v in p.items()
                    if not isinstance(v, str))


def _fmt_point(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in p.items())


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_speculative_config(args.speculative_config)
        if not is_fly(spec):
            raise FlyConfigError("calibrate needs a FLy config (\"method\": \"fly\")")
        vllm_spec, fly = parse_fly_config(spec)
    except FlyConfigError as e:
        print(f"fly-vllm calibrate: {e}", file=sys.stderr)
        return 2
    if not 0 < args.retention <= 1:
        print("fly-vllm calibrate: --retention must be in (0, 1]", file=sys.stderr)
        return 2
    try:  # the intervals (bench/scoring.py); checked before any engine runs
        import scipy.stats  # noqa: F401
    except ImportError:
        print("fly-vllm calibrate needs scipy for its exact intervals: pip install scipy",
              file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fly-vllm calibrate: --plot needs matplotlib (pip install matplotlib)",
                  file=sys.stderr)
            return 2
    k = vllm_spec["num_speculative_tokens"]
    if fly.rule == "fsd" and args.windows:
        print("fly-vllm calibrate: --windows applies to rule 'fly' only", file=sys.stderr)
        return 2
    if fly.rule == "fsd" and (args.gates or args.margins):
        print("fly-vllm calibrate: --gates and --margins apply to rule 'fly' only",
              file=sys.stderr)
        return 2
    if not 0 <= args.holdout < 1:
        print("fly-vllm calibrate: --holdout must be a share in [0, 1)", file=sys.stderr)
        return 2
    gates = args.gates or (["judge"] if fly.gate == "judge" else list(DEFAULT_GATES))
    points = grid_points(fly, k, args.thresholds, args.windows, gates, args.margins,
                         args.strict_prefix, args.judge_thresholds)
    prompts = read_prompts(args.prompts)
    n_all = len(prompts)
    calib, held = split_holdout(n_all, args.holdout, args.holdout_seed)
    if args.holdout and (not held or not calib):
        print(f"fly-vllm calibrate: --holdout {args.holdout} of {n_all} prompts leaves "
              "one part empty", file=sys.stderr)
        return 2
    n = len(calib)
    print(f"[calibrate] {n_all} prompts"
          + (f" ({n} to choose on, {len(held)} held out)" if held else "")
          + f", {len(points)} grid points + 1 reference run, rule {fly.rule}, K={k}, "
          f"agreement by {args.agreement}", file=sys.stderr, flush=True)

    from fly_vllm import request_stats
    from fly_vllm.bench.offline import acceptance, counter_delta, counters, worker_env

    os.environ.update(worker_env(dict(os.environ)))
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, speculative_config=spec, disable_log_stats=False,
              enforce_eager=True, dtype=args.dtype, max_model_len=args.max_model_len,
              seed=0, max_num_seqs=args.max_num_seqs)

    def generate(overrides: dict) -> tuple[list[str], list[dict], dict]:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                extra_args={"fly": overrides})
        before = counters(llm)
        outs = generate_outputs(llm, prompts, params)
        return ([o.outputs[0].text for o in outs], request_stats(outs),
                acceptance(counter_delta(counters(llm), before)))

    def part(texts: list[str], stats: list[dict], idx: list[int], acc: dict) -> dict:
        """Agreement and mean accepted length over the prompts ``idx``."""
        sub = [prompts[i] for i in idx]
        differ = disagreements([texts[i] for i in idx], [ref[i] for i in idx], sub,
                               args.agreement)
        agree = len(idx) - len(differ)
        length = part_stats(stats, idx)
        if length is None and len(idx) == n_all:
            length = acc["mean_accepted_length"]
        return {"agree": agree, "n": len(idx), "agreement": agree / len(idx),
                "disagree": differ, "lower": binom_lower_bound(agree, len(idx)),
                "interval": list(exact_ci(agree, len(idx))),
                "mean_accepted_length": length}

    t0 = time.perf_counter()
    ref_texts, ref_stats, ref_acc = generate({"strict": True})
    ref = [answer_of(t, args.agreement) for t in ref_texts]

    def row(point: dict, texts: list[str], stats: list[dict], acc: dict) -> dict:
        r = {"point": point, **part(texts, stats, calib, acc),
             "loose_rate": acc["loose_rate"] or 0.0}
        if held:
            r["holdout"] = part(texts, stats, held, acc)
        return r

    rows = [row({"strict": True}, ref_texts, ref_stats, ref_acc)]
    print(f"[calibrate] reference (strict) done in {time.perf_counter() - t0:.0f}s; "
          f"mean accepted length {rows[0]['mean_accepted_length'] or 0:.2f}",
          file=sys.stderr, flush=True)
    for j, point in enumerate(points, 1):
        rows.append(row(point, *generate(point)))
        r = rows[-1]
        print(f"[calibrate] {j}/{len(points)} {_fmt_point(point)}: agreement "
              f"{r['agree']}/{n}, mean accepted length {r['mean_accepted_length'] or 0:.2f}"
              + (f"; held out {r['holdout']['agree']}/{len(held)}" if held else "")
              + f" ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)

    best = choose(rows[1:], args.retention, floor=rows[0]["mean_accepted_length"])
    width = max(40, *(len(_fmt_point(r["point"])) for r in rows))
    header = (f"{'setting':<{width}} {'agree':>9} {'agreement':>9} {'95% low':>8} "
              f"{'acc len':>8}" + (f" {'held out':>9} {'acc len':>8}" if held else ""))
    table = [header, "-" * len(header)]
    for r in rows:
        mark = " <- chosen" if best is not None and r is best else ""
        ho = ""
        if held:
            h = r["holdout"]
            ho = f" {h['agree']:>4}/{h['n']:<4} {h['mean_accepted_length'] or 0:>8.2f}"
        table.append(f"{_fmt_point(r['point']):<{width}} {r['agree']:>4}/{n:<4} "
                     f"{r['agreement']:>9.3f} {r['lower']:>8.3f} "
                     f"{r['mean_accepted_length'] or 0:>8.2f}{ho}{mark}")
    print("\n".join(table))
    source = (f"{n} of {n_all} prompts from {args.prompts} ({len(held)} held out, "
              f"seed {args.holdout_seed})" if held else f"{n} prompts from {args.prompts}")
    report = [
        f"Calibrated by fly-vllm calibrate on {time.strftime('%Y-%m-%d')}: target "
        f"{args.model}, chosen on {source},",
        f"greedy, max_tokens {args.max_tokens}, agreement by {args.agreement} with the "
        f"target's own output, required >= {args.retention}.",
    ]
    if best is None:
        report.append("No loose setting met the target on this set with a longer mean "
                      "accepted length than strict: exact (strict) verification written.")
        print(f"[calibrate] no grid point reached agreement {args.retention} with a "
              "longer mean accepted length than strict; writing strict (exact) "
              "verification", file=sys.stderr)
    else:
        report += [
            f"Chosen: {_fmt_point(best['point'])}: agreement {best['agree']}/{n} = "
            f"{best['agreement']:.3f} (exact 95% lower bound {best['lower']:.3f}),",
            f"mean accepted length {best['mean_accepted_length']:.2f} (strict: "
            f"{rows[0]['mean_accepted_length'] or 0:.2f}).",
        ]
        if best["lower"] < args.retention:
            report.append(f"With {n} prompts the set cannot show {args.retention} at 95% "
                          f"confidence: the bound is {best['lower']:.3f}.")
        if held:
            h = best["holdout"]
            lo, hi = h["interval"]
            report.append(
                f"Out of sample, on the {h['n']} held-out prompts: agreement {h['agree']}/"
                f"{h['n']} = {h['agreement']:.3f} (exact 95% interval {lo:.3f}..{hi:.3f}), "
                f"mean accepted length {h['mean_accepted_length'] or 0:.2f} (strict: "
                f"{rows[0]['holdout']['mean_accepted_length'] or 0:.2f}).")
            if h["agreement"] < args.retention:
                report.append(f"The held-out agreement is below the required "
                              f"{args.retention}: the choice does not generalise on this "
                              "set; calibrate on more prompts or ask for less.")
    write_config(args.out, spec, None if best is None else best["point"], report)
    print("\n".join(report))
    print(f"[calibrate] wrote {args.out}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "chosen": best, "n": n, "n_holdout": len(held),
                       "holdout_ids": [prompts[i].get("id", i) for i in held],
                       "retention": args.retention, "agreement": args.agreement}, f,
                      indent=1)
    if args.plot:
        plot_curve(args.plot, rows, best, args.retention, n)
        print(f"[calibrate] wrote {args.plot}", file=sys.stderr)
    return 0


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str]) -> int:
    # The table and report go to stdout; vLLM's log (stdout by default) and
    # our progress lines go to stderr. Set before anything imports vLLM.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    ap = argparse.ArgumentParser(
        prog="fly-vllm calibrate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the target model")
    ap.add_argument("--speculative-config", required=True,
                    help="a FLy config (file or inline JSON) naming the drafter and K; "
                         "its fly.rule picks the grid")
    ap.add_argument("--prompts", required=True, help="prompt file (text or JSON lines)")
    ap.add_argument("--retention", type=float, default=0.995,
                    help="required agreement with the target's output (default 0.995)")
    ap.add_argument("--agreement", choices=("answer", "exact"), default="answer")
    ap.add_argument("--thresholds", type=_floats, default=None,
                    help="comma-separated thresholds (FLy: entropy in nats; FSD: T)")
    ap.add_argument("--windows", type=_ints, default=None,
                    help="comma-separated windows W (FLy only; each < K)")
    ap.add_argument("--gates", type=_names, default=None,
                    help="FLy gates to try, comma-separated: entropy, margin, both, judge "
                    "(default entropy,margin; judge for a config with a judge head)")
    ap.add_argument("--judge-thresholds", type=_floats, default=None,
                    help="comma-separated judge thresholds (p(important) below which a "
                    "mismatch may be kept; default: the head's recall table)")
    ap.add_argument("--margins", type=_floats, default=None,
                    help="comma-separated margins in nats for the margin and both gates "
                    f"(default {','.join(f'{m:g}' for m in DEFAULT_MARGINS)})")
    ap.add_argument("--strict-prefix", type=_ints, default=None,
                    help="comma-separated strict_prefix_tokens N to try with every point "
                    "(default 0: none)")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="share of the prompts held out of the choice and reported on "
                    "(0 <= F < 1; default 0)")
    ap.add_argument("--holdout-seed", type=int, default=0,
                    help="seed of the shuffle that picks the held-out prompts")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="fly.calibrated.json", help="the fly.json to write")
    ap.add_argument("--json", default=None, help="also write every row as JSON here")
    ap.add_argument("--plot", default=None,
                    help="also draw the curve (agreement against mean accepted length) "
                    "to this PNG; needs matplotlib")
    return run(ap.parse_args(argv))
