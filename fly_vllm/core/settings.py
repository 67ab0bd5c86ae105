"""Per-request settings: the server's FLy config with each request's own
overrides (``SamplingParams.extra_args``), and the [B] tensors the rules read.

A request is known to the core as ``(req_id, sampling_params)``; each runner
adapter finds these for its batch rows (None where unknown, as in vLLM's
warm-up runs, which then get the server's defaults).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fly_vllm.config import FlyConfig, FlyConfigError, request_overrides
from fly_vllm.verifier import prefix_start

INF = float("inf")
# Settings are cached per request id; the cache is cleared past this size.
MAX_CACHED = 4096


class RequestSettings(NamedTuple):
    """One request's effective FLy settings (server defaults + overrides)."""

    threshold: float  # FLy's entropy threshold (0 = no entropy test), or FSD's T; +inf = strict
    window: int
    structured: bool
    stop_ids: tuple[int, ...]
    stop_strs: tuple[str, ...]
    margin: float = INF  # FLy's margin gate bound; +inf = no margin test
    strict_prefix: int = 0  # first generated tokens verified exactly
    judge: float | None = None  # the judge's threshold under gate judge, else None


class RequestParams(NamedTuple):
    """A batch's settings as [B] tensors on the verification device."""

    threshold: torch.Tensor  # [B] float32: entropy threshold (FLy) or T (FSD); +inf strict
    window: torch.Tensor  # [B] int64: W
    span: torch.Tensor  # [B] int64: positions the window checks after a candidate
    margin: torch.Tensor | None  # [B] float32 margin bounds; None when no request has one
    loose_from: torch.Tensor | None  # [B] int64 first loose position; None: no strict prefix


def gate_limits(gate: str, entropy_threshold: float, margin: float) -> tuple[float, float]:
    """(entropy threshold, margin bound) the verifier applies for a gate: a
    test the gate does not use gets the bound that always passes."""
    return (entropy_threshold if gate in ("entropy", "both") else 0.0,
            margin if gate in ("margin", "both") else INF)


class SettingsTable:
    """Each request's settings, computed once per request and cached."""

    def __init__(self, fly: FlyConfig, k: int, judge_default: float | None = None):
        self.fly, self.k = fly, k
        # The judge's threshold when neither the request nor the config sets
        # one: the head's own default.
        self.judge_default = judge_default
        self._cache: dict[str, RequestSettings] = {}

    def _limits(self, ov: dict) -> tuple[float, float]:
        fly = self.fly
        if ov.get("strict", fly.strict):
            return INF, INF
        if fly.rule == "fsd":
            return ov.get("fsd_threshold", fly.fsd_threshold), INF
        return gate_limits(ov.get("gate", fly.gate),
                           ov.get("entropy_threshold", fly.entropy_threshold),
                           ov.get("margin", fly.margin))

    def _judge(self, ov: dict) -> float | None:
        fly = self.fly
        if ov.get("strict", fly.strict) or ov.get("gate", fly.gate) != "judge":
            return None
        default = fly.judge_threshold if fly.judge_threshold is not None else self.judge_default
        return ov.get("judge_threshold", default)

    def of(self, row: tuple[str, Any] | None) -> RequestSettings:
        """The settings of one batch row, ``(req_id, sampling_params)`` or None."""
        fly = self.fly
        if row is None:
            thr, margin = self._limits({})
            return RequestSettings(thr, fly.window, False, (), (), margin,
                                   fly.strict_prefix_tokens, self._judge({}))
        rid, sp = row
        cached = self._cache.get(rid)
        if cached is not None:
            return cached
        try:
            ov = request_overrides(getattr(sp, "extra_args", None), self.k,
                                   fly.entropy_top_k, fly)
        except FlyConfigError:  # validated by the front-end; be safe anyway
            ov = {}
        thr, margin = self._limits(ov)
        stops = getattr(sp, "stop", None) or ()
        out = RequestSettings(
            threshold=thr,
            window=ov.get("window", fly.window),
            structured=getattr(sp, "structured_outputs", None) is not None,
            stop_ids=tuple(getattr(sp, "all_stop_token_ids", None) or ()),
            stop_strs=(stops,) if isinstance(stops, str) else tuple(stops),
            margin=margin,
            strict_prefix=ov.get("strict_prefix_tokens", fly.strict_prefix_tokens),
            judge=self._judge(ov),
        )
        if len(self._cache) > MAX_CACHED:
            self._cache.clear()
        self._cache[rid] = out
        return out

    def batch(self, rows: list) -> list[RequestSettings]:
        return [self.of(r) for r in rows]

    def params(self, settings: list[RequestSettings], device: torch.device,
               num_generated=None) -> RequestParams:
        """The batch's [B] tensors. ``num_generated`` ([B] list or tensor:
        output tokens each request had before this step) is needed only
        where a request has a strict prefix."""
        win = [st.window for st in settings]
        # W = 0 (the judge without a window) checks nothing under either convention.
        span = [w if self.fly.window_convention == "vllm" else max(w - 1, 0) for w in win]
        loose_from = None
        if any(st.strict_prefix for st in settings):
            gen = (torch.zeros(len(settings), dtype=torch.int64) if num_generated is None
                   else torch.as_tensor(num_generated, dtype=torch.int64))
            loose_from = prefix_start(
                torch.tensor([st.strict_prefix for st in settings], dtype=torch.int64,
                             device=gen.device), gen).to(device)
        margins = [st.margin for st in settings]
        return RequestParams(
            torch.tensor([st.threshold for st in settings], dtype=torch.float32,
                         device=device),
            torch.tensor(win, dtype=torch.int64, device=device),
            torch.tensor(span, dtype=torch.int64, device=device),
            None if all(m == INF for m in margins) else torch.tensor(
                margins, dtype=torch.float32, device=device),
            loose_from,
        )
