"""`fly-vllm calibrate` on the tiny pair: the config it writes meets its own
target on its calibration set when the engine is started from it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fly_vllm.calibrate import binom_lower_bound, choose, grid_points, plot_curve
from fly_vllm.config import load_speculative_config, parse_fly_config
from tests.conftest import ROOT, SCRATCH, run_jobs, vllm_env
from tests.test_e2e import PROMPTS


def test_lower_bound():
    assert binom_lower_bound(0, 10) == 0.0
    # All n agree: the bound is 0.05 ** (1 / n).
    assert binom_lower_bound(20, 20) == pytest.approx(0.05 ** (1 / 20), abs=1e-9)
    assert binom_lower_bound(600, 600) > 0.995 > binom_lower_bound(500, 500)
    assert binom_lower_bound(5, 10) < 0.5


def test_choose_and_grid():
    rows = [{"point": {"t": 1}, "agreement": 1.0, "mean_accepted_length": 2.0},
            {"point": {"t": 2}, "agreement": 0.9, "mean_accepted_length": 3.0},
            {"point": {"t": 3}, "agreement": 0.5, "mean_accepted_length": 4.0}]
    assert choose(rows, 0.9)["point"] == {"t": 2}
    assert choose(rows, 0.95)["point"] == {"t": 1}
    assert choose(rows[1:], 0.95) is None
    # A point that accepts no more than strict is never chosen.
    assert choose(rows, 0.9, floor=2.5)["point"] == {"t": 2}
    assert choose(rows, 0.95, floor=2.0) is None
    _, fly = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4})
    pts = grid_points(fly, 4, [0.3, 5.0], [1, 3, 4])
    assert pts == [{"gate": "entropy", "entropy_threshold": 0.3, "window": 1},
                   {"gate": "entropy", "entropy_threshold": 0.3, "window": 3}]  # W < K, t <= ln 3
    pts = grid_points(fly, 4, [0.3, 0.9], [2], gates=["margin", "both"], margins=[0.7, 0.1],
                      prefixes=[0, 16])
    assert pts[:2] == [{"gate": "margin", "margin": 0.1, "window": 2},
                       {"gate": "margin", "margin": 0.7, "window": 2}]
    assert {"gate": "both", "entropy_threshold": 0.9, "margin": 0.1, "window": 2} in pts
    assert len(pts) == 2 * (2 + 4)
    assert pts[6:] == [{**p, "strict_prefix_tokens": 16} for p in pts[:6]]
    # Every point is a valid per-request setting, whatever the server's gate.
    from fly_vllm.config import request_overrides

    _, margin_server = parse_fly_config({"method": "fly", "model": "d",
                                         "num_speculative_tokens": 4,
                                         "fly": {"gate": "margin"}})
    for p in pts + grid_points(fly, 4, None, None):
        for server in (fly, margin_server):
            assert request_overrides({"fly": p}, 4, 3, server) == p
    with pytest.raises(SystemExit, match="unknown gate"):
        grid_points(fly, 4, None, None, gates=["cosine"])
    _, fsd = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                               "fly": {"rule": "fsd"}})
    assert [p["fsd_threshold"] for p in grid_points(fsd, 4, [0.1, 0.9], None)] == [0.1]


def test_holdout_split_and_part_stats():
    from fly_vllm.calibrate import part_stats, split_holdout

    calib, held = split_holdout(10, 0.3)
    assert len(held) == 3 and sorted(calib + held) == list(range(10))
    assert split_holdout(10, 0.3) == (calib, held)  # seeded
    assert split_holdout(10, 0.3, seed=1) != (calib, held)
    assert split_holdout(5, 0.0) == ([0, 1, 2, 3, 4], [])
    stats = [{"steps": 2, "native_accepted_tokens": 3, "loose_accepted_tokens": 1},
             {"steps": 4, "native_accepted_tokens": 4, "loose_accepted_tokens": 0},
             {"steps": 0, "native_accepted_tokens": 0, "loose_accepted_tokens": 0}]
    assert part_stats(stats, [0, 1]) == pytest.approx(1 + 8 / 6)
    assert part_stats(stats, [2]) is None


def test_written_config_keeps_only_the_chosen_gate(tmp_path):
    from fly_vllm.calibrate import write_config

    base = {"method": "fly", "model": "d", "num_speculative_tokens": 8,
            "fly": {"entropy_threshold": 0.3, "entropy_top_k": 3, "window": 6}}
    out = tmp_path / "fly.json"
    write_config(str(out), base, {"gate": "margin", "margin": 0.3, "window": 4,
                                  "strict_prefix_tokens": 32}, ["a report"])
    _, fly = parse_fly_config(load_speculative_config(str(out)))
    assert (fly.gate, fly.margin, fly.window, fly.strict_prefix_tokens) == (
        "margin", 0.3, 4, 32)
    write_config(str(out), base, None, ["none met"])
    assert parse_fly_config(load_speculative_config(str(out)))[1].strict


def test_plot_curve(tmp_path):
    rows = [{"point": {"strict": True}, "agreement": 1.0, "lower": 0.86,
             "mean_accepted_length": 4.3},
            {"point": {"entropy_threshold": 0.9, "window": 2}, "agreement": 0.7,
             "lower": 0.55, "mean_accepted_length": 4.4},
            {"point": {"fsd_threshold": 0.1}, "agreement": 0.95, "lower": 0.8,
             "mean_accepted_length": None}]
    png = tmp_path / "curve.png"
    plot_curve(str(png), rows, rows[1], 0.9, 20)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_calibrated_config_meets_its_target(tiny_pair, tmp_path):
    t, near = tiny_pair["target"], tiny_pair["near"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = {"method": "fly", "model": near, "num_speculative_tokens": 4}
    out, report = tmp_path / "fly.json", tmp_path / "rows.json"
    target = 0.25
    r = subprocess.run(
        [sys.executable, "-m", "fly_vllm.cli", "calibrate", "--model", t,
         "--speculative-config", json.dumps(base), "--prompts", str(prompts),
         "--retention", str(target), "--agreement", "exact", "--gates", "entropy",
         "--thresholds", "0,0.6,1.05",
         "--windows", "1,3", "--max-tokens", "24", "--dtype", "float32",
         "--max-model-len", "512", "--out", str(out), "--json", str(report),
         "--plot", str(tmp_path / "curve.png")],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=900)
    (SCRATCH / "calibrate.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[calibrate] 6/6" in r.stderr  # progress, one line per grid point
    # stdout holds the table and the report only, not vLLM's log.
    assert r.stdout.startswith("setting") and " INFO " not in r.stdout
    assert (tmp_path / "curve.png").stat().st_size > 0
    rows = json.loads(report.read_text())
    assert len(rows["rows"]) == 7 and rows["n"] == len(PROMPTS)
    # Each point names the prompts it disagrees on (positions for plain text).
    assert all(len(x["disagree"]) == rows["n"] - x["agree"] for x in rows["rows"][1:])
    # The grid spans the range: the loosest point disagrees somewhere.
    assert min(x["agreement"] for x in rows["rows"]) < 1.0
    chosen = rows["chosen"]
    assert chosen is not None and chosen["agreement"] >= target
    # At this loose target, a loose point wins: longer accepted runs than strict.
    assert chosen["mean_accepted_length"] > rows["rows"][0]["mean_accepted_length"]
    assert all(x["mean_accepted_length"] <= chosen["mean_accepted_length"]
               for x in rows["rows"][1:] if x["agreement"] >= target)
    spec = load_speculative_config(str(out))  # the header comments are allowed
    _, fly = parse_fly_config(spec)
    assert (fly.entropy_threshold, fly.window) == (
        chosen["point"]["entropy_threshold"], chosen["point"]["window"])
    assert "95% lower bound" in out.read_text()
    # Started from the written config, the engine meets the target on the set.
    job = {"model": t, "prompts": PROMPTS, "sampling": {"max_tokens": 24, "temperature": 0}}
    runs = run_jobs({"calib_nospec": {**job, "speculative_config": None},
                     "calib_tuned": {**job, "speculative_config": spec}})
    plain, tuned = runs["calib_nospec"], runs["calib_tuned"]
    agree = sum(a == b for a, b in zip(plain["texts"], tuned["texts"])) / len(PROMPTS)
    assert agree == chosen["agreement"] >= target


@pytest.mark.e2e
def test_calibrate_holds_out_prompts_and_reports_them(tiny_pair, tmp_path):
    """--holdout: the choice is made on one part, and the report and the rows
    give the chosen point's agreement on the other, disjoint part; the margin
    gate and a strict prefix are searched too."""
    t, near = tiny_pair["target"], tiny_pair["near"]
    prompts = tmp_path / "prompts.jsonl"
    more = ["Once upon a time", "import os\n", "The capital of France is",
            "1, 1, 2, 3, 5, 8,"]
    prompts.write_text("".join(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n"
                               for i, p in enumerate(PROMPTS + more)))
    base = {"method": "fly", "model": near, "num_speculative_tokens": 4}
    out, report = tmp_path / "fly.json", tmp_path / "rows.json"
    r = subprocess.run(
        [sys.executable, "-m", "fly_vllm.cli", "calibrate", "--model", t,
         "--speculative-config", json.dumps(base), "--prompts", str(prompts),
         "--retention", "0.25", "--agreement", "exact", "--gates", "entropy,margin",
         "--thresholds", "0", "--margins", "1000", "--windows", "2",
         "--strict-prefix", "0,8", "--holdout", "0.5", "--max-tokens", "24",
         "--dtype", "float32", "--max-model-len", "512", "--out", str(out),
         "--json", str(report)],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=900)
    (SCRATCH / "calibrate-holdout.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert rows["n"] == 4 and rows["n_holdout"] == 4
    held = set(rows["holdout_ids"])
    assert len(rows["rows"]) == 1 + 4  # strict + 2 gates x 2 prefixes
    for x in rows["rows"]:
        assert x["n"] == 4 and x["holdout"]["n"] == 4
        assert not set(x["disagree"]) & held  # chosen on the other part only
        assert set(x["holdout"]["disagree"]) <= held
    # The margin gate wide open is the entropy gate at 0: the same outputs.
    by = {json.dumps(x["point"], sort_keys=True): x for x in rows["rows"]}
    e0 = by[json.dumps({"gate": "entropy", "entropy_threshold": 0.0, "window": 2},
                       sort_keys=True)]
    m0 = by[json.dumps({"gate": "margin", "margin": 1000.0, "window": 2}, sort_keys=True)]
    assert e0["disagree"] == m0["disagree"]
    assert e0["holdout"]["disagree"] == m0["holdout"]["disagree"]
    assert "Out of sample, on the 4 held-out prompts" in out.read_text()
    assert "held out" in r.stdout
    parse_fly_config(load_speculative_config(str(out)))


def test_judge_grid(tmp_path):
    """Gate judge: thresholds loosest last (from --judge-thresholds, else the
    head's recall table), at W 0 and the given windows; every point is a
    valid per-request setting on the judge's server; without a head the
    gate is refused."""
    import numpy as np

    from fly_vllm.config import request_overrides
    from fly_vllm.judge.head import JudgeHead

    JudgeHead(("margin",), np.ones(1), 0.0, np.zeros(1), np.ones(1), 0.2,
              {"drafter": "d", "hidden_size": 8, "vocab_size": 10},
              summary={"thresholds": [{"threshold": 0.31}, {"threshold": 0.07},
                                      {"threshold": None}]}).save(tmp_path / "h.json")
    _, fly = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                               "fly": {"gate": "judge",
                                       "judge_path": str(tmp_path / "h.json")}})
    pts = grid_points(fly, 4, None, [2], gates=["judge"])
    assert pts == [{"gate": "judge", "judge_threshold": t, "window": w}
                   for w in (0, 2) for t in (0.07, 0.31)]
    pts = grid_points(fly, 4, None, [1], gates=["judge", "margin"], margins=[0.3],
                      judge_thresholds=[0.5, 0.1, 2.0])
    assert [p.get("judge_threshold") for p in pts[:4]] == [0.1, 0.5, 0.1, 0.5]
    for p in pts:
        assert request_overrides({"fly": p}, 4, 3, fly) == p
    _, plain = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4})
    with pytest.raises(SystemExit, match="needs a config with a judge head"):
        grid_points(plain, 4, None, None, gates=["judge"])
