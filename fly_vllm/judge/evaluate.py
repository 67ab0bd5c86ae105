"""The held-out statistics of ``fly-vllm judge train``: what a head's (or a
raw signal's) scores say about the labels, with nothing fitted here.

Every array is one row per labelled mismatch: ``y`` [N] the labels (1
important, 0 not), ``p`` / ``s`` [N] scores (the head's probability, or a
scalar signal read raw, larger meaning more likely important), ``item`` [N]
the dataset item of each row (bootstrap resamples whole items). ``auc`` is
also the cross-validation metric of fit.py, which imports it from here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Scalar signals read raw, as a gate on them would (name: (component, sign)).
BASELINES = {"margin": ("margin", 1.0), "neg_top_logprob": ("top_logprob", -1.0),
             "entropy": ("entropy", 1.0)}
TABLE_RECALLS = (0.5, 0.8, 0.9, 0.95, 0.99)
CURVE_POINTS = 200


class TrainError(ValueError):
    """Input that cannot be trained on; the message says why (exit 2).
    Defined here, the module the others import, as all three raise it."""


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


def recall_threshold(p: np.ndarray, y: np.ndarray, recall: float) -> float:
    """The largest t with share(p >= t | important) >= recall."""
    imp = np.sort(np.asarray(p, dtype=np.float64)[np.asarray(y) == 1])[::-1]
    if imp.shape[0] == 0:
        raise TrainError("no important mismatch among the training rows")
    k = min(imp.shape[0], max(1, int(math.ceil(recall * imp.shape[0] - 1e-9))))
    return float(imp[k - 1])


def accepted_shares(p: np.ndarray, y: np.ndarray, t: float) -> dict[str, Any]:
    """What a gate accepting p < t takes: shares of the unimportant (the
    gain) and important (the harm, with its exact 95% interval), and the
    important share of what it takes."""
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
        "important_of_accepted": k_imp / (k_imp + k_un) if k_imp + k_un else None,
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


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 5) -> list[dict[str, Any]]:
    """Calibration: the rows in ``bins`` groups of equal size by p, each with
    its mean p and the share of it that is important (equal when p is a
    probability); fewer groups where there are fewer rows."""
    order = np.argsort(np.asarray(p, dtype=np.float64), kind="stable")
    out = []
    for g in np.array_split(order, min(bins, order.shape[0])):
        if g.shape[0]:
            out.append({"n": int(g.shape[0]), "mean_p": float(np.mean(p[g])),
                        "important": float(np.mean(y[g]))})
    return out


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
