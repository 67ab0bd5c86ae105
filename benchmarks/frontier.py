"""The quality/acceptance frontier of loose verification, from harness runs.

    python benchmarks/frontier.py --screen DIR --eval DIR [--speed DIR] --out DIR

DIRs are run_bench.py output folders (``results.json`` in each): the screen
on calibration items, the evaluation on other, disjoint items, and the speed
runs (one request at a time). Per loose point and set it gives the mean
accepted length and its ratio to strict speculative decoding at the same K,
final-answer agreement with the target (GSM8K; exact 95% interval),
retention on GSM8K and HumanEval (paired bootstrap interval, McNemar flips),
the output-length ratio, cap-outs and where outputs first part from the
target's. It writes ``summary.json``, ``frontier.png`` (agreement against
the gain over strict, one curve per gate) and ``tables.md``.

``best`` in summary.json is the evaluated loose point with the largest gain
over strict whose agreement is at least --agreement (0.97); if none reaches
it, the evaluated loose point with the highest agreement, marked
``"meets_agreement": false``. Nothing is chosen on evaluation items: which
points were evaluated was decided on the screen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fly_vllm.bench.parting import (budget_table, ceiling, ceiling_table, dash,
                                    divergence_profile, harness_raws, loose_budget,
                                    profile_table)


def settings_of(spec: dict | None) -> dict | None:
    """The point's settings from its speculative config (None: no-spec)."""
    if spec is None:
        return None
    fly = dict(spec.get("fly", {}))
    out = {"K": spec["num_speculative_tokens"]}
    if fly.get("strict"):
        return {**out, "strict": True}
    gate = fly.get("gate", "entropy")
    out["gate"] = gate
    if gate in ("entropy", "both"):
        out["entropy_threshold"] = fly.get("entropy_threshold", 0.3)
    if gate in ("margin", "both"):
        out["margin"] = fly.get("margin", 0.3)
    if gate == "judge":
        out["judge_threshold"] = fly.get("judge_threshold", _head_threshold(fly))
    out["window"] = fly.get("window", min(6, out["K"] - 1))
    out["strict_prefix_tokens"] = fly.get("strict_prefix_tokens", 0)
    if fly.get("multilevel"):
        out["multilevel"] = True
    return out


def _head_threshold(fly: dict) -> float | None:
    """A judge point's threshold when its config leaves it to the head: the
    head file's default (None where the file cannot be read here)."""
    from fly_vllm.judge.head import JudgeHead, JudgeHeadError

    try:
        return JudgeHead.load(fly["judge_path"]).threshold
    except (JudgeHeadError, KeyError, OSError):
        return None


def _pooled_length(metrics: list[dict]) -> float | None:
    """Mean accepted length over the datasets' metrics of one mode: 1 +
    accepted / verification steps, summed (one dataset: its own figure)."""
    if len(metrics) == 1 or any("spec_steps" not in m for m in metrics):
        return metrics[0].get("mean_accepted_length") if len(metrics) == 1 else None
    steps = sum(m["spec_steps"] for m in metrics)
    acc = sum(m["accepted_tokens"] for m in metrics)
    return 1 + acc / steps if steps else None


def points_of(run_dir: Path, set_name: str) -> tuple[list[dict], dict]:
    """One entry per mode of a run folder, with its metrics per dataset."""
    res = json.loads((run_dir / "results.json").read_text())
    by_mode: dict[str, list[dict]] = {}
    for r in res["table"]:
        if r["temperature"] == 0:
            by_mode.setdefault(r["mode"], []).append(r)
    points = []
    for mode, rows in by_mode.items():
        ds = {r["dataset"]: r["metrics"] for r in rows}
        points.append({"name": mode, "set": set_name, "settings": settings_of(rows[0]["spec"]),
                       "datasets": ds, "mean_accepted_length": _pooled_length(list(ds.values())),
                       **({"unfinished": rows[0]["unfinished"]}
                          if rows[0].get("unfinished") else {})})
    return points, res


def _strict_at(points: list[dict], k: int) -> dict | None:
    return next((p for p in points if p["settings"] and p["settings"].get("strict")
                 and p["settings"]["K"] == k), None)


