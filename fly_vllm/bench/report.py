"""The benchmark report: report.md (one table of speed, acceptance and
quality per mode and dataset, one of what each mode changes in the outputs)
and the plots."""

from __future__ import annotations

from pathlib import Path


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


def parts_note(unfinished: dict | None) -> str:
    """The note after the name of a mode scored before all its parts ran
    (--cached-only), such as ' (2 of 5 parts)', or ' (parts 1, 2, 5 of 5)'
    where those run are not the first ones; '' for a finished mode."""
    u = unfinished
    if not u:
        return ""
    which = u.get("which")
    if which and which != list(range(1, len(which) + 1)):
        return f" (parts {', '.join(map(str, which))} of {u['of']})"
    return f" ({u['parts']} of {u['of']} parts)"


def _mode(r: dict) -> str:
    return r["mode"] + parts_note(r.get("unfinished"))


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
                f"| {r['dataset']} | {_mode(r)} | {r.get('concurrency', 1)} | "
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
            f"| {r['dataset']} | {_mode(r)} | {r.get('concurrency', 1)} | "
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
