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
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fly_vllm.judge import run_command
from fly_vllm.judge.features import COMPONENTS, HIDDEN, SCALARS, assemble, check_spec
from fly_vllm.judge.head import JudgeHead
from fly_vllm.judge.report import fmt, fmt_ci, jsonable, pct, write_report

PROG = "fly-vllm judge train"
DEFAULT_C_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-12, 3))  # 1e-6 .. 1e1
AUTO_SPECS = (("h_post",), ("h_pre",), ("h_post", "h_pre"), tuple(SCALARS),
              ("h_post", "margin", "entropy"))
# Scalar signals read raw, as a gate on them would (name: (component, sign)).
BASELINES = {"margin": ("margin", 1.0), "neg_top_logprob": ("top_logprob", -1.0),
             "entropy": ("entropy", 1.0)}
LEARNING_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
TABLE_RECALLS = (0.5, 0.8, 0.9, 0.95, 0.99)
MIN_LABELS = 20
MAX_ITER = 1000
REPRODUCE_TOL = 1e-4
CURVE_POINTS = 200

Log = Callable[[str], None]


class TrainError(ValueError):
    """Input that cannot be trained on; the message says why (exit 2)."""


def _quiet(_: str) -> None:
    pass


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


# ----------------------------------------------------------------- scoring

def auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """P(an important row has the larger score), ties half (the Mann-Whitney
    form of ROC AUC); +-inf scores are fine. None without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = int(y.shape[0]) - n1
    if n1 == 0 or n0 == 0:
        return None
    s = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def make_pipeline(C: float):
    """StandardScaler then an L2 logistic regression (lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()),
                     ("lr", LogisticRegression(C=C, l1_ratio=0.0, solver="lbfgs",
                                               max_iter=MAX_ITER))])


_NOT_CONVERGED = {"fits": 0}


def fit(x: np.ndarray, y: np.ndarray, C: float):
    """A fitted make_pipeline(C); counts fits that hit max_iter."""
    from sklearn.exceptions import ConvergenceWarning

    pipe = make_pipeline(C)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipe.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        _NOT_CONVERGED["fits"] += 1
    return pipe


def cross_validate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float,
                   folds: int) -> tuple[float | None, np.ndarray]:
    """(mean AUC over the folds that hold both classes, out-of-fold scores),
    folds by group (item)."""
    from sklearn.model_selection import GroupKFold

    oof = np.full(y.shape[0], np.nan)
    aucs = []
    for tr, te in GroupKFold(n_splits=folds).split(x, y, groups):
        if np.unique(y[tr]).shape[0] < 2:
            raise TrainError("a cross-validation fold's training part holds only one class; "
                             "mine more items or lower --folds")
        oof[te] = fit(x[tr], y[tr], C).predict_proba(x[te])[:, 1]
        a = auc(y[te], oof[te])
        if a is not None:
            aucs.append(a)
    return (float(np.mean(aucs)) if aucs else None), oof


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, grid, folds: int,
             log: Log = _quiet, label: str = "") -> dict[str, Any]:
    """The C of the grid with the best CV AUC (the smaller C on a tie):
    {"C", "cv_auc", "by_C": [{"C", "cv_auc"}], "oof": scores at that C}."""
    best: dict[str, Any] | None = None
    by_c = []
    for c in sorted(grid):
        score, oof = cross_validate(x, y, groups, c, folds)
        by_c.append({"C": c, "cv_auc": score})
        log(f"[{PROG}] {label}C={c:.3g}: CV AUC {fmt(score, 4)}")
        if score is not None and (best is None or score > best["cv_auc"]):
            best = {"C": c, "cv_auc": score, "oof": oof}
    if best is None:
        raise TrainError("no cross-validation fold held both classes; mine more items")
    best["by_C"] = by_c
    return best


def choose_spec(parts: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, specs,
                grid, folds: int, log: Log = _quiet) -> tuple[dict[str, Any], list[dict]]:
    """Cross-validate every spec over the grid; (the best spec's choose_c
    result with "features" added, the ablation table: one row per spec
    with features, C, cv_auc)."""
    table: list[dict[str, Any]] = []
    best = None
    for spec in specs:
        label = f"features {'+'.join(spec)}, "
        res = choose_c(assemble(parts, spec), y, groups, grid, folds, log, label)
        res["features"] = list(spec)
        table.append({"features": list(spec), "C": res["C"], "cv_auc": res["cv_auc"]})
        if best is None or res["cv_auc"] > best["cv_auc"]:
            best = res
    return best, table