def describe(p: dict) -> dict:
    """The figures of one point for summary.json and the tables."""
    g = p["datasets"].get("gsm8k", {})
    he = p["datasets"].get("humaneval", {})
    out = {"name": p["name"], "set": p["set"], "settings": p["settings"],
           "mean_accepted_length": p["mean_accepted_length"],
           "mean_accepted_length_by_dataset": {
               d: m.get("mean_accepted_length") for d, m in p["datasets"].items()},
           "gain_over_strict": p.get("gain_over_strict"),
           **({"gain_items": p["gain_items"]} if "gain_items" in p else {}),
           "items": {d: m.get("n") for d, m in p["datasets"].items()}}
    if p.get("unfinished"):
        out["unfinished"] = p["unfinished"]  # scored on its first parts only
    if "answer_agreement" in g:
        lo, hi = g["answer_agreement_exact_ci"]
        out.update(agreement=g["answer_agreement"], agreement_lower95=lo,
                   agreement_upper95=hi, agreement_k=g["answer_agreement_k"],
                   agreement_n=g["n"])
    out["retention"] = {d: m["retention"] for d, m in (("gsm8k", g), ("humaneval", he))
                        if "retention" in m}
    out["retention_ci"] = {d: m["retention_ci"] for d, m in (("gsm8k", g), ("humaneval", he))
                           if "retention_ci" in m}
    out["flips"] = {d: m["paired"] for d, m in (("gsm8k", g), ("humaneval", he))
                    if "paired" in m}
    out["output_length_ratio"] = g.get("output_length_ratio")
    out["output_length_ratio_by_dataset"] = {
        d: m.get("output_length_ratio") for d, m in p["datasets"].items()}
    out["capped"] = {d: m.get("capped") for d, m in p["datasets"].items()}
    out["identical"] = {d: m.get("identical") for d, m in p["datasets"].items()}
    out["first_parting_median"] = {
        d: (m["first_parting_q"][1] if m.get("parted") else None)
        for d, m in p["datasets"].items()}
    out["loose_rate"] = {d: m.get("loose_rate") for d, m in p["datasets"].items()}
    return out


def strict_ceilings(raws: list[dict], profile: dict[str, dict],
                    agreement: float) -> dict[str, dict]:
    """Per strict run of a folder (``parting.harness_raws``; GSM8K, an
    unfinished run on its finished parts): the ceiling of any loose rule at
    its K (``parting.ceiling``), at the lowest rate at which a parted output
    changed its answer among the folder's loose points (``profile``: the rate
    most favourable to loose acceptance)."""
    rates = [e["changed_given_parted"] for e in profile.values()
             if e.get("changed_given_parted") is not None]
    if not rates:
        return {}
    out = {}
    for r in raws:
        fly = (r.get("spec") or {}).get("fly", {})
        if r["temperature"] != 0 or not fly.get("strict"):
            continue
        outs = [(len(x["token_ids"]), x["fly_stats"]["steps"]) for x in r["run"]["results"]
                if x["group"] == "gsm8k" and x.get("fly_stats")]
        c = ceiling(outs, r["spec"]["num_speculative_tokens"], min(rates), agreement=agreement)
        if c:
            out[r["mode"]] = c
    return dict(sorted(out.items(), key=lambda kv: kv[1]["K"]))


def add_gains(points: list[dict]) -> None:
    for p in points:
        s = p["settings"]
        if not s:
            continue
        strict = _strict_at(points, s["K"])
        if not strict:
            continue
        # On the items both ran only: an unfinished mode has fewer parts, and
        # a dataset it has not reached must not enter either side.
        common = [d for d, m in p["datasets"].items()
                  if d in strict["datasets"] and m.get("n") == strict["datasets"][d].get("n")]
        if not common:
            continue
        mine = _pooled_length([p["datasets"][d] for d in common])
        theirs = _pooled_length([strict["datasets"][d] for d in common])
        if mine and theirs:
            p["gain_over_strict"] = mine / theirs


