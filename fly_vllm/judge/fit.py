"""Fitting the judge's logistic regression and choosing its settings, for
``fly-vllm judge train``: the pipeline (standardise, then L2 logistic
regression), the C and feature spec chosen by cross-validated ROC AUC with
folds by item, the learning curve's refits, and the head read off a fitted
pipeline.

``x`` [N, D] is ``features.assemble(parts, spec)`` for N labelled
mismatches, ``y`` [N] their labels (1 important, 0 not), ``groups`` /
``item`` [N] their dataset items; ``parts`` maps a component name to its
rows ([N, H] for a hidden state, [N] for a scalar).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np

from fly_vllm.judge.evaluate import TrainError, auc
from fly_vllm.judge.features import assemble
from fly_vllm.judge.head import JudgeHead
from fly_vllm.judge.report import fmt

PROG = "fly-vllm judge train"  # the command these fits serve: its log lines' prefix
DEFAULT_C_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-12, 3))  # 1e-6 .. 1e1
LEARNING_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MAX_ITER = 1000

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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
    """(mean AUC over the folds that hold both classes, out-of-fold logits
    z = the fold model's decision function), folds by group (item)."""
    from sklearn.model_selection import GroupKFold

    oof = np.full(y.shape[0], np.nan)
    aucs = []
    for tr, te in GroupKFold(n_splits=folds).split(x, y, groups):
        if np.unique(y[tr]).shape[0] < 2:
            raise TrainError("a cross-validation fold's training part holds only one class; "
                             "mine more items or lower --folds")
        oof[te] = fit(x[tr], y[tr], C).decision_function(x[te])
        a = auc(y[te], oof[te])
        if a is not None:
            aucs.append(a)
    return (float(np.mean(aucs)) if aucs else None), oof


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, grid, folds: int,
             log: Log = _quiet, label: str = "") -> dict[str, Any]:
    """The C of the grid with the best CV AUC (the smaller C on a tie):
    {"C", "cv_auc", "by_C": [{"C", "cv_auc"}], "oof": logits at that C}."""
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


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, c) with p = sigmoid(a z + c) fitted to out-of-fold logits ``z``
    [N] and labels ``y`` [N] (Platt scaling): a head regularised for ranking
    at many dimensions is overconfident, and this makes its p a probability
    of importance on items it did not see, keeping its order. (1, 0), no
    change, where the fit would flatten or reverse the order (a <= 0)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e6, max_iter=MAX_ITER).fit(np.reshape(z, (-1, 1)), y)
    a, c = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return (a, c) if a > 0 and np.isfinite([a, c]).all() else (1.0, 0.0)


class Calibrated:
    """A fitted pipeline with Platt's (a, c) on its logits: predict_proba
    [N, 2] = (1 - p, p), p = sigmoid(a * z + c)."""

    def __init__(self, pipe, a: float = 1.0, c: float = 0.0):
        self.pipe, self.a, self.c = pipe, a, c

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return self.a * self.pipe.decision_function(x) + self.c

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = sigmoid(self.decision_function(x))
        return np.stack([1.0 - p, p], axis=1)


def head_from_pipeline(model: Calibrated, spec, threshold: float, pair: dict,
                       summary: dict | None = None) -> JudgeHead:
    """The head scoring as ``model`` does: Platt's a and c folded into the
    regression's weights and bias."""
    scaler, lr = model.pipe.named_steps["scale"], model.pipe.named_steps["lr"]
    return JudgeHead(features=tuple(spec), weights=model.a * lr.coef_[0],
                     bias=model.a * float(lr.intercept_[0]) + model.c,
                     mean=scaler.mean_, scale=scaler.scale_, threshold=float(threshold),
                     pair=dict(pair), summary=summary or {})


def reproduction_error(head: JudgeHead, pipe, parts: dict[str, np.ndarray]) -> float:
    """max |head score - the model's predict_proba[:, 1]| on these rows, the
    head reading ``assemble(parts, head.features)`` as serving does."""
    x = assemble(parts, head.features)
    return float(np.max(np.abs(head.score_numpy(x) - pipe.predict_proba(x)[:, 1])))
