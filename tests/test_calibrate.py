"""`fly-vllm calibrate` on the tiny pair: the config it writes meets its own
target on its calibration set when the engine is started from it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fly_vllm.calibrate import binom_lower_bound, choose, grid_points, plot_curve
from fly_vllm.config import load_speculative_config, parse_fly_config
from tests.conftest import ROOT, SCRATCH, run_job, vllm_env
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
    assert pts == [{"entropy_threshold": 0.3, "window": 1},
                   {"entropy_threshold": 0.3, "window": 3}]  # W < K, t <= ln 3
    _, fsd = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                               "fly": {"rule": "fsd"}})
    assert [p["fsd_threshold"] for p in grid_points(fsd, 4, [0.1, 0.9], None)] == [0.1]


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
         "--retention", str(target), "--agreement", "exact", "--thresholds", "0,0.6,1.05",
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
    plain = run_job({**job, "speculative_config": None}, "calib_nospec")
    tuned = run_job({**job, "speculative_config": spec}, "calib_tuned")
    agree = sum(a == b for a, b in zip(plain["texts"], tuned["texts"])) / len(PROMPTS)
    assert agree == chosen["agreement"] >= target