def add_item_gains(points: list[dict], raws: list[dict]) -> None:
    """Where add_gains found no dataset that a loose point and strict at its
    K both ran in full (a point scored on its first parts), its gain on the
    items both ran, from each output's own counters (``fly_stats``: steps and
    accepted drafts, the engine's counters per output, so a full run gives
    add_gains' figure), pooled over datasets; ``gain_items`` says how many."""
    stats = {r["mode"]: {x["id"]: x.get("fly_stats") for x in r["run"]["results"]}
             for r in raws if r["temperature"] == 0}

    def length(rows: list[dict]) -> float | None:
        steps = sum(r["steps"] for r in rows)
        acc = sum(r["native_accepted_tokens"] + r["loose_accepted_tokens"] for r in rows)
        return 1 + acc / steps if steps else None

    for p in points:
        s = p["settings"]
        strict = _strict_at(points, s["K"]) if s and not s.get("strict") else None
        if not strict or p.get("gain_over_strict"):
            continue
        mine, theirs = stats.get(p["name"], {}), stats.get(strict["name"], {})
        common = [i for i, st in mine.items() if st and theirs.get(i)]
        a = length([mine[i] for i in common])
        b = length([theirs[i] for i in common])
        if a and b:
            p["gain_over_strict"], p["gain_items"] = a / b, len(common)


def _round_rates(res: dict) -> tuple[dict, dict]:
    """Output tokens over wall time per (mode, at once), pooled over datasets,
    and each mode's settings, from one run's results.json."""
    tok: dict[tuple[str, int], list[float]] = {}
    for r in res["table"]:
        m = r["metrics"]
        t = tok.setdefault((r["mode"], r.get("concurrency", 1)), [0.0, 0.0])
        t[0] += m["tokens"]
        t[1] += m["time_s"]
    specs = {r["mode"]: settings_of(r["spec"]) for r in res["table"]}
    return {k: v[0] / v[1] for k, v in tok.items() if v[1]}, specs


def speed_ratios(speed_dir: Path | None) -> dict[str, dict]:
    """tok/s per mode against strict at the same K, the fastest strict K of
    the round (the bar's reference) and the target alone, at each number at
    once. ``speed_dir`` holds one results.json, or rounds
    (round-*/results.json, run one after another so that modes interleave):
    then each ratio is the median over rounds, with every round's value."""
    if speed_dir is None:
        return {}
    files = ([speed_dir / "results.json"] if (speed_dir / "results.json").exists()
             else sorted(speed_dir.glob("round-*/results.json")))
    per: dict[str, dict[str, list[float]]] = {}
    for f in files:
        rate, specs = _round_rates(json.loads(f.read_text()))
        for (mode, conc), r in rate.items():
            s = specs[mode]
            strict = next((m for m, x in specs.items() if x and x.get("strict")
                           and s and x["K"] == s["K"]), None)
            entry = per.setdefault(mode, {})
            entry.setdefault(f"tok_s_at_{conc}", []).append(r)
            if (strict, conc) in rate:
                entry.setdefault(f"tok_s_vs_strict_at_{conc}", []).append(
                    r / rate[(strict, conc)])
            fastest = max((x for (m, c), x in rate.items()
                           if c == conc and specs[m] and specs[m].get("strict")), default=None)
            if fastest:
                entry.setdefault(f"tok_s_vs_fastest_strict_at_{conc}", []).append(r / fastest)
            if ("no-spec", conc) in rate:
                entry.setdefault(f"tok_s_vs_target_at_{conc}", []).append(
                    r / rate[("no-spec", conc)])
    import statistics

    return {mode: {**{k: statistics.median(v) for k, v in e.items()},
                   **{k + "_rounds": v for k, v in e.items()}}
            for mode, e in per.items()}


def pareto(points: list[dict]) -> list[dict]:
    """Loose points that no other loose point beats on both agreement and
    gain over strict (ties kept), best agreement first: the screen's
    candidates for evaluation."""
    loose = [p for p in points if p["settings"] and not p["settings"].get("strict")
             and p.get("agreement") is not None and p.get("gain_over_strict")]
    front = [p for p in loose if not any(
        q["agreement"] >= p["agreement"] and q["gain_over_strict"] >= p["gain_over_strict"]
        and (q["agreement"], q["gain_over_strict"]) != (p["agreement"], p["gain_over_strict"])
        for q in loose)]
    return sorted(front, key=lambda p: (-p["agreement"], -p["gain_over_strict"]))


def pick_best(evaluated: list[dict], agreement: float) -> dict | None:
    loose = [p for p in evaluated if p["settings"] and not p["settings"].get("strict")
             and p.get("agreement") is not None]
    ok = [p for p in loose if p["agreement"] >= agreement and p.get("gain_over_strict")]
    if ok:
        return {**max(ok, key=lambda p: p["gain_over_strict"]), "meets_agreement": True}
    if loose:
        return {**max(loose, key=lambda p: (p["agreement"], p.get("gain_over_strict") or 0)),
                "meets_agreement": False}
    return None


