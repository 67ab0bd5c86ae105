"""Loose-accept counters, shared across vLLM's processes.

Verification runs in the worker (inside the engine-core process, or in the
user's process in in-process mode); ``LLM.get_metrics()`` and the server's
``/metrics`` read Prometheus in the front-end process. The counters cross that
boundary through small memory-mapped files, one per worker process, in a
folder that the first process to load the plugin creates and names in
``FLY_VLLM_METRICS_DIR`` (spawned children inherit it). A Prometheus collector
in the front-end sums the files at scrape time.

Counters (all ``vllm:fly_*`` so ``LLM.get_metrics()`` returns them):
    vllm:fly_drafts_total                  requests with drafts, per step
    vllm:fly_draft_tokens_total            draft tokens verified
    vllm:fly_native_accepted_tokens_total  accepted by exact (native) match
    vllm:fly_loose_accepted_tokens_total   accepted loosely (rescued)
    vllm:fly_loose_accepted_tokens_per_pos_total{position}
    vllm:fly_loose_accepted_tokens_by_rule_total{rule}
                                           loose accepts by acceptance rule:
                                           "fly" (entropy gate + window) or
                                           "fsd" (divergence test)
    vllm:fly_uncertain_mismatches_total    mismatches that passed the gate
                                           (FSD: passed the divergence test)
    vllm:fly_gated_mismatches_total        confident mismatches (hard rejects;
                                           FSD: mismatches with D > T)
    vllm:fly_guard_vetoes_total            uncertain mismatches on a -inf logit
    vllm:fly_{digit,structured,eos_stop}_guard_vetoes_total
                                           loose accepts vetoed by each guard
    vllm:fly_prefix_exact_mismatches_total mismatches inside a request's
                                           strict prefix (verified exactly;
                                           neither uncertain nor gated)
    vllm:fly_drafter_calls_total           drafter proposals (steps that drafted)
    vllm:fly_drafter_passes_total          drafter forward passes over those
                                           steps (K per step without the
                                           multi-level lookup)
    vllm:fly_drafter_ngram_tokens_total    draft tokens that the multi-level
                                           lookup proposed and the drafter
                                           confirmed
    vllm:fly_flex_truncated_tokens_total   drafts dropped by flex decoding's
                                           confidence truncation
    vllm:fly_flex_skipped_steps_total      steps without drafts where the
                                           drafter did not run
    vllm:fly_flex_catchup_tokens_total     positions the drafter caught up
                                           when drafting resumed
    vllm:fly_verifier_path{path}           workers verifying on each path:
                                           "triton" (the kernels), "torch"
                                           (the reference) or "custom"
                                           (FLY_VLLM_VERIFIER); a gauge
    vllm:fly_verifier_fallbacks_total      accelerated paths that failed their
                                           check or a later call and fell back
                                           to torch: a worker's verifier
                                           (verify_path.py) and its judge
                                           score (judge/score.py), one each
Accepted counts are the verifier's: tokens a stop string later cuts off are
still counted, as in vLLM's own per-position counters.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

ENV_DIR = "FLY_VLLM_METRICS_DIR"
MAX_POSITIONS = 128  # vLLM's MAX_SPEC_LEN

SCALARS = (
    ("drafts", "Requests verified with at least one draft token, summed over steps."),
    ("draft_tokens", "Draft tokens verified by FLy."),
    ("native_accepted_tokens", "Draft tokens accepted by exact match."),
    ("loose_accepted_tokens", "Draft tokens accepted loosely by FLy."),
    ("uncertain_mismatches", "Mismatches that passed the entropy gate."),
    ("gated_mismatches", "Confident mismatches rejected by the entropy gate."),
    ("guard_vetoes", "Uncertain mismatches vetoed because the target logit is -inf."),
    ("digit_guard_vetoes", "Loose accepts vetoed by the digit guard."),
    ("structured_guard_vetoes", "Loose accepts vetoed inside structured output."),
    ("eos_stop_guard_vetoes", "Loose accepts of EOS, stop tokens or stop strings vetoed."),
    ("judge_vetoes",
     "Candidate mismatches the learned judge called important (p(important) >= "
     "judge_threshold) and rejected (gate judge)."),
    ("prefix_exact_mismatches",
     "Mismatches inside a request's strict prefix (strict_prefix_tokens), verified "
     "exactly."),
)
GUARD_RULES = ("digits", "structured", "eos_stop", "judge")
ACCEPT_RULES = ("fly", "fsd")
# The drafter's counters (proposer side), after the verifier's slots.
DRAFTER_SCALARS = (
    ("drafter_calls", "Drafter proposals: steps in which the draft model drafted."),
    ("drafter_passes", "Draft-model forward passes, summed over its proposals."),
    ("drafter_ngram_tokens",
     "Draft tokens proposed by the multi-level n-gram lookup and confirmed by "
     "the draft model."),
    ("flex_truncated_tokens",
     "Draft tokens dropped by flex decoding's confidence truncation."),
    ("flex_skipped_steps",
     "Steps in which flex decoding's schedule gave K = 0 and the drafter did not run."),
    ("flex_catchup_tokens",
     "Positions fed to the drafter when drafting resumed after skipped steps."),
)
INDEX = {name: i for i, (name, _) in enumerate(SCALARS)}
BY_RULE_OFFSET = len(SCALARS)
PER_POS_OFFSET = BY_RULE_OFFSET + len(ACCEPT_RULES)
DRAFTER_OFFSET = PER_POS_OFFSET + MAX_POSITIONS
INDEX.update({name: DRAFTER_OFFSET + i for i, (name, _) in enumerate(DRAFTER_SCALARS)})
# Which verifier each worker runs (verify_path.py), after the drafter's slots:
# a gauge of workers per path, then the fallbacks counter.
VERIFIER_PATHS = ("triton", "torch", "custom")
VERIFIER_OFFSET = DRAFTER_OFFSET + len(DRAFTER_SCALARS)
INDEX.update({f"verifier_path_{p}": VERIFIER_OFFSET + i for i, p in enumerate(VERIFIER_PATHS)})
INDEX["verifier_fallbacks"] = VERIFIER_OFFSET + len(VERIFIER_PATHS)
NUM_SLOTS = INDEX["verifier_fallbacks"] + 1

_lock = threading.Lock()
_store: CounterStore | None = None


def metrics_dir() -> Path:
    """The shared folder; created (and removed at exit) by the first process."""
    d = os.environ.get(ENV_DIR)
    if d and os.path.isdir(d):
        return Path(d)
    d = tempfile.mkdtemp(prefix="fly-vllm-metrics-")
    os.environ[ENV_DIR] = d
    owner = os.getpid()

    def _cleanup() -> None:
        if os.getpid() == owner:
            shutil.rmtree(d, ignore_errors=True)

    atexit.register(_cleanup)
    return Path(d)


class CounterStore:
    """This process's counters: an int64 array backed by a mmap'd file, or
    private to the process (``directory`` None: a rank that does not
    record, see set_recording)."""

    def __init__(self, directory: Path | None):
        if directory is None:
            self.values = np.zeros(NUM_SLOTS, dtype=np.int64)
            return
        path = directory / f"worker-{os.getpid()}.bin"
        self._map = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.int64, shape=(NUM_SLOTS,)
        )
        # A plain ndarray over the same memory: np.memmap's own indexing
        # costs several times more, and this runs every step.
        self.values = self._map.view(np.ndarray)

    def add(self, name: str, value: int) -> None:
        self.values[INDEX[name]] += int(value)

    def add_array(self, counts: np.ndarray) -> None:
        """Add a full [NUM_SLOTS] vector of increments."""
        self.values[: counts.shape[0]] += counts

    def add_first(self, drafts: int, draft_tokens: int, native_accepted: int) -> None:
        """Add to the first three slots: all an exactly verified step changes."""
        v = self.values
        v[0] += drafts
        v[1] += draft_tokens
        v[2] += native_accepted


_recording = True


def set_recording(on: bool) -> None:
    """Whether this process's counts are the engine's (fly_vllm.parallel:
    with tensor parallelism one rank records). A process that does not
    record keeps its stores private, so the front end never sums them."""
    global _recording, _store, _requests
    with _lock:
        if on != _recording:
            _recording, _store, _requests = on, None, None


def recording() -> bool:
    return _recording


def worker_store() -> CounterStore:
    global _store
    with _lock:
        if _store is None:
            _store = CounterStore(metrics_dir() if _recording else None)
        return _store


def read_totals(directory: Path | None = None) -> np.ndarray:
    """Sum of all workers' counters, [NUM_SLOTS] int64."""
    directory = directory or metrics_dir()
    total = np.zeros(NUM_SLOTS, dtype=np.int64)
    for f in sorted(directory.glob("worker-*.bin")):
        try:
            total += np.load(f, mmap_mode="r")[:NUM_SLOTS]
        except (OSError, ValueError):  # a file being created right now
            continue
    return total


