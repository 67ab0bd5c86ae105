"""The demo: where a loose output comes back to the target's text, and one
short run end to end on the tiny pair."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fly_vllm.demo import RECOMMENDED, realign
from tests.conftest import ROOT, SCRATCH, vllm_env


def test_realign_finds_where_two_outputs_meet_again():
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    b = [1, 2, 30, 40, 41, 5, 6, 7, 8, 9]
    # Part at 2; back together at a[4:] == b[5:] for a run of 3.
    assert realign(a, b, 2, run=3) == (4, 5)
    assert realign(a, b, 2, run=6) is None  # only 5 tokens in common after
    # A repeated line is not a rewording: the later match is the earliest
    # pair by i + k.
    a = [0, 7, 8, 9, 7, 8, 9]
    b = [0, 5, 7, 8, 9, 1, 1]
    assert realign(a, b, 1, run=3) == (4, 2)
    assert realign([1, 2], [1, 3], 1, run=1) is None


def test_recommended_setting_is_a_valid_config():
    from fly_vllm.config import parse_fly_config

    _, fly = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 8,
                               "fly": {**RECOMMENDED, "window": 4}})
    assert fly.gate == RECOMMENDED["gate"]


@pytest.mark.e2e
def test_demo_runs_every_mode_and_explains_the_loose_span(tiny_pair):
    r = subprocess.run(
        [sys.executable, "-m", "fly_vllm.cli", "demo", "--model", tiny_pair["target"],
         "--draft", tiny_pair["near"], "-k", "4", "--window", "2", "--threshold", "0",
         "--prompts", "3", "--max-tokens", "24"],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=900)
    (SCRATCH / "demo.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for mode in ("target alone", "strict speculative", "FLy (paper)", "FLy (recommended)"):
        assert mode in out
    # Progress while each mode generates, one line per prompt.
    assert r.stderr.count("prompts: 3/3 requests done") == 4
    # Strict speculation keeps the target's text on every prompt.
    strict = next(line for line in out.splitlines() if line.startswith("strict"))
    assert strict.rstrip().endswith("3/3")
    # The paper's setting at threshold 0 leaves the target's text, and the
    # demo shows both wordings and says whether the output came back.
    assert "FLy (paper) left the target's text on" in out
    assert "  target    :" in out and ("back on the target's text" in out
                                       or "it never came back" in out)