def point_order(p: dict) -> tuple:
    """Tables read by K, strict first, then gate, threshold, window, prefix."""
    s = p["settings"]
    return (s["K"], not s.get("strict"), s.get("gate", ""), s.get("entropy_threshold", 0),
            s.get("margin", 0), s.get("judge_threshold") or 0, s.get("window", 0),
            s.get("strict_prefix_tokens", 0))


def point_label(s: dict) -> str:
    """A point's threshold(s), and its window and strict prefix where they
    are not the screen's usual ones, for the plot: "0.3", "0.6/0.7",
    "0.3 W3 N128"."""
    vals = [s[k] for k in ("entropy_threshold", "margin") if k in s]
    out = "/".join(f"{v:g}" for v in vals)
    if "judge_threshold" in s:  # p(important) thresholds span decades
        out = "head's" if s["judge_threshold"] is None else f"{s['judge_threshold']:.2g}"
    usual = 2 if s["K"] == 4 else 6  # the screen's window at K 4 and at K 8 or more
    if s.get("window", usual) != usual:
        out += f" W{s['window']}"
    if s.get("strict_prefix_tokens"):
        out += f" N{s['strict_prefix_tokens']}"
    return out


def plot(path: Path, sets: dict[str, list[dict]], required: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), squeeze=False, figsize=(6.2 * len(sets), 4.8))
    colors = {"entropy": "tab:orange", "margin": "tab:blue", "both": "tab:green",
              "judge": "tab:purple"}
    marks = {4: "o", 8: "s", 15: "^"}
    for ax, (name, pts) in zip(axes[0], sets.items()):
        for gate, color in colors.items():
            for k in sorted({p["settings"]["K"] for p in pts if p["settings"]}):
                mine = sorted([p for p in pts if p["settings"]
                               and p["settings"].get("gate") == gate
                               and p["settings"]["K"] == k and p.get("gain_over_strict")
                               and p.get("agreement") is not None],
                              key=lambda p: p["gain_over_strict"])
                for p in mine:
                    x, y = p["gain_over_strict"], p["agreement"]
                    ax.errorbar([x], [y], yerr=[[y - p["agreement_lower95"]],
                                                [p["agreement_upper95"] - y]],
                                fmt=marks.get(k, "D"), color=color, ms=5, capsize=2,
                                alpha=0.8, mfc="white" if p["settings"].get(
                                    "strict_prefix_tokens") else color)
                    left = bool(p["settings"].get("strict_prefix_tokens"))
                    ax.annotate(point_label(p["settings"]), (x, y),
                                xytext=(-4 if left else 4, 3), textcoords="offset points",
                                fontsize=6, color=color, ha="right" if left else "left")
                if mine:
                    ax.plot([p["gain_over_strict"] for p in mine],
                            [p["agreement"] for p in mine], color=color, lw=0.8, alpha=0.6,
                            ls="-" if k == 4 else "--" if k == 8 else ":",
                            label=f"{gate} gate, K{k}")
        stricts: dict[float, list[int]] = {}
        for p in pts:
            if p["settings"] and p["settings"].get("strict") and p.get("agreement") is not None:
                stricts.setdefault(p["agreement"], []).append(p["settings"]["K"])
        for y, ks in stricts.items():  # one star and label per agreement
            ax.plot([1.0], [y], "k*", ms=11)
            ax.annotate("strict " + ", ".join(f"K{k}" for k in sorted(ks)), (1.0, y),
                        xytext=(4, -10), textcoords="offset points", fontsize=7)
        ax.axhline(required, ls="--", color="tab:red", lw=1, label=f"required {required:g}")
        ax.axvline(1.10, ls=":", color="grey", lw=1, label="1.10x strict")
        ns = sorted({p["agreement_n"] for p in pts if p.get("agreement_n")})
        n = "?" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        unfinished = ", unfinished: first parts only" if any(
            p.get("unfinished") for p in pts) else ""
        ax.set(title=f"{name} ({n} GSM8K items{unfinished})",
               xlabel="mean accepted length / strict's "
               "(same K)", ylabel="final-answer agreement with the target")
        ax.legend(fontsize=7, loc="best")
    fig.text(0.5, 0.005, "markers: o K4, s K8, ^ K15; hollow: with a strict prefix; bars: "
             "exact 95% interval; star: strict SD", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(points: list[dict]) -> list[str]:
    from fly_vllm.bench.report import parts_note

    lines = ["| point | set | mean acc. len, all (GSM8K / HE) | vs strict | "
             "GSM8K agreement [exact 95%] | "
             "retention GSM8K [95%] (flips) | retention HumanEval [95%] (flips) | "
             "length ratio GSM8K / HE | capped GSM8K | identical GSM8K / HE | "
             "first parting (median) | tok/s vs strict at 1 (rounds; vs the fastest strict K) |", "|" + "---|" * 12]
    for p in points:
        r, ci, fl = p["retention"], p["retention_ci"], p["flips"]

        def ret(d):
            if d not in r:
                return "–"
            f = fl.get(d, {})
            return (f"{r[d]:.3f} [{ci[d][0]:.2f}, {ci[d][1]:.2f}] "
                    f"({f.get('right_to_wrong', '?')}/{f.get('wrong_to_right', '?')})")

        agree = "–"
        if p.get("agreement") is not None:
            agree = (f"{p['agreement_k']}/{p['agreement_n']} = {p['agreement']:.3f} "
                     f"[{p['agreement_lower95']:.3f}, {p['agreement_upper95']:.3f}]")
        lr = p["output_length_ratio_by_dataset"]
        ident = p["identical"]
        fp = p["first_parting_median"]
        name = p["name"] + parts_note(p.get("unfinished"))
        by_ds = p.get("mean_accepted_length_by_dataset", {})
        length = dash(p["mean_accepted_length"])
        if len(by_ds) > 1:  # pooled over the datasets' steps, then each
            length += (f" ({dash(by_ds.get('gsm8k'))} / "
                       f"{dash(by_ds.get('humaneval'))})")
        gain = dash(p.get("gain_over_strict"), "{:.3f}x")
        if p.get("gain_items"):  # a point scored on its first parts
            gain += f" (on its {p['gain_items']} items)"
        speed = dash(p.get("tok_s_vs_strict_at_1"), "{:.3f}x")
        if p.get("tok_s_vs_strict_at_1") is not None:
            speed += " (" + ", ".join(
                f"{x:.3f}" for x in p.get("tok_s_vs_strict_at_1_rounds", [])) + ")"
        if p.get("tok_s_vs_fastest_strict_at_1") is not None:
            speed += "; vs the fastest strict K " + ", ".join(
                f"{x:.3f}" for x in p["tok_s_vs_fastest_strict_at_1_rounds"])
        lines.append(
            f"| {name} | {p['set']} | {length} | "
            f"{gain} | {agree} | {ret('gsm8k')} | "
            f"{ret('humaneval')} | {dash(lr.get('gsm8k'))} / {dash(lr.get('humaneval'))} | "
            f"{dash(p['capped'].get('gsm8k'), '{:.1%}')} | "
            f"{dash(ident.get('gsm8k'), '{:.0%}')} / {dash(ident.get('humaneval'), '{:.0%}')} | "
            f"{dash(fp.get('gsm8k'), '{:.0f}')} | {speed} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screen", type=Path, required=True)
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--speed", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--agreement", type=float, default=0.97)
    ap.add_argument("--pair", default="Qwen2.5-Coder-1.5B-Instruct target, "
                    "Qwen2.5-Coder-0.5B-Instruct drafter")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = {}
    # Every raw run of each folder, read once for the gains of unfinished
    # points, the profile and the ceilings.
    raws = {name: harness_raws(d) for name, d in
            (("calibration", args.screen), ("evaluation", args.eval)) if d}
    screen, screen_res = points_of(args.screen, "calibration")
    add_gains(screen)
    add_item_gains(screen, raws["calibration"])
    sets["calibration"] = [describe(p) for p in screen]
    eval_res = None
    if args.eval:
        ev, eval_res = points_of(args.eval, "evaluation")
        add_gains(ev)
        add_item_gains(ev, raws["evaluation"])
        sets["evaluation"] = [describe(p) for p in ev]
    speeds = speed_ratios(args.speed)
    for pts in sets.values():
        for p in pts:
            p.update({k: v for k, v in speeds.get(p["name"], {}).items()
                      if p["set"] == "evaluation"})
    evaluated = sets.get("evaluation", [])
    raw_sets = {"calibration": screen, **({"evaluation": ev} if args.eval else {})}
    by_name = {name: next((p["datasets"] for p in pts if p["settings"] is None), {})
               for name, pts in raw_sets.items()}
    # No best while the evaluation is unfinished: its points are then scored
    # on their first items only, and not all on the same number of them.
    pending = [p["name"] for p in evaluated if p.get("unfinished")]
    best = None if pending else pick_best(evaluated, args.agreement)
    items = lambda res: res["settings"]["items"] if res else {}  # noqa: E731
    strict_rows = [p for p in evaluated or sets["calibration"]
                   if p["settings"] and p["settings"].get("strict")]
    summary = {
        "pair": args.pair,
        "calibration_items": items(screen_res).get("gsm8k"),
        "calibration_skipped": screen_res["settings"].get("skipped"),
        "eval_items": items(eval_res),
        "eval_skipped": eval_res["settings"].get("skipped") if eval_res else None,
        "required_agreement": args.agreement,
        "strict": [{"K": p["settings"]["K"],
                    "mean_accepted_length": p["mean_accepted_length"],
                    "agreement": p.get("agreement"), "set": p["set"],
                    **{k: v for k, v in p.items() if k.startswith("tok_s")}}
                   for p in strict_rows],
        "target": [{"set": p["set"], "capped": p["capped"],
                    "accuracy": {d: m.get("accuracy") for d, m in by_name[p["set"]].items()},
                    **{k: v for k, v in p.items() if k.startswith("tok_s")}}
                   for pts in sets.values() for p in pts if p["settings"] is None],
        "best": best,
        **({"evaluation_unfinished": pending} if pending else {}),
        "screen_pareto": [p["name"] for p in pareto(sets["calibration"])],
        "points": [p for pts in sets.values() for p in pts if p["settings"] is not None],
        "sources": {"screen": str(args.screen), "eval": str(args.eval) if args.eval else None,
                    "speed": str(args.speed) if args.speed else None},
        "environment": (eval_res or screen_res)["environment"],
    }
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(screen_res["settings"]["model"])
    except Exception as e:  # the profile without token kinds
        print(f"[frontier] no tokenizer ({e}); parting tokens not classified",
              file=sys.stderr)
    profiles = {name: divergence_profile(d, tok, raws[name]) for name, d in
                (("calibration", args.screen), ("evaluation", args.eval)) if d}
    summary["divergence_profile"] = profiles
    budgets = {}
    for name, pts in raw_sets.items():
        budgets[name] = {}
        for p in pts:
            s, prof = p["settings"], profiles[name].get(p["name"], {})
            strict = _strict_at(pts, s["K"]) if s and not s.get("strict") else None
            g = p["datasets"].get("gsm8k", {})
            if not (strict and prof.get("loose_accepts_per_output") is not None
                    and g.get("output_tokens_mean") and prof.get("changed_given_parted")):
                continue
            b = loose_budget(g["output_tokens_mean"], strict["datasets"]["gsm8k"][
                "mean_accepted_length"], g["mean_accepted_length"],
                prof["loose_accepts_per_output"], prof["parted"] / prof["n"],
                prof["changed_given_parted"], agreement=args.agreement)
            if b:
                budgets[name][p["name"]] = b
    summary["loose_budget"] = budgets
    ceilings = {name: strict_ceilings(raws[name], profiles[name], args.agreement)
                for name in raws}
    summary["ceiling"] = ceilings
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(args.out / "frontier.png", sets, args.agreement)
    lines = []
    for name, pts in sets.items():
        lines += [f"## {name}", ""] + table(sorted(
            [p for p in pts if p["settings"] is not None], key=point_order)) + [""]
    for name, prof in profiles.items():
        order = [p["name"] for p in sorted(
            [p for p in sets[name] if p["settings"]], key=point_order)]
        lines += profile_table(prof, name, order)
        lines += budget_table(budgets.get(name, {}), order)
        lines += ceiling_table(ceilings.get(name, {}))
    (args.out / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if best:
        print(f"[frontier] best: {best['name']} (meets {args.agreement}: "
              f"{best['meets_agreement']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
