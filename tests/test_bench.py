"""The benchmark harness: scoring, datasets, metrics parsing, and one small
run end to end on the tiny pair."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fly_vllm.bench import datasets as ds
from fly_vllm.bench import scoring
from fly_vllm.bench.remote import parse_metrics
from tests.conftest import ROOT, SCRATCH, vllm_env


def test_gsm8k_extraction():
    assert scoring.gsm8k_extract("so 3 + 4 = 7\n#### 7") == "7"
    assert scoring.gsm8k_extract("The answer is 1,234.") == "1234"
    assert scoring.gsm8k_extract("about 12.0 apples") == "12"
    assert scoring.gsm8k_extract("no digits") is None
    assert scoring.gsm8k_correct("#### 72", "72")
    assert not scoring.gsm8k_correct("#### 71", "72")
    assert ds.gsm8k_answer("work...\n#### 1,050") == "1050"


def test_humaneval_sandbox_passes_fails_and_times_out():
    problem = {"prompt": "def add(a, b):\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    assert scoring.humaneval_passes(problem, "```python\ndef add(a, b):\n    return a + b\n```")
    assert scoring.humaneval_passes(problem, "    return a + b\n")  # body only
    assert not scoring.humaneval_passes(problem, "    return a - b\n")
    assert not scoring.humaneval_passes(problem, "    return a + b\x00\n(")  # junk
    assert not scoring.run_sandboxed("while True: pass", timeout=1.0)


def test_lcs_and_intervals():
    assert scoring.lcs_ratio([1, 2, 3], [1, 2, 3]) == 1.0
    assert scoring.lcs_ratio([1, 2, 3, 4], [1, 3, 4]) == 0.75
    lo, hi = scoring.bootstrap_ci([1.0] * 10 + [0.0] * 10)
    assert 0.25 < lo < 0.5 < hi < 0.75
    assert scoring.ratio_ci([1, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx((0.25, 1.0), abs=0.26)


def test_paired_flips_and_mcnemar():
    assert scoring.mcnemar_exact(0, 0) == 1.0
    assert scoring.mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert scoring.mcnemar_exact(0, 10) == scoring.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert scoring.mcnemar_exact(3, 3) == 1.0
    # Paired by item id, whatever the order each run finished in.
    base = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0}
    mode = {"e": 1.0, "d": 1.0, "c": 0.0, "b": 0.0, "a": 0.0, "z": 1.0}
    assert scoring.paired(mode, base) == {"n": 5, "right_to_wrong": 2, "wrong_to_right": 1,
                                          "mcnemar_p": 1.0}


def test_dataset_loaders():
    for name in ("humaneval", "mtbench", "sharegpt"):
        items = ds.load(name, 3)
        assert len(items) == 3 and all(it.messages[0]["content"].strip() for it in items)
    assert ds.load("humaneval", None)[-1].id == "HumanEval/163"


def test_parse_metrics():
    text = """# HELP x
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 3.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 5.0
vllm:fly_loose_accepted_tokens_total 2.0
vllm:fly_loose_accepted_tokens_created 1.7e9
vllm:num_requests_running{engine="0"} 1.0
"""
    m = parse_metrics(text)
    assert m == {"vllm:spec_decode_num_drafts": 10.0,
                 "vllm:spec_decode_num_accepted_tokens_per_pos": [5.0, 3.0],
                 "vllm:fly_loose_accepted_tokens": 2.0}


@pytest.mark.e2e
def test_small_benchmark_run(tiny_pair, tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                       "answer": f"...\n#### {2 * i}"}) + "\n"
                           for i in range(2)))
    out = SCRATCH / "bench"
    r = subprocess.run(
        [sys.executable, "benchmarks/run_bench.py", "--model", tiny_pair["target"],
         "--drafter", tiny_pair["near"], "-k", "4", "--window", "2", "--threshold", "0",
         "--modes", "nospec,strict,fly,sweep", "--sweep-threshold", "0.5",
         "--sweep-window", "1", "--datasets", "gsm8k,mtbench", "--data", str(gsm),
         "--limit", "2", "--max-tokens", "12", "--temperatures", "0", "--out", str(out),
         "--engine", '{"max_model_len": 512}'],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {(t["mode"], t["dataset"]): t["metrics"] for t in res["table"]}
    assert set(m for m, _ in rows) == {"no-spec", "strict", "fly", "fly t=0.5 w=2",
                                       "fly t=0 w=1"}
    # Strict speculation reproduces the target exactly; FLy at threshold 0 does not
    # have to, and its loose accepts are counted.
    for d in ("gsm8k", "mtbench"):
        assert rows[("strict", d)]["agreement_lcs"] == 1.0
        assert rows[("strict", d)]["loose_rate"] == 0.0
        assert rows[("no-spec", d)]["mean_accepted_length"] is None
    assert rows[("fly", "gsm8k")]["loose_rate"] > 0 or rows[("fly", "mtbench")]["loose_rate"] > 0
    assert res["settings"]["items"] == {"gsm8k": 2, "mtbench": 2}
    assert "vllm" in res["environment"]["versions"] or res["environment"]["versions"]
    report = (out / "report.md").read_text()
    assert "| gsm8k | strict |" in report and "command:" in report
    for png in ("speedup_vs_retention.png", "acceptance_per_position.png"):
        assert (out / png).stat().st_size > 1000
