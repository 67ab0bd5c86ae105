"""fly-vllm's counters on ``/metrics`` when vLLM runs several API servers.

With ``--api-server-count`` above 1 (which data parallelism sets to the
number of ranks by default) vLLM sets ``PROMETHEUS_MULTIPROC_DIR``, and
``/metrics`` is answered from a registry built for each scrape that reads
only prometheus_client's per-process value files (vLLM's instrumentator
route: ``CollectorRegistry()`` plus ``MultiProcessCollector``). A custom
collector such as :class:`fly_vllm.metrics.FlyCollector` is never asked
there.

So in that mode the process that records an engine's counts
(:func:`fly_vllm.metrics.recording`: tensor-parallel rank 0) also keeps
prometheus_client metrics of the same names and labels, brought up to its
counter store every ``SYNC_INTERVAL_S`` by a daemon thread. The counters
grow by their store's increase, and prometheus sums them over processes (over
data-parallel engines). The verifier-path gauge is set to the store's value
and summed over live processes. Scrapes lag the engine by at most one
interval. Outside that mode nothing here runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from fly_vllm import metrics as m

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.5
_started = False
_lock = threading.Lock()


class Mirror:
    """prometheus_client metrics that follow this process's counter store."""

    def __init__(self):
        from prometheus_client import Counter, Gauge

        # registry=None: in multiprocess mode the values live in files that
        # the scrape reads; no registry of this process is ever exported.
        self.slots = [(m.INDEX[name], Counter(f"vllm:fly_{name}", doc, registry=None))
                      for name, doc in m.SCALARS + m.DRAFTER_SCALARS]
        self.slots.append((m.INDEX["verifier_fallbacks"],
                           Counter(*m.FALLBACKS_FAMILY, registry=None)))
        by_rule = Counter(*m.BY_RULE_FAMILY, ["rule"], registry=None)
        self.slots += [(m.BY_RULE_OFFSET + i, by_rule.labels(r))
                       for i, r in enumerate(m.ACCEPT_RULES)]
        self.per_pos = Counter(*m.PER_POS_FAMILY, ["position"], registry=None)
        self.path = Gauge(*m.PATH_FAMILY, ["path"], registry=None,
                          multiprocess_mode="livesum")
        self.last = np.zeros(m.NUM_SLOTS, dtype=np.int64)
        self.positions = 0  # per-position children made so far

    def sync(self, values: np.ndarray) -> None:
        """Bring the metrics up to ``values`` ([NUM_SLOTS], this store's)."""
        v = np.array(values[: m.NUM_SLOTS], dtype=np.int64)
        grown = v - self.last
        self.last = v
        for slot, counter in self.slots:
            if grown[slot] > 0:
                counter.inc(int(grown[slot]))
        # Positions 0 .. the last with a loose accept, as FlyCollector lists them.
        last = m.last_position(v)
        for p in range(self.positions, last):
            self.per_pos.labels(str(p))
        self.positions = max(self.positions, last)
        for p in range(self.positions):
            if grown[m.PER_POS_OFFSET + p] > 0:
                self.per_pos.labels(str(p)).inc(int(grown[m.PER_POS_OFFSET + p]))
        for p in m.VERIFIER_PATHS:
            self.path.labels(p).set(float(v[m.INDEX[f"verifier_path_{p}"]]))


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def mirror_if_needed() -> bool:
    """In a recording worker under prometheus multiprocess mode, start the
    mirror (once per process). Returns whether it runs."""
    global _started
    if not (multiprocess_mode() and m.recording()):
        return False
    with _lock:
        if _started:
            return True
        _started = True
    mirror = Mirror()

    def loop() -> None:
        warned = False
        while True:
            time.sleep(SYNC_INTERVAL_S)
            try:
                mirror.sync(m.worker_store().values)
            except Exception as e:  # a report must never stop the engine
                if not warned:
                    logger.warning("fly-vllm: /metrics mirror failed (%s); counts on "
                                   "/metrics may lag", e)
                    warned = True

    mirror.sync(m.worker_store().values)
    threading.Thread(target=loop, name="fly-vllm-metrics-mirror", daemon=True).start()
    return True