def snapshot() -> dict[str, object]:
    """The totals as a dict: scalar names, plus ``loose_accepted_per_pos``."""
    t = read_totals()
    out: dict[str, object] = {name: int(t[INDEX[name]])
                              for name, _ in SCALARS + DRAFTER_SCALARS}
    per_pos = t[PER_POS_OFFSET:DRAFTER_OFFSET]
    last = int(np.flatnonzero(per_pos).max()) + 1 if per_pos.any() else 0
    out["loose_accepted_per_pos"] = [int(x) for x in per_pos[:last]]
    out["loose_accepted_by_rule"] = {
        r: int(t[BY_RULE_OFFSET + i]) for i, r in enumerate(ACCEPT_RULES)}
    out["verifier_path"] = {p: int(t[INDEX[f"verifier_path_{p}"]]) for p in VERIFIER_PATHS}
    out["verifier_fallbacks"] = int(t[INDEX["verifier_fallbacks"]])
    return out


# The labelled families and the fallbacks counter: (name, help).
BY_RULE_FAMILY = ("vllm:fly_loose_accepted_tokens_by_rule",
                  "Draft tokens accepted loosely, by acceptance rule (fly or fsd).")
PER_POS_FAMILY = ("vllm:fly_loose_accepted_tokens_per_pos",
                  "Draft tokens accepted loosely, by draft position.")
