"""The report of ``fly-vllm judge train``: what the held-out items say about
a head, as ``report.md`` (tables and plain readings of what the sample can
and cannot show), ``report.json`` and ``pr.png`` (ROC and precision/recall
of the head beside the logit signals)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np



def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_ci(v) -> str:
    return "n/a" if v is None else f"[{v[0]:.3f}, {v[1]:.3f}]"


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def pct_ci(v) -> str:
    return "" if v is None else f"[{pct(v[0])}, {pct(v[1])}]"


def report_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    pair = report["pair"]
    lines = [
        "# Judge head: training report",
        "",
        f"Pair: target `{pair.get('target')}`, drafter `{pair.get('drafter')}`; task "
        f"`{s['mining'].get('task')}`, K = {s['mining'].get('k')}. {s['date']}, "
        f"scikit-learn {s['sklearn']}.",
        "",
        f"Command: `{s.get('command', '')}`",
        "",
        f"{s['n_labels']} labelled mismatches ({pct(s['important_share'])} important) from "
        f"{s['n_items']} items; {s['n_unlabelled_dropped']} unlabelled rows dropped. "
        f"Split by item (seed {s['seed']}): {s['n_train_items']} training items "
        f"({s['n_train_rows']} rows), {s['n_test_items']} held out ({s['n_test_rows']} rows). "
        f"Every AUC is P(an important mismatch has the larger value), ties half: 0.5 is "
        "chance, 1 separates them perfectly.",
        "",
        "## Feature specs (cross-validated on the training items)",
        "",
        f"{s['folds']}-fold cross-validation by item; each spec at its best C.",
        "",
        "| features | C | CV AUC |",
        "|---|---|---|",
    ]
    for row in s["ablation"]:
        mark = " (chosen)" if row["features"] == s["features"] else ""
        lines.append(f"| {'+'.join(row['features'])}{mark} | {row['C']:.3g} | "
                     f"{fmt(row['cv_auc'])} |")
    lines += [
        "",
        "## Held-out items",
        "",
        "| figure | value |",
        "|---|---|",
        f"| features | {'+'.join(s['features'])} |",
        f"| C | {s['C']:.3g} |",
        f"| ROC AUC | {fmt(s['test_auc'])} |",
        f"| 95% interval (items resampled, {s['bootstrap']} draws) | {fmt_ci(s['test_auc_ci'])} |",
        f"| average precision | {fmt(s['ap'])} (base rate {pct(s['test_important_share'])}) |",
        "",
        "## Baselines on the same held-out rows (read raw)",
        "",
        "| signal | AUC | 95% interval |",
        "|---|---|---|",
        f"| head | {fmt(s['test_auc'])} | {fmt_ci(s['test_auc_ci'])} |",
    ]
    for name, b in s["baselines"].items():
        lines.append(f"| {b['reads']} | {fmt(b['auc'])} | {fmt_ci(b['auc_ci'])} |")
    lines += [
        "",
        "An AUC below 0.5 means that the smaller value goes with importance; a gate "
        "reading that signal the other way round would score 1 - AUC.",
        "",
        "## Learning curve (same C, held-out AUC)",
        "",
        "| training items | rows | held-out AUC |",
        "|---|---|---|",
    ]
    for p in s["learning_curve"]:
        lines.append(f"| {p['n_items']} ({p['fraction']:.0%}) | {p['n_rows']} | "
                     f"{fmt(p['test_auc'])} |")
    lines += [
        "",
        "## Thresholds (the gate accepts a mismatch when p < t)",
        "",
        "t is set on the out-of-fold training scores for the target recall (the share of "
        "important mismatches with p >= t); the accepted shares are on the held-out rows. "
        "Accepted unimportant is the gain, accepted important the harm.",
        "",
        "| target recall | t | OOF recall | accepted unimportant | accepted important "
        "(95% interval) | accepted, all |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["thresholds"]:
        tgt = "p < 0.5" if r["target_recall"] is None else f"{r['target_recall']:g}"
        if r["default"]:
            tgt += " (default)"
        lines.append(f"| {tgt} | {r['threshold']:.4f} | {pct(r['oof_recall'])} | "
                     f"{pct(r['accepted_unimportant'])} | {pct(r['accepted_important'])} "
                     f"{pct_ci(r['accepted_important_ci'])} | {pct(r['accepted_all'])} |")
    cal = s.get("calibration")
    if cal:
        lines += [
            "",
            "## Calibration",
            "",
            f"p is the regression's logit z through Platt scaling fitted on the out-of-fold "
            f"training logits: p = sigmoid({cal['a']:.4g} z {'+' if cal['c'] >= 0 else '-'} "
            f"{abs(cal['c']):.4g}), folded into the head's weights. Rows in groups of equal "
            "size by p: where p is a probability, the two columns agree.",
            "",
            "| rows | group | mean p | important |",
            "|---|---|---|---|",
        ]
        for where in ("out_of_fold", "held_out"):
            for g in cal[where]:
                lines.append(f"| {where.replace('_', '-')} | {g['n']} | {fmt(g['mean_p'])} | "
                             f"{fmt(g['important'])} |")
    lines += ["", "## What this sample can and cannot show", ""]
    lines += [f"- {sentence}" for sentence in _readings(s)]
    lines += ["", "![ROC and precision/recall](pr.png)", ""]
    return "\n".join(lines)


def _readings(s: dict[str, Any]) -> list[str]:
    out = []
    ci = s["test_auc_ci"]
    if ci is None:
        out.append("The held-out items are too few (or hold one class) for an AUC interval: "
                   "this run shows nothing about how well the head generalises.")
    else:
        w = ci[1] - ci[0]
        verdict = ("above chance" if ci[0] > 0.5 else
                   "not shown to be better than chance" if ci[1] >= 0.5 else "below chance")
        out.append(f"The held-out AUC rests on {s['n_test_items']} items ({s['n_test_rows']} "
                   f"rows); its 95% interval is {w:.3f} wide, so AUC differences smaller than "
                   f"about {w / 2:.3f} are not resolved by this sample. The head is {verdict} "
                   "on it.")
        beaten = [b["reads"] for b in s["baselines"].values()
                  if b["auc_ci"] is not None and b["auc_ci"][1] < ci[0]]
        if beaten:
            out.append(f"The head's interval lies above those of {', '.join(beaten)}.")
        elif s["baselines"]:
            out.append("The intervals of the head and of at least one raw signal overlap: "
                       "this sample does not show that the head beats every one of them.")
    out.append("C and the feature spec were chosen by cross-validation on the training items "
               "only, so the held-out figures are not inflated by that choice. The CV AUCs of "
               "the ablation table are: each is the best over the C grid, and the chosen one "
               "the best over the specs too, so they read a little high.")
    lc = [p["test_auc"] for p in s["learning_curve"]]
    if len(lc) >= 2 and lc[-1] is not None and lc[-2] is not None:
        gain = lc[-1] - lc[-2]
        if ci is not None and abs(gain) < (ci[1] - ci[0]) / 2:
            out.append(f"From {s['learning_curve'][-2]['fraction']:.0%} to 100% of the training "
                       f"items the held-out AUC moved by {gain:+.3f}, within the noise of the "
                       "held-out sample: it does not show whether more labels would help.")
        else:
            out.append(f"From {s['learning_curve'][-2]['fraction']:.0%} to 100% of the training "
                       f"items the held-out AUC moved by {gain:+.3f}"
                       + ("; more labels would likely help." if gain > 0 else "."))
    default = next((r for r in s["thresholds"] if r["default"]), None)
    if default is not None and default["accepted_important_ci"] is not None:
        lo, hi = default["accepted_important_ci"]
        out.append(f"At the default threshold {default['threshold']:.4f} (recall "
                   f"{s['recall']:g} on out-of-fold scores) the gate accepted "
                   f"{pct(default['accepted_important'])} of the "
                   f"{default['n_important']} held-out important mismatches (95% interval "
                   f"{pct(lo)} to {pct(hi)}) and {pct(default['accepted_unimportant'])} of "
                   "the unimportant ones.")
    out.append("Labels say whether accepting one mismatch changed the final answer on this "
               "task and pair; they say nothing about other tasks, and a mismatch accepted "
               "alongside others may act differently from one accepted alone.")
    if s["not_converged_fits"]:
        out.append(f"{s['not_converged_fits']} fits stopped at max_iter={s.get('max_iter')} before "
                   "converging (typically the largest C values).")
    return out


def plot_report(report: dict[str, Any], path: str | Path) -> bool:
    """pr.png: ROC and precision/recall of the head and the baselines on the
    held-out rows. False (nothing drawn) without both classes there."""
    if not report.get("curves"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, c in report["curves"].items():
        a = s["test_auc"] if name == "head" else s["baselines"][name]["auc"]
        label = ("head (" + "+".join(s["features"]) + ")" if name == "head"
                 else s["baselines"][name]["reads"])
        style = {"lw": 2.2} if name == "head" else {"lw": 1.2, "ls": "--"}
        ax_roc.plot(c["roc"]["x"], c["roc"]["y"], label=f"{label}: AUC {fmt(a)}", **style)
        ax_pr.plot(c["pr"]["x"], c["pr"]["y"], label=label, **style)
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax_roc.set(xlabel="unimportant flagged (false positive rate)",
               ylabel="important flagged (true positive rate)",
               title=f"ROC, held-out ({s['n_test_items']} items, {s['n_test_rows']} rows)")
    base = s["test_important_share"] or 0.0
    ax_pr.axhline(base, color="grey", lw=0.8, ls=":", label=f"base rate {base:.2f}")
    ax_pr.set(xlabel="recall of important", ylabel="precision",
              title=f"precision/recall, held-out (AP {fmt(s['ap'])})", ylim=(0, 1.02))
    ax_roc.legend(fontsize=8, loc="lower right")
    ax_pr.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_report(report: dict[str, Any], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(jsonable(report), indent=1) + "\n")
    (folder / "report.md").write_text(report_markdown(report))
    plot_report(report, folder / "pr.png")
    return folder


