"""The verifier-side recorder that ``fly-vllm judge mine`` switches on.

With ``FLY_VLLM_JUDGE_RECORD=DIR`` in the worker's environment, each
verification step writes, for every request whose drafts were not all
accepted, its *first* mismatch: the position where the drafter's token,
given the target's own text so far, differs from the target's choice (under
strict verification the text before it is the target's greedy text). One file
per step, ``DIR/<pid>-<n>.npz``:

    req_id [M] (vLLM's internal id), gen [M] (tokens the request had
    generated before the step), i [M] (draft index), pos = gen + i [M] (the
    output position the draft was for), draft [M], target [M] (the target's
    argmax), and every judge feature component (features.COMPONENTS) [M, *],
    computed by ``features.components`` from the step's own tensors: the same
    call the gate makes when serving.

A file ``DIR/PAUSED`` pauses recording (mining's continuations need none).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fly_vllm import metrics
from fly_vllm.judge.features import components

ENV = "FLY_VLLM_JUDGE_RECORD"
PAUSE_FILE = "PAUSED"


class Recorder:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = 0

    @classmethod
    def from_env(cls) -> Recorder | None:
        d = os.environ.get(ENV)
        return cls(d) if d else None

    def active(self) -> bool:
        return not (self.dir / PAUSE_FILE).exists()

    def record(
        self,
        req_ids: list,  # [B] internal ids (None where unknown)
        num_generated: list[int],  # [B]
        native: torch.Tensor,  # [T] bool
        cu_num_draft_tokens: torch.Tensor,  # [B]
        draft_token_ids: torch.Tensor,  # [T]
        target_logits: torch.Tensor,  # [T, V]
        hidden: torch.Tensor | None,  # [R, H]
        rows: torch.Tensor | None,  # [T]
    ) -> int:
        """Write this step's first mismatches; returns how many."""
        if hidden is None or rows is None or not self.active() or not metrics.recording():
            return 0  # (another tensor-parallel rank records the same rows)
        cu = [0] + cu_num_draft_tokens.tolist()
        nat = native.tolist()
        sel, meta = [], []
        for b in range(len(cu) - 1):
            rid = req_ids[b] if b < len(req_ids) else None
            if rid is None:
                continue
            for t in range(cu[b], cu[b + 1]):
                if not nat[t]:
                    i = t - cu[b]
                    g = num_generated[b] if b < len(num_generated) else 0
                    sel.append(t)
                    meta.append((str(rid), g, i, g + i))
                    break
        if not sel:
            return 0
        idx = torch.tensor(sel, dtype=torch.long, device=target_logits.device)
        parts = components(hidden, rows[idx], target_logits[idx], draft_token_ids[idx])
        arrays = {k: v.detach().float().cpu().numpy() for k, v in parts.items()}
        for k in list(arrays):
            if arrays[k].ndim == 2 and arrays[k].shape[1] == 1:
                arrays[k] = arrays[k][:, 0]
        arrays.update(
            req_id=np.array([m[0] for m in meta]),
            gen=np.array([m[1] for m in meta], dtype=np.int64),
            i=np.array([m[2] for m in meta], dtype=np.int64),
            pos=np.array([m[3] for m in meta], dtype=np.int64),
            draft=draft_token_ids[idx].long().cpu().numpy(),
            target=target_logits[idx].argmax(-1).long().cpu().numpy(),
        )
        self.n += 1
        final = self.dir / f"{os.getpid()}-{self.n:07d}.npz"
        tmp = final.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, final)
        return len(sel)


def read(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every record in ``directory``, concatenated (empty dict if none)."""
    files = sorted(Path(directory).glob("*-*.npz"))
    files = [f for f in files if not f.name.endswith(".tmp.npz")]
    if not files:
        return {}
    loaded = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([d[k] for d in loaded]) for k in loaded[0]}