PATH_FAMILY = ("vllm:fly_verifier_path",
               "Workers verifying on each path: triton (the kernels), torch (the "
               "reference) or custom (FLY_VLLM_VERIFIER).")
FALLBACKS_FAMILY = ("vllm:fly_verifier_fallbacks",
                    "Workers whose accelerated verifier failed its check, or a later "
                    "call, and that verify with torch since.")


def last_position(t: np.ndarray) -> int:
    """How many draft positions the per-position family lists: up to the
    last with a loose accept."""
    per = t[PER_POS_OFFSET:DRAFTER_OFFSET]
    return int(np.flatnonzero(per).max()) + 1 if per.any() else 0


class FlyCollector:
    """Prometheus collector exposing the summed worker counters (the default
    registry; with several API server processes see metrics_multiproc.py)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        t = read_totals()
        for name, doc in SCALARS + DRAFTER_SCALARS:
            c = CounterMetricFamily(f"vllm:fly_{name}", doc)
            c.add_metric([], float(t[INDEX[name]]))
            yield c
        by_rule = CounterMetricFamily(*BY_RULE_FAMILY, labels=["rule"])
        for i, r in enumerate(ACCEPT_RULES):
            by_rule.add_metric([r], float(t[BY_RULE_OFFSET + i]))
        yield by_rule
        per_pos = CounterMetricFamily(*PER_POS_FAMILY, labels=["position"])
        for p in range(last_position(t)):
            per_pos.add_metric([str(p)], float(t[PER_POS_OFFSET + p]))
        yield per_pos
        path = GaugeMetricFamily(*PATH_FAMILY, labels=["path"])
        for p in VERIFIER_PATHS:
            path.add_metric([p], float(t[INDEX[f"verifier_path_{p}"]]))
        yield path
        fallbacks = CounterMetricFamily(*FALLBACKS_FAMILY)
        fallbacks.add_metric([], float(t[INDEX["verifier_fallbacks"]]))
        yield fallbacks


_collector_registered = False


def register_collector() -> None:
    """Register the collector on prometheus_client's default registry, once."""
    global _collector_registered
    with _lock:
        if _collector_registered:
            return
        try:
            from prometheus_client import REGISTRY
        except ImportError:
            return
        REGISTRY.register(FlyCollector())
        _collector_registered = True


