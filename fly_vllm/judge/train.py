"""``fly-vllm judge train``: fit the judge head on a mining folder.

    fly-vllm judge train MINE_DIR [--features h_post|auto|A,B,...] [--C LIST]
        [--folds 5] [--test-share 0.2] [--seed 0] [--recall 0.9]
        [--bootstrap 1000] [--out FILE] [--report-dir DIR]

MINE_DIR is what ``fly-vllm judge mine`` wrote: ``dataset.npz`` (one row per
mismatched draft position: ``item``, ``pos``, ``draft``, ``target``,
``important`` (1, 0, or -1 for not labelled, dropped here) and one array per
feature component) and ``meta.json`` (the pair, the task, K, ...).

1. The labelled rows are split BY ITEM (a dataset item's rows are never on
   both sides): ``--test-share`` of the items, drawn with ``--seed``, are held
   out; the rest are the training items.
2. On the training items only, a logistic regression (L2, standardised
   features; a scikit-learn Pipeline, so the scaler is fitted inside each
   fold) is cross-validated with folds by item (``--folds``), ROC AUC as the
   metric, over the C grid (``--C``; default 10^-6 .. 10^1 in half-decade
   steps). ``--features auto`` does the same for a few feature specs and
   keeps the best (the ablation table of the report).
3. The chosen spec and C are refitted on all training items: that fit is the
   head. The held-out items then give its ROC AUC (95% bootstrap interval,
   resampling items), its average precision and precision/recall curve, and
   the AUCs of the scalar signals read raw (margin, -top_logprob, entropy)
   on the same rows; the learning curve refits on 25..100% of the training
   items.
4. The default threshold is the largest t at which at least ``--recall`` of
   the important mismatches in the out-of-fold training scores have
   p >= t: the gate (which accepts a mismatch when p < t) would then accept
   at most 1 - recall of the important ones. The held-out rows show what it
   and a few other thresholds accept.

Every AUC here is P(an important row has the larger value), ties counting
half, as ``fly_vllm.bench.parting.separation``: 0.5 is chance.

Writes the head (``--out``, default MINE_DIR/head.json) and a report folder
(``--report-dir``, default MINE_DIR/train-report/): report.json, report.md
and pr.png (ROC and precision/recall of the head and the baselines).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fly_vllm.judge import run_command
from fly_vllm.judge.evaluate import (BASELINES, TrainError, auc, baseline_scores, bootstrap_ci,
                                     curves, recall_threshold, reliability, threshold_table)
from fly_vllm.judge.features import COMPONENTS, HIDDEN, SCALARS, assemble, check_spec
from fly_vllm.judge.fit import (_NOT_CONVERGED, DEFAULT_C_GRID, MAX_ITER, PROG, Calibrated, Log,
                                _quiet, choose_spec, fit, head_from_pipeline, learning_curve,
                                platt, reproduction_error, sigmoid)
from fly_vllm.judge.head import JudgeHead
from fly_vllm.judge.report import fmt, fmt_ci, jsonable, pct, write_report

AUTO_SPECS = (("h_post",), ("h_pre",), ("h_post", "h_pre"), tuple(SCALARS),
              ("h_post", "margin", "entropy"))
MIN_LABELS = 20
REPRODUCE_TOL = 1e-4


# ------------------------------------------------------------------- input

def load_mining(mine_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays of MINE_DIR/dataset.npz and the dict of meta.json."""
    folder = Path(mine_dir)
    if not folder.is_dir():
        raise TrainError(f"mining folder {folder} not found; write one with `fly-vllm judge mine`")
    npz, meta_file = folder / "dataset.npz", folder / "meta.json"
    for f in (npz, meta_file):
        if not f.is_file():
            raise TrainError(f"{f} not found: {folder} is not a finished `fly-vllm judge mine` "
                             "folder")
    try:
        with np.load(npz, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise TrainError(f"{npz} cannot be read: {e}") from None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{meta_file} cannot be read: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("pair"), dict):
        raise TrainError(f"{meta_file} has no \"pair\" object")
    missing = [k for k in ("item", "important") if k not in data]
    if missing:
        raise TrainError(f"{npz} lacks {', '.join(missing)}")
    n = data["item"].shape[0]
    bad = [k for k, v in data.items() if v.ndim == 0 or v.shape[0] != n]
    if bad:
        raise TrainError(f"{npz}: arrays {', '.join(bad)} do not have one row per mismatch "
                         f"({n} items)")
    return data, meta


