"""fly-vllm's counters under prometheus multiprocess mode (several API
servers, fly_vllm/metrics_multiproc.py): what a scrape of vLLM's
multiprocess registry shows equals what FlyCollector shows for the same
totals, summed over recording processes, and nothing runs outside that mode.
The server end to end is tests/test_server.py (data parallel 2)."""

from __future__ import annotations

from tests.conftest import vllm_env
from tests.test_plugin import run_python


def test_a_multiprocess_scrape_shows_the_collectors_counts(tmp_path):
    env = vllm_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
                   FLY_VLLM_METRICS_DIR=str(tmp_path / "fly"))
    (tmp_path / "prom").mkdir()
    (tmp_path / "fly").mkdir()
    r = run_python("""
        import multiprocessing as mp
        import numpy as np
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        from fly_vllm import metrics as m
        from fly_vllm import metrics_multiproc as mm
        from fly_vllm.bench.remote import parse_metrics

        def engine(seed):
            # One recording worker: its store grows in two steps, mirrored.
            rng = np.random.default_rng(seed)
            mirror = mm.Mirror()
            values = np.zeros(m.NUM_SLOTS, np.int64)
            for _ in range(2):
                values += rng.integers(0, 5, m.NUM_SLOTS)
                values[m.PER_POS_OFFSET + 6:m.DRAFTER_OFFSET] = 0
                values[m.INDEX["verifier_path_triton"]:] = [0, 1, 0, 0]
                mirror.sync(values)
            np.save(f"{m.metrics_dir()}/worker-{seed}.npy", values)

        procs = [mp.get_context("fork").Process(target=engine, args=(s,)) for s in (1, 2)]
        for p in procs: p.start()
        for p in procs: p.join(); assert p.exitcode == 0
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        scraped = generate_latest(registry).decode()
        total = sum(np.load(f"{m.metrics_dir()}/worker-{s}.npy") for s in (1, 2))
        m.read_totals = lambda directory=None: total
        plain = CollectorRegistry()
        plain.register(m.FlyCollector())
        expected = generate_latest(plain).decode()
        assert parse_metrics(scraped) == parse_metrics(expected), (scraped, expected)
        assert parse_metrics(scraped)["vllm:fly_draft_tokens"] > 0
        gauge = [l for l in scraped.splitlines() if l.startswith("vllm:fly_verifier_path{")]
        assert sorted(gauge) == sorted(l for l in expected.splitlines()
                                       if l.startswith("vllm:fly_verifier_path{")), gauge
        assert len(parse_metrics(scraped)["vllm:fly_loose_accepted_tokens_per_pos"]) == 6
        print("ok")
    """, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_no_mirror_outside_multiprocess_mode(monkeypatch):
    from fly_vllm import metrics_multiproc as mm

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert mm.mirror_if_needed() is False