# --------------------------------------------------------------------------
# Per-request totals: a fixed-size table per worker (no file growth), keyed by
# vLLM's internal request id ("<external id>-<8 random characters>").

REQUEST_FIELDS = ("steps", "draft_tokens", "native_accepted_tokens",
                  "loose_accepted_tokens")
REQUEST_SLOTS = 16384
_REQUEST_DTYPE = np.dtype([("id", "S96"), ("c", np.int64, len(REQUEST_FIELDS))])


class RequestTable:
    """This worker's per-request counters: REQUEST_SLOTS rows reused round
    robin, so the oldest request's row is overwritten after that many."""

    def __init__(self, directory: Path | None):
        if directory is None:  # private, as CounterStore's
            self.rows = np.zeros(REQUEST_SLOTS, dtype=_REQUEST_DTYPE)
        else:
            self._map = np.lib.format.open_memmap(
                directory / f"requests-{os.getpid()}.bin", mode="w+", dtype=_REQUEST_DTYPE,
                shape=(REQUEST_SLOTS,))
            self.rows = self._map.view(np.ndarray)  # as CounterStore.values
        self._counts = self.rows["c"]  # [REQUEST_SLOTS, 4], a view
        self.slot: dict[str, int] = {}
        self.next = 0

    def _slot(self, rid: str) -> int:
        """rid's row, taking the oldest row for a new request."""
        s = self.slot.get(rid)
        if s is None:
            s = self.next
            self.next = (self.next + 1) % REQUEST_SLOTS
            old = self.rows[s]["id"].decode(errors="replace")
            self.slot.pop(old, None)
            self.slot[rid] = s
            self.rows[s] = (rid.encode()[:96], np.zeros(len(REQUEST_FIELDS), np.int64))
        return s

    def add(self, req_ids: list[str | None], counts: np.ndarray) -> None:
        """counts: [B, 4] increments (REQUEST_FIELDS) for the batch rows."""
        for rid, c in zip(req_ids, counts):
            if rid is None or not c.any():
                continue
            self._counts[self._slot(rid)] += c

    def add_exact(self, rid: str, draft_tokens: int, native_accepted: int) -> None:
        """One exactly verified step of a request that drafted."""
        c = self._counts[self._slot(rid)]
        c[0] += 1
        c[1] += draft_tokens
        c[2] += native_accepted


_requests: RequestTable | None = None


def request_table() -> RequestTable:
    global _requests
    with _lock:
        if _requests is None:
            _requests = RequestTable(metrics_dir() if _recording else None)
        return _requests


def _external_id(internal: str) -> str:
    """vLLM appends "-" and 8 random characters to the id a caller gives."""
    head, sep, tail = internal.rpartition("-")
    return head if sep and len(tail) == 8 else internal


def request_totals(directory: Path | None = None) -> dict[str, dict[str, int]]:
    """Per-request totals from every worker, by the caller's request id."""
    directory = directory or metrics_dir()
    out: dict[str, dict[str, int]] = {}
    for f in sorted(directory.glob("requests-*.bin")):
        try:
            rows = np.load(f, mmap_mode="r")
        except (OSError, ValueError):
            continue
        for rid, c in zip(rows["id"], rows["c"]):
            if not rid:
                continue
            tot = out.setdefault(_external_id(rid.decode(errors="replace")),
                                 dict.fromkeys(REQUEST_FIELDS, 0))
            for name, v in zip(REQUEST_FIELDS, c):
                tot[name] += int(v)
    return out
