"""The judge's head file: a logistic regression on the judge features, with
the feature spec and the identity of the pair it was trained for.

The head scores a mismatch with ``p = sigmoid(w . (x - mean) / scale + b)``,
the probability that accepting the draft changes the final answer
("important", AutoJudge's label 1). The gate accepts a mismatch when
``p < threshold``: a higher threshold accepts more.

File (JSON, written by ``fly-vllm judge train``)::

    {"format": "fly-vllm-judge/1",
     "features": ["h_post"],              # a spec of features.COMPONENTS
     "weights": [...], "bias": b,         # D weights, on standardised features
     "mean": [...], "scale": [...],       # D each (the StandardScaler's)
     "threshold": t,                      # the default judge_threshold
     "pair": {"target": ..., "drafter": ..., "hidden_size": H, "vocab_size": V},
     "summary": {...}}                    # how it was trained and what it scored

Imports torch only to score; loading and checking need numpy alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fly_vllm.judge.features import HIDDEN, check_spec, width

FORMAT = "fly-vllm-judge/1"


class JudgeHeadError(ValueError):
    """A head file that cannot be used; the message says why and what to do."""


def model_key(name: str | None) -> str | None:
    """How a model is compared between a head and a server: the last part of
    its name or path (``Qwen/Qwen2.5-7B`` and ``/models/Qwen2.5-7B`` match),
    without a trailing slash, case-folded."""
    if not name:
        return None
    return str(name).rstrip("/").rsplit("/", 1)[-1].casefold()


@dataclass
class JudgeHead:
    features: tuple[str, ...]
    weights: np.ndarray  # [D] float32
    bias: float
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    threshold: float
    pair: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        self.features = check_spec(self.features)
        self.weights = np.asarray(self.weights, dtype=np.float32).reshape(-1)
        self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        self.scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        d = self.weights.shape[0]
        if self.mean.shape[0] != d or self.scale.shape[0] != d:
            raise JudgeHeadError(
                f"judge head {self.path or ''}: weights, mean and scale differ in length "
                f"({d}, {self.mean.shape[0]}, {self.scale.shape[0]})")
        hidden = self.pair.get("hidden_size")
        if any(n in HIDDEN for n in self.features):
            if not isinstance(hidden, int) or hidden <= 0:
                raise JudgeHeadError(
                    f"judge head {self.path or ''}: pair.hidden_size must be a positive "
                    f"integer; got {hidden!r}")
        if isinstance(hidden, int) and width(self.features, hidden) != d:
            raise JudgeHeadError(
                f"judge head {self.path or ''}: {d} weights, but features "
                f"{list(self.features)} at hidden size {hidden} need "
                f"{width(self.features, hidden)}")
        finite = [np.isfinite(self.weights).all(), np.isfinite(self.mean).all(),
                  np.isfinite(self.scale).all() and (self.scale > 0).all(),
                  math.isfinite(self.bias)]
        if not all(finite):
            raise JudgeHeadError(
                f"judge head {self.path or ''}: weights, bias, mean and scale must be finite "
                f"(scale > 0)")
        if not 0.0 <= self.threshold <= 1.0:
            raise JudgeHeadError(
                f"judge head {self.path or ''}: threshold must be in [0, 1]; "
                f"got {self.threshold!r}")

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": list(self.features),
            "weights": [float(x) for x in self.weights],
            "bias": float(self.bias),
            "mean": [float(x) for x in self.mean],
            "scale": [float(x) for x in self.scale],
            "threshold": float(self.threshold),
            "pair": dict(self.pair),
            "summary": self.summary,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> JudgeHead:
        """Read and check a head file; JudgeHeadError says what is wrong."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise JudgeHeadError(
                f"judge head {path} not found; train one with `fly-vllm judge train`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise JudgeHeadError(f"judge head {path} cannot be read: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise JudgeHeadError(
                f"judge head {path}: not a {FORMAT} file (format: "
                f"{d.get('format') if isinstance(d, dict) else None!r})")
        missing = [k for k in ("features", "weights", "bias", "mean", "scale", "threshold",
                               "pair") if k not in d]
        if missing:
            raise JudgeHeadError(f"judge head {path}: missing {', '.join(missing)}")
        try:
            return cls(features=tuple(d["features"]), weights=d["weights"],
                       bias=float(d["bias"]), mean=d["mean"], scale=d["scale"],
                       threshold=float(d["threshold"]), pair=dict(d["pair"]),
                       summary=d.get("summary", {}), path=str(path))
        except JudgeHeadError:
            raise
        except (TypeError, ValueError) as e:
            raise JudgeHeadError(f"judge head {path}: {e}") from None

    # ------------------------------------------------------------- the pair

    def pair_differences(self, target: str | None = None, drafter: str | None = None,
                         hidden_size: int | None = None,
                         vocab_size: int | None = None) -> list[str]:
        """What differs between the head's pair and the given one (only the
        values given are compared); empty when it matches."""
        out = []
        for key, ours, theirs in (("target", self.pair.get("target"), target),
                                  ("drafter", self.pair.get("drafter"), drafter)):
            if theirs is not None and ours is not None and model_key(ours) != model_key(theirs):
                out.append(f"{key} {theirs!r} (the head was trained for {ours!r})")
        for key, theirs in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            ours = self.pair.get(key)
            if theirs is not None and ours is not None and int(ours) != int(theirs):
                out.append(f"{key} {theirs} (the head's: {ours})")
        return out

    def check_pair(self, **given) -> None:
        diff = self.pair_differences(**given)
        if diff:
            raise JudgeHeadError(
                f"judge head {self.path or ''} was trained for another pair: "
                + "; ".join(diff)
                + ". Mine and train a head for this pair (`fly-vllm judge mine`, "
                "`fly-vllm judge train`)")

    # ---------------------------------------------------------------- score

    def folded(self, device=None):
        """(w', b') as torch tensors with the scaler folded in:
        ``w . (x - mean) / scale + b = x . w' + b'``."""
        import torch

        w = self.weights / self.scale
        b = self.bias - float(np.dot(w.astype(np.float64), self.mean.astype(np.float64)))
        return (torch.tensor(w, dtype=torch.float32, device=device),
                torch.tensor(b, dtype=torch.float32, device=device))

    def logit_numpy(self, x: np.ndarray) -> np.ndarray:
        """z [N] for a [N, D] feature matrix, unfolded (training's reference)."""
        return ((x - self.mean) / self.scale) @ self.weights.astype(np.float64) + self.bias

    def score_numpy(self, x: np.ndarray) -> np.ndarray:
        """p(important) for a [N, D] feature matrix (training's reference)."""
        return 1.0 / (1.0 + np.exp(-self.logit_numpy(x)))