def bootstrap_ci(y: np.ndarray, scores: dict[str, np.ndarray], item: np.ndarray, n_boot: int,
                 seed: int, level: float = 0.95) -> dict[str, list[float] | None]:
    """Per score, the percentile interval of its AUC over ``n_boot``
    resamples of the ITEMS (with replacement, each bringing all its rows);
    resamples without both classes are skipped. None if too few remain."""
    uniq, inverse = np.unique(item, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(uniq.shape[0])]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in scores}
    for _ in range(n_boot):
        pick = rng.integers(0, uniq.shape[0], uniq.shape[0])
        idx = np.concatenate([rows_of[i] for i in pick])
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        for k, s in scores.items():
            draws[k].append(auc(yb, s[idx]))
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, list[float] | None] = {}
    for k, d in draws.items():
        if len(d) < max(20, n_boot // 10):
            out[k] = None
        else:
            out[k] = [float(np.percentile(d, lo_q)), float(np.percentile(d, hi_q))]
    return out


def baseline_scores(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The raw scalar signals (margin, -top_logprob, entropy) present."""
    out = {}
    for name, (comp, sign) in BASELINES.items():
        if comp in parts:
            out[name] = sign * np.asarray(parts[comp], dtype=np.float64).reshape(-1)
    return out


def learning_curve(x_tr: np.ndarray, y_tr: np.ndarray, item_tr: np.ndarray, x_te: np.ndarray,
                   y_te: np.ndarray, C: float, seed: int,
                   fractions=LEARNING_FRACTIONS, log: Log = _quiet) -> list[dict[str, Any]]:
    """Held-out AUC after fitting on the first ``fraction`` of the training
    items in a seeded order (the same C); test_auc None where the subset
    holds one class."""
    items = np.unique(item_tr)
    order = items[np.random.default_rng(seed + 1).permutation(items.shape[0])]
    out = []
    for f in fractions:
        k = max(1, int(math.ceil(f * items.shape[0] - 1e-9)))
        rows = np.isin(item_tr, order[:k])
        point: dict[str, Any] = {"fraction": f, "n_items": k, "n_rows": int(rows.sum()),
                                 "test_auc": None}
        if np.unique(y_tr[rows]).shape[0] == 2:
            p = fit(x_tr[rows], y_tr[rows], C).predict_proba(x_te)[:, 1]
            point["test_auc"] = auc(y_te, p)
        log(f"[{PROG}] learning curve: {k} training items -> held-out AUC "
            f"{fmt(point['test_auc'], 4)}")
        out.append(point)
    return out


def recall_threshold(p: np.ndarray, y: np.ndarray, recall: float) -> float:
    """The largest t with share(p >= t | important) >= recall."""
    imp = np.sort(np.asarray(p, dtype=np.float64)[np.asarray(y) == 1])[::-1]
    if imp.shape[0] == 0:
        raise TrainError("no important mismatch among the training rows")
    k = min(imp.shape[0], max(1, int(math.ceil(recall * imp.shape[0] - 1e-9))))
    return float(imp[k - 1])


def accepted_shares(p: np.ndarray, y: np.ndarray, t: float) -> dict[str, Any]:
    """What a gate accepting p < t takes: shares of the unimportant (the
    gain) and important (the harm, with its exact 95% interval)."""
    from fly_vllm.bench.scoring import exact_ci

    acc = p < t
    imp, unimp = y == 1, y == 0
    k_imp, n_imp = int((acc & imp).sum()), int(imp.sum())
    k_un, n_un = int((acc & unimp).sum()), int(unimp.sum())
    return {
        "accepted_unimportant": k_un / n_un if n_un else None,
        "accepted_important": k_imp / n_imp if n_imp else None,
        "accepted_important_ci": list(exact_ci(k_imp, n_imp)) if n_imp else None,
        "accepted_all": float(acc.mean()) if acc.shape[0] else None,
        "n_important": n_imp, "n_unimportant": n_un,
    }


def threshold_table(oof: np.ndarray, y_tr: np.ndarray, p_te: np.ndarray, y_te: np.ndarray,
                    recall: float, recalls=TABLE_RECALLS) -> list[dict[str, Any]]:
    """One row per out-of-fold recall target (the default's among them,
    flagged) plus the plain p < 0.5 cut: the threshold and what it accepts
    on the held-out rows."""
    rows = []
    for r in sorted(set(recalls) | {recall}):
        t = recall_threshold(oof, y_tr, r)
        rows.append({"target_recall": r, "threshold": t, "default": r == recall})
    rows.append({"target_recall": None, "threshold": 0.5, "default": False})
    imp_oof = oof[y_tr == 1]
    for row in rows:
        t = row["threshold"]
        row["oof_recall"] = float((imp_oof >= t).mean())
        row.update(accepted_shares(p_te, y_te, t))
    return rows


# -------------------------------------------------------------------- head

def head_from_pipeline(pipe, spec, threshold: float, pair: dict,
                       summary: dict | None = None) -> JudgeHead:
    scaler, lr = pipe.named_steps["scale"], pipe.named_steps["lr"]
    return JudgeHead(features=tuple(spec), weights=lr.coef_[0], bias=float(lr.intercept_[0]),
                     mean=scaler.mean_, scale=scaler.scale_, threshold=float(threshold),
                     pair=dict(pair), summary=summary or {})


def reproduction_error(head: JudgeHead, pipe, parts: dict[str, np.ndarray]) -> float:
    """max |head score - pipeline predict_proba[:, 1]| on these rows, the
    head reading ``assemble(parts, head.features)`` as serving does."""
    x = assemble(parts, head.features)
    return float(np.max(np.abs(head.score_numpy(x) - pipe.predict_proba(x)[:, 1])))


def _curve(xs: np.ndarray, ys: np.ndarray, ts: np.ndarray | None = None) -> dict[str, list]:
    """A curve thinned to at most CURVE_POINTS points (ends kept)."""
    n = xs.shape[0]
    keep = np.unique(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int))
    out = {"x": [float(v) for v in xs[keep]], "y": [float(v) for v in ys[keep]]}
    if ts is not None:
        tk = keep[keep < ts.shape[0]]
        out["threshold"] = [float(v) for v in ts[tk]]
    return out


def curves(y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per score, its ROC (x: false, y: true positive rate) and
    precision/recall (x: recall, y: precision) curves, thinned."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    out = {}
    for name, s in scores.items():
        s = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=0.0, posinf=1e30, neginf=-1e30)
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, thr = precision_recall_curve(y, s)
        out[name] = {"roc": _curve(fpr, tpr), "pr": _curve(rec, prec, thr)}
    return out


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
    pipe = fit(x_tr, y_tr, C)
    p_te = pipe.predict_proba(x_te)[:, 1]

    threshold = recall_threshold(best["oof"], y_tr, recall)
    table = threshold_table(best["oof"], y_tr, p_te, y_te, recall)
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
