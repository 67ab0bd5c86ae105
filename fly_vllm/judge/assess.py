"""``fly-vllm judge assess``: a trained head on mined items it never saw.

    fly-vllm judge assess MINE_DIR --head HEAD [--threshold T ...]
        [--bootstrap 1000] [--seed 0] [--json FILE]

``judge train`` holds out a share of its own folder's items (12 of 60 on our
pair). A second mining folder (more items of the task, or another task: the
head's transfer) gives a larger and independent test: every labelled
mismatch there is scored with the head as training scored it
(``JudgeHead.score_numpy`` on ``features.assemble`` of the head's spec), and
the command prints:

- the head's ROC AUC, P(an important mismatch scores higher), with a 95%
  bootstrap interval resampling items; the raw logit signals' on the same
  rows (margin, -top_logprob, entropy); the average precision;
- at the head's own threshold and each ``--threshold``: the shares of the
  important (exact 95% interval) and of the unimportant mismatches that the
  gate, which accepts p < t, would accept, and the important share of what
  it accepts.

Items of the head's own mining folder (its summary lists them) are dropped
and counted: they are not held out. The head must be for the folder's pair
(models, hidden size, vocabulary) and read components the folder recorded.
Exit 0; 2 on bad input, with one line saying why.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fly_vllm.judge import run_command
from fly_vllm.judge.evaluate import TrainError, accepted_shares, auc, baseline_scores, bootstrap_ci
from fly_vllm.judge.features import COMPONENTS, assemble
from fly_vllm.judge.head import JudgeHead, JudgeHeadError
from fly_vllm.judge.report import fmt, fmt_ci, jsonable, pct, pct_ci

PROG = "fly-vllm judge assess"


def head_items(head: JudgeHead) -> set[int]:
    """The dataset items of the head's mining folder (train and test)."""
    from fly_vllm.judge.mine import item_index

    items = head.summary.get("mining", {}).get("items")
    return {item_index(i) for i in items} if isinstance(items, list) else set()


def assess(data: dict[str, np.ndarray], meta: dict[str, Any], head: JudgeHead, *,
           thresholds=(), n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The report (a dict) of ``head`` on a mining folder's arrays."""
    from sklearn.metrics import average_precision_score

    from fly_vllm.judge.train import labelled_rows

    pair = meta["pair"]
    try:
        head.check_pair(target=pair.get("target"), drafter=pair.get("drafter"),
                        hidden_size=pair.get("hidden_size"), vocab_size=pair.get("vocab_size"))
    except JudgeHeadError as e:
        raise TrainError(str(e)) from None
    missing = [n for n in head.features if n not in data]
    if missing:
        raise TrainError(f"the head reads {', '.join(missing)}, which the mining folder did "
                         "not record")
    rows = labelled_rows(data)
    seen = np.isin(rows["item"], sorted(head_items(head)))
    dropped = {"rows": int(seen.sum()), "items": int(np.unique(rows["item"][seen]).shape[0])}
    rows = {k: v[~seen] for k, v in rows.items()}
    y = rows["important"].astype(np.int64)
    if y.shape[0] == 0 or y.min() == y.max():
        raise TrainError(f"{y.shape[0]} labelled mismatches on items the head did not see"
                         + ("" if y.shape[0] == 0 else ", all of one kind")
                         + ": nothing to assess; mine other items")
    parts = {n: rows[n] for n in COMPONENTS if n in rows}
    p = head.score_numpy(assemble(parts, head.features))
    scores = {"head": p, **baseline_scores(parts)}
    ci = bootstrap_ci(y, scores, rows["item"], n_boot, seed)
    cuts = [{"threshold": float(head.threshold), "default": True}]
    cuts += [{"threshold": float(t), "default": False} for t in thresholds]
    for cut in cuts:
        cut.update(accepted_shares(p, y, cut["threshold"]))
    mining = head.summary.get("mining", {})
    return {
        "head": {"path": head.path, "features": list(head.features),
                 "threshold": float(head.threshold), "trained_on": mining.get("task"),
                 "trained_items": len(head_items(head)),
                 "train_test_auc": head.summary.get("test_auc")},
        "task": meta.get("task"), "pair": pair,
        "n_items": int(np.unique(rows["item"]).shape[0]), "n_labels": int(y.shape[0]),
        "important_share": float(y.mean()), "dropped_seen": dropped,
        "auc": {k: {"auc": auc(y, s), "auc_ci": ci[k]} for k, s in scores.items()},
        "average_precision": float(average_precision_score(y, p)),
        "thresholds": cuts, "bootstrap": n_boot, "seed": seed,
    }


def report_text(r: dict[str, Any]) -> str:
    h = r["head"]
    task = r["task"] if r["task"] == h["trained_on"] else f"{r['task']} (transfer from " \
        f"{h['trained_on']})"
    lines = [f"head {h['path']} ({'+'.join(h['features'])}; held-out AUC in training "
             f"{fmt(h['train_test_auc'])}) on {r['n_labels']} labelled mismatches from "
             f"{r['n_items']} items of {task}, {pct(r['important_share'])} important"]
    if r["dropped_seen"]["rows"]:
        lines.append(f"dropped {r['dropped_seen']['rows']} rows of "
                     f"{r['dropped_seen']['items']} items the head was mined on")
    lines.append("ROC AUC (95% interval, items resampled); 0.5 is chance:")
    for k, v in r["auc"].items():
        lines.append(f"  {k:16s} {fmt(v['auc'])} {fmt_ci(v['auc_ci'])}")
    lines.append(f"average precision {fmt(r['average_precision'])} "
                 f"(base rate {fmt(r['important_share'])})")
    lines.append("a gate accepting p < t would accept:")
    for c in r["thresholds"]:
        lines.append(
            f"  t {c['threshold']:.3g}{' (the head default)' if c['default'] else ''}: "
            f"{pct(c['accepted_unimportant'])} of the unimportant, "
            f"{pct(c['accepted_important'])} {pct_ci(c['accepted_important_ci'])} of the "
            f"important; {pct(c['important_of_accepted'])} of its accepts important")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mine_dir", help="a `fly-vllm judge mine` folder")
    ap.add_argument("--head", required=True, help="a `fly-vllm judge train` head file")
    ap.add_argument("--threshold", type=float, action="append", default=[],
                    help="also report this threshold (repeatable)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the report here too")
    return ap


def _check(args) -> str | None:
    if args.bootstrap < 1:
        return f"--bootstrap must be at least 1; got {args.bootstrap}"
    bad = [t for t in args.threshold if not 0.0 <= t <= 1.0]
    return f"--threshold must be in [0, 1]; got {bad[0]}" if bad else None


def run(args: argparse.Namespace) -> int:
    from fly_vllm.judge.train import load_mining

    try:
        head = JudgeHead.load(args.head)
    except (OSError, JudgeHeadError) as e:
        raise TrainError(str(e)) from None
    data, meta = load_mining(args.mine_dir)
    r = assess(data, meta, head, thresholds=args.threshold, n_boot=args.bootstrap,
               seed=args.seed)
    r["mine_dir"], r["command"] = str(args.mine_dir), " ".join([PROG, *args.argv])
    print(report_text(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(jsonable(r), indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, parser(), run, TrainError, argv, _check)