def labelled_rows(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows labelled 0 or 1 (-1, not labelled yet, is dropped)."""
    keep = np.isin(data["important"], (0, 1))
    return {k: v[keep] for k, v in data.items()}


def check_sample(y: np.ndarray, item: np.ndarray, folds: int) -> None:
    """TrainError when the labelled rows cannot support the training."""
    n = int(y.shape[0])
    if n < MIN_LABELS:
        raise TrainError(f"only {n} labelled mismatches (need at least {MIN_LABELS}); "
                         "mine more items")
    classes = np.unique(y)
    if classes.shape[0] < 2:
        kind = "important" if classes[0] == 1 else "unimportant"
        raise TrainError(f"all {n} labelled mismatches are {kind}: a judge needs both kinds; "
                         "mine more items")
    n_items = int(np.unique(item).shape[0])
    if n_items < folds:
        raise TrainError(f"the labelled mismatches come from {n_items} items, fewer than "
                         f"--folds {folds}; mine more items or lower --folds")


def parse_features(text: str) -> list[tuple[str, ...]]:
    """``auto`` -> AUTO_SPECS; else one comma-separated spec."""
    if text.strip() == "auto":
        return [tuple(s) for s in AUTO_SPECS]
    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        return [check_spec(names)]
    except ValueError as e:
        raise TrainError(str(e)) from None


def parse_c_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise TrainError(f"--C: not a comma-separated list of numbers: {text!r}") from None
    if not grid or not all(math.isfinite(c) and c > 0 for c in grid):
        raise TrainError(f"--C: every C must be a positive number; got {text!r}")
    return grid


# ------------------------------------------------------------------- split

def split_items(item: np.ndarray, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training items, held-out items), sorted and disjoint: a seeded share
    of the distinct items (at least one, leaving at least one) is held out."""
    if not 0.0 < test_share < 1.0:
        raise TrainError(f"--test-share must be between 0 and 1; got {test_share}")
    items = np.unique(item)
    if items.shape[0] < 2:
        raise TrainError("need at least 2 items to hold some out")
    n_test = min(items.shape[0] - 1, max(1, int(round(test_share * items.shape[0]))))
    order = np.random.default_rng(seed).permutation(items.shape[0])
    test = np.sort(items[order[:n_test]])
    train = np.sort(items[order[n_test:]])
    return train, test


# ----------------------------------------------------------------- training

@dataclass
class Trained:
    head: JudgeHead  # its summary is report["summary"]
    report: dict[str, Any]  # summary, pair, test_items, curves
    pipeline: Any  # the fitted sklearn Pipeline the head was read from
    test_parts: dict[str, np.ndarray]  # the held-out rows' components


def train(data: dict[str, np.ndarray], meta: dict[str, Any], *, specs, c_grid=DEFAULT_C_GRID,
          folds: int = 5, test_share: float = 0.2, seed: int = 0, recall: float = 0.9,
          n_boot: int = 1000, command: str | None = None, log: Log = _quiet) -> Trained:
    """The whole computation on a loaded mining folder. Writes nothing."""
    import sklearn
    from sklearn.metrics import average_precision_score

    if folds < 2:
        raise TrainError(f"--folds must be at least 2; got {folds}")
    if not 0.0 < recall <= 1.0:
        raise TrainError(f"--recall must be in (0, 1]; got {recall}")
    n_all = int(data["item"].shape[0])
    data = labelled_rows(data)
    y = data["important"].astype(np.int64)
    item = data["item"].astype(np.int64)
    check_sample(y, item, folds)
    specs = [check_spec(s) for s in specs]
    needed = sorted({n for s in specs for n in s})
    missing = [n for n in needed if n not in data]
    if missing and len(specs) > 1:
        specs = [s for s in specs if all(n in data for n in s)]
        log(f"[{PROG}] dataset lacks {', '.join(missing)}: skipping the specs that read it")
        if not specs:
            raise TrainError(f"dataset.npz lacks {', '.join(missing)}: no spec can be built")
    elif missing:
        raise TrainError(f"dataset.npz lacks the component(s) {', '.join(missing)}")
    pair = dict(meta["pair"])
    hidden = pair.get("hidden_size")
    for name in HIDDEN:
        if any(name in s for s in specs):
            width = data[name].reshape(data[name].shape[0], -1).shape[1]
            if not isinstance(hidden, int) or hidden != width:
                raise TrainError(f"meta.json's pair.hidden_size {hidden!r} does not match "
                                 f"{name}'s width {width}")
    parts = {n: data[n] for n in COMPONENTS if n in data}

    train_items, test_items = split_items(item, test_share, seed)
    if train_items.shape[0] < folds:
        raise TrainError(f"{train_items.shape[0]} training items after holding out "
                         f"{test_items.shape[0]}, fewer than --folds {folds}; mine more items, "
                         "lower --folds or --test-share")
    is_tr = np.isin(item, train_items)
    is_te = ~is_tr
    tr = {k: v[is_tr] for k, v in parts.items()}
    te = {k: v[is_te] for k, v in parts.items()}
    y_tr, y_te, item_tr, item_te = y[is_tr], y[is_te], item[is_tr], item[is_te]
    log(f"[{PROG}] {int(y.shape[0])} labelled mismatches of {n_all} from "
        f"{np.unique(item).shape[0]} items ({y.mean():.1%} important): "
        f"{train_items.shape[0]} training items ({int(is_tr.sum())} rows), "
        f"{test_items.shape[0]} held out ({int(is_te.sum())} rows)")
    if np.unique(y_tr).shape[0] < 2:
        raise TrainError("the training items hold only one class; mine more items")
    _NOT_CONVERGED["fits"] = 0

    best, ablation = choose_spec(tr, y_tr, item_tr, specs, c_grid, folds, log)
    spec, C = tuple(best["features"]), best["C"]
    log(f"[{PROG}] chosen: features {'+'.join(spec)}, C={C:.3g} (CV AUC {best['cv_auc']:.4f}); "
        "refitting on all training items")
    x_tr, x_te = assemble(tr, spec), assemble(te, spec)
    a, c = platt(best["oof"], y_tr)
    oof = sigmoid(a * best["oof"] + c)  # out-of-fold p, calibrated
    pipe = Calibrated(fit(x_tr, y_tr, C), a, c)
    p_te = pipe.predict_proba(x_te)[:, 1]
    log(f"[{PROG}] Platt scaling on the out-of-fold logits: p = sigmoid({a:.4g} z "
        f"{'+' if c >= 0 else '-'} {abs(c):.4g})")

    threshold = recall_threshold(oof, y_tr, recall)
    table = threshold_table(oof, y_tr, p_te, y_te, recall)
    base = baseline_scores(te)
    scores = {"head": p_te, **base}
    ci = bootstrap_ci(y_te, scores, item_te, n_boot, seed)
    test_auc = auc(y_te, p_te)
    two_classes = np.unique(y_te).shape[0] == 2
    ap = float(average_precision_score(y_te, p_te)) if two_classes else None
    baselines = {name: {"auc": auc(y_te, s), "auc_ci": ci[name],
                        "reads": ("-" if BASELINES[name][1] < 0 else "") + BASELINES[name][0]}
                 for name, s in base.items()}
    lc = learning_curve(x_tr, y_tr, item_tr, x_te, y_te, C, seed, log=log)

    import platform

    summary: dict[str, Any] = {
        "C": C,
        "features": list(spec),
        "cv_auc": best["cv_auc"],
        "test_auc": test_auc,
        "test_auc_ci": ci["head"],
        "ap": ap,
        "n_labels": int(y.shape[0]),
        "n_items": int(np.unique(item).shape[0]),
        "n_train_items": int(train_items.shape[0]),
        "n_test_items": int(test_items.shape[0]),
        "n_train_rows": int(is_tr.sum()),
        "n_test_rows": int(is_te.sum()),
        "n_unlabelled_dropped": n_all - int(y.shape[0]),
        "important_share": float(y.mean()),
        "test_important_share": float(y_te.mean()) if y_te.shape[0] else None,
        "baselines": baselines,
        "learning_curve": lc,
        "recall": recall,
        "threshold": threshold,
        "thresholds": table,
        "calibration": {"method": "Platt scaling on the out-of-fold logits", "a": a, "c": c,
                        "out_of_fold": reliability(oof, y_tr),
                        "held_out": reliability(p_te, y_te)},
        "ablation": ablation,
        "cv_by_C": best["by_C"],
        "folds": folds,
        "test_share": test_share,
        "seed": seed,
        "bootstrap": n_boot,
        "not_converged_fits": _NOT_CONVERGED["fits"], "max_iter": MAX_ITER,
        "mining": {k: v for k, v in meta.items() if k != "pair"},
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    summary = jsonable(summary)
    head = head_from_pipeline(pipe, spec, threshold, pair, summary)
    report = {"summary": summary, "pair": pair, "test_items": [int(i) for i in test_items],
              "curves": curves(y_te, scores) if two_classes else None}
    return Trained(head, report, pipe, te)


# --------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mine_dir", metavar="MINE_DIR", help="a `fly-vllm judge mine` folder")
    ap.add_argument("--features", default="h_post",
                    help="comma-separated components of " + ",".join(COMPONENTS)
                    + ", or auto (compare a few specs by CV AUC); default h_post")
    ap.add_argument("--C", dest="C", default=None,
                    help="comma-separated C values to cross-validate (default 1e-6 .. 10 in "
                    "half-decade steps)")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (by item)")
    ap.add_argument("--test-share", type=float, default=0.2,
                    help="share of the items held out for the report (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and bootstrap")
    ap.add_argument("--recall", type=float, default=0.9,
                    help="the default threshold keeps this share of the important mismatches "
                    "at p >= t on out-of-fold scores (default 0.9)")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="bootstrap draws of the held-out items for the AUC intervals")
    ap.add_argument("--out", default=None, help="the head file (default MINE_DIR/head.json)")
    ap.add_argument("--report-dir", default=None,
                    help="report folder (default MINE_DIR/train-report)")
    return ap


def run(args: argparse.Namespace) -> int:
    log = lambda line: print(line, flush=True)  # noqa: E731
    specs = parse_features(args.features)
    grid = DEFAULT_C_GRID if args.C is None else parse_c_grid(args.C)
    data, meta = load_mining(args.mine_dir)
    argv = getattr(args, "argv", None) or []
    command = " ".join([PROG, *(shlex.quote(a) for a in argv)])
    t = train(data, meta, specs=specs, c_grid=grid, folds=args.folds,
              test_share=args.test_share, seed=args.seed, recall=args.recall,
              n_boot=args.bootstrap, command=command, log=log)
    head, report = t.head, t.report
    out = Path(args.out) if args.out else Path(args.mine_dir) / "head.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    head.save(out)

    # The saved head, read back as serving reads it, must score the held-out
    # rows as the fitted pipeline does.
    err = reproduction_error(JudgeHead.load(out), t.pipeline, t.test_parts)
    if not err < REPRODUCE_TOL:
        raise RuntimeError(f"the saved head {out} scores the held-out rows up to {err:.3g} away "
                           f"from the fitted pipeline (tolerance {REPRODUCE_TOL}): a bug in "
                           "the head's format or in train.py")
    report["head"] = str(out)
    report["head_reproduction_max_abs_diff"] = err
    folder = write_report(report, args.report_dir or Path(args.mine_dir) / "train-report")

    s = head.summary
    log(f"[{PROG}] head: {'+'.join(s['features'])}, C={s['C']:.3g}, CV AUC {fmt(s['cv_auc'])}; "
        f"held-out AUC {fmt(s['test_auc'])} {fmt_ci(s['test_auc_ci'])}, AP {fmt(s['ap'])}; "
        + ", ".join(f"{b['reads']} {fmt(b['auc'])}" for b in s["baselines"].values()))
    d = next(r for r in s["thresholds"] if r["default"])
    log(f"[{PROG}] threshold {head.threshold:.4f} (recall {s['recall']:g}): held out, accepts "
        f"{pct(d['accepted_unimportant'])} of unimportant and "
        f"{pct(d['accepted_important'])} of important mismatches")
    log(f"[{PROG}] wrote {out} and {folder}/ (report.md, report.json, pr.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, parser(), run, TrainError, argv)


if __name__ == "__main__":
    sys.exit(main())
