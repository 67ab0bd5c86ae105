"""The benchmark harness: scoring, datasets, metrics parsing, and one small
run end to end on the tiny pair."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from fly_vllm.bench import datasets as ds
from fly_vllm.bench import scoring
from fly_vllm.bench.remote import parse_metrics
from tests.conftest import ROOT, SCRATCH, vllm_env, write_gsm8k


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
    # Twice the smaller tail of Bin(r2w + w2r, 1/2), either way round.
    assert scoring.mcnemar_exact(0, 1) == scoring.mcnemar_exact(2, 1) == 1.0
    tail = sum(math.comb(35, i) for i in range(17)) / 2 ** 35
    assert scoring.mcnemar_exact(16, 19) == scoring.mcnemar_exact(19, 16) == pytest.approx(
        2 * tail, rel=1e-12)
    # Paired by item id, whatever the order each run finished in.
    base = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0}
    mode = {"e": 1.0, "d": 1.0, "c": 0.0, "b": 0.0, "a": 0.0, "z": 1.0}
    assert scoring.paired(mode, base) == {"n": 5, "right_to_wrong": 2, "wrong_to_right": 1,
                                          "mcnemar_p": 1.0}


def test_progress_lines_for_batched_runs(capsys):
    from fly_vllm.bench.offline import PROGRESS, Progress

    bar = Progress(total=25, label="gsm8k")
    for _ in range(25):
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= 13 and all(x.startswith(PROGRESS) for x in lines)
    assert "gsm8k: 25/25 requests done" in lines[-1]
    # vLLM also passes iterables through it (prompt rendering): silently.
    assert list(Progress(iter([1, 2]), desc="Rendering", label="x")) == [1, 2]
    assert capsys.readouterr().err == ""


def test_divergence_classified_as_near_tie_or_not():
    assert scoring.first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert scoring.first_difference([1, 2], [1, 2, 3]) is None
    top = [(7, -0.60), (9, -0.70), (4, -3.0)]
    tie = scoring.classify_divergence(top, 7, 9, tie_nats=0.25)
    assert tie["near_tie"] and tie["gap_nats"] == pytest.approx(0.1)
    assert tie["rank_target_token"] == 0 and tie["rank_mode_token"] == 1
    # The same two tokens further apart, a third-ranked token, or one outside
    # the top are not near-ties.
    assert not scoring.classify_divergence(top, 7, 9, tie_nats=0.05)["near_tie"]
    assert not scoring.classify_divergence(top, 7, 4, tie_nats=5.0)["near_tie"]
    far = scoring.classify_divergence(top, 7, 11, tie_nats=5.0)
    assert not far["near_tie"] and far["rank_mode_token"] is None and "gap_nats" not in far
    # A re-run in which the mode's token now wins is still a tie between the two.
    assert scoring.classify_divergence(top, 9, 7, tie_nats=0.25)["near_tie"]


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


def test_limits_modes_and_concurrency_arguments():
    from fly_vllm.bench import harness

    assert harness.parse_limit("20") == {"*": 20}
    assert harness.parse_limit("gsm8k=150,humaneval=164") == {"gsm8k": 150, "humaneval": 164}
    with pytest.raises(Exception, match="unknown dataset 'gsm'"):
        harness.parse_limit("gsm=3")
    args = harness.parse_args(["--drafter", "DRAFT", "-k", "4", "--window", "2",
                               "--modes", "nospec,strict,fly,fly-ngram,strict-ngram,fly-digits",
                               "--concurrency", "1,3,30"])
    assert args.concurrency == [1, 3, 30]
    modes = {m.name: m.spec for m in harness.build_modes(args)}
    assert modes["no-spec"] is None
    assert modes["fly"]["model"] == "DRAFT" and "prompt_lookup_max" not in modes["fly"]
    # The n-gram modes draft by prompt lookup beside the draft-model modes.
    assert "model" not in modes["fly-ngram"] and modes["fly-ngram"]["prompt_lookup_max"] == 4
    assert modes["fly-ngram"]["fly"] == {"entropy_threshold": 0.3, "window": 2}
    assert modes["strict-ngram"]["fly"]["strict"] is True
    assert modes["fly-digits"]["fly"]["guard_digits"] is True and "model" in modes["fly-digits"]
    with pytest.raises(SystemExit, match="unknown mode"):
        harness.build_modes(harness.parse_args(["--modes", "fast"]))
    # Every mode's config is checked before any engine starts.
    with pytest.raises(SystemExit, match="mode 'strict': fly.window must be smaller"):
        harness.build_modes(harness.parse_args(["-k", "4", "--window", "4",
                                                "--modes", "nospec,strict"]))
    # W defaults to FLy's own default, min(6, K-1).
    assert harness.build_modes(harness.parse_args(["-k", "4", "--modes", "fly"]))[0].window == 3
    # vLLM's own speculation, same drafter and K, without the plugin's rule.
    own = {m.name: m.spec for m in harness.build_modes(harness.parse_args(
        ["-k", "8", "--modes", "vllm-spec"]))}["vllm-spec"]
    assert own == {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4,
                   "num_speculative_tokens": 8}
    assert {m.name: m.spec for m in harness.build_modes(harness.parse_args(
        ["--drafter", "DRAFT", "-k", "4", "--modes", "vllm-spec"]))}["vllm-spec"] == {
        "model": "DRAFT", "num_speculative_tokens": 4}


def test_throughput_uses_wall_time_when_requests_overlap():
    """Three requests run at once for 2 s: 60 tokens / 2 s, not / 6 s."""
    from fly_vllm.bench import harness

    res = [{"id": f"m{i}", "group": "mtbench", "text": "x", "token_ids": [1] * 20,
            "latency": None} for i in range(3)]
    run = {"results": res, "group_counters": {"mtbench": {}},
           "group_elapsed": {"mtbench": 2.0}}
    m = harness.score_run(run, {}, None, {})["mtbench"]
    assert m["tok_s"] == pytest.approx(30.0) and m["time_s"] == 2.0
    assert m["tpot_ms_q"][1] != m["tpot_ms_q"][1]  # NaN: no per-request latency
    # One at a time: the sum of latencies is the wall time.
    for r in res:
        r["latency"] = 1.0
    del run["group_elapsed"]
    m = harness.score_run(run, {}, None, {})["mtbench"]
    assert m["tok_s"] == pytest.approx(20.0) and m["tpot_ms_q"][1] == pytest.approx(50.0)


def test_what_a_mode_changes_against_the_target():
    """Length ratio, cap-outs, identical outputs, first parting token and
    exact answer agreement, on hand-made runs."""
    from fly_vllm.bench import harness

    tgt = [{"id": "a", "group": "gsm8k", "text": "so #### 4", "token_ids": [1, 2, 3, 4],
            "finish_reason": "stop"},
           {"id": "b", "group": "gsm8k", "text": "#### 5", "token_ids": [1, 2],
            "finish_reason": "stop"},
           {"id": "c", "group": "gsm8k", "text": "#### 6", "token_ids": [7, 8, 9],
            "finish_reason": "stop"}]
    mode = [{"id": "a", "group": "gsm8k", "text": "so #### 4", "token_ids": [1, 2, 3, 4],
             "finish_reason": "stop"},
            {"id": "b", "group": "gsm8k", "text": "#### 9", "token_ids": [1, 5, 6, 6, 6, 6],
             "finish_reason": "length"},
            {"id": "c", "group": "gsm8k", "text": "#### 6", "token_ids": [7, 8],
             "finish_reason": "stop"}]
    items = {i: ds.Item("gsm8k", i, [], ref) for i, ref in (("a", "4"), ("b", "5"),
                                                            ("c", "6"))}

    def run(res):
        return {"results": res, "group_counters": {"gsm8k": {}},
                "group_elapsed": {"gsm8k": 1.0}}

    m = harness.score_run(run(mode), items, run(tgt), {})["gsm8k"]
    assert m["output_length_ratio"] == pytest.approx(12 / 9)
    assert m["capped"] == pytest.approx(1 / 3)
    assert m["identical"] == pytest.approx(1 / 3) and m["parted"] == 2
    # b parts at token 1; c is a prefix of the target's, so it parts at 2.
    assert m["first_parting_q"][1] == pytest.approx(1.5)
    assert m["answer_agreement_k"] == 2 and m["answer_disagree"] == ["b"]
    lo, hi = m["answer_agreement_exact_ci"]
    assert lo == pytest.approx(0.0943, abs=1e-3) and hi == pytest.approx(0.9916, abs=1e-3)
    # Without a recorded finish reason, the cap decides.
    for r in mode:
        del r["finish_reason"]
    m = harness.score_run(run(mode), items, run(tgt), {}, max_tokens=6)["gsm8k"]
    assert m["capped"] == pytest.approx(1 / 3)
    assert "output_length_ratio" not in harness.score_run(run(mode), items, None,
                                                          {})["gsm8k"]


def test_exact_binomial_interval():
    assert scoring.exact_ci(97, 100) == pytest.approx((0.9148, 0.9938), abs=1e-4)
    assert scoring.exact_ci(0, 10)[0] == 0.0 and scoring.exact_ci(10, 10)[1] == 1.0
    assert scoring.binom_bound(60, 60, 0.05) == pytest.approx(0.05 ** (1 / 60))
    # alpha is one-sided: the lower bound p has P[Bin(n, p) >= k] = alpha, the
    # upper P[Bin(n, p) <= k] = alpha; the two-sided interval spends alpha / 2 each.
    for k, n, alpha in ((1, 5, 0.05), (397, 500, 0.025), (640, 664, 0.0167)):
        lo = scoring.binom_bound(k, n, alpha)
        hi = scoring.binom_bound(k, n, alpha, upper=True)
        assert sum(math.comb(n, i) * lo ** i * (1 - lo) ** (n - i)
                   for i in range(k, n + 1)) == pytest.approx(alpha, rel=1e-9)
        assert sum(math.comb(n, i) * hi ** i * (1 - hi) ** (n - i)
                   for i in range(k + 1)) == pytest.approx(alpha, rel=1e-9)
        assert scoring.exact_ci(k, n, 2 * alpha) == (lo, hi)
    assert scoring.binom_bound(5, 5, 0.05, upper=True) == 1.0
    assert math.isnan(scoring.binom_bound(0, 0, 0.05))


def test_scoring_imports_scipy_lazily():
    # The plugin imports scoring; scipy comes in only when an interval is asked for.
    code = ("import sys; import fly_vllm.bench.scoring; "
            "assert 'scipy' not in sys.modules, 'scipy imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_points_skip_and_bf16_warning(tmp_path, monkeypatch):
    from fly_vllm.bench import harness

    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"name": "m K8", "K": 8, "fly": {"gate": "margin",
                                                              "margin": 0.3}},
                             {"name": "strict K4", "K": 4, "fly": {"strict": True}}]))
    args = harness.parse_args(["--drafter", "D", "-k", "4", "--modes", "nospec,points",
                               "--points", str(f), "--skip", "gsm8k=1000"])
    modes = harness.build_modes(args)
    assert [m.name for m in modes] == ["no-spec", "m K8", "strict K4"]
    assert modes[1].spec["num_speculative_tokens"] == 8
    assert modes[1].spec["fly"] == {"gate": "margin", "margin": 0.3}
    assert args.skip == {"gsm8k": 1000}
    # --points repeats: the points of every file, a name in two files refused.
    g = tmp_path / "q.json"
    g.write_text(json.dumps([{"name": "e K4", "K": 4, "fly": {"entropy_threshold": 0.6}}]))
    two = harness.parse_args(["--drafter", "D", "--modes", "points", "--points", str(f),
                              "--points", str(g)])
    assert [m.name for m in harness.build_modes(two)] == ["m K8", "strict K4", "e K4"]
    with pytest.raises(SystemExit, match="strict K4 named in more than one file"):
        harness.build_modes(harness.parse_args(
            ["--drafter", "D", "--modes", "points", "--points", str(f), "--points", str(f)]))
    for bad in ('[{"K": 4}]', '[{"name": "a"}, {"name": "a"}]', "[oops"):
        with pytest.raises(Exception):
            harness.load_points(bad)
    bad_point = tmp_path / "bad.json"
    bad_point.write_text(json.dumps([{"name": "x", "fly": {"margin": 0.3}}]))
    with pytest.raises(SystemExit, match="belongs to the margin test"):
        harness.build_modes(harness.parse_args(
            ["--drafter", "D", "--modes", "points", "--points", str(bad_point)]))
    monkeypatch.setattr(harness, "cpu_flags", lambda: ["avx2", "avx512f"])
    assert "avx512_bf16" in harness.warn_bf16_fallback({"dtype": "bfloat16"})
    assert harness.warn_bf16_fallback({"dtype": "float32"}) is None
    monkeypatch.setattr(harness, "cpu_flags", lambda: ["avx512_bf16"])
    assert harness.warn_bf16_fallback({"dtype": "bfloat16"}) is None


def test_skip_gives_a_disjoint_item_range(tmp_path):
    data = str(write_gsm8k(tmp_path / "gsm.jsonl", 10))
    first = ds.load("gsm8k", 5, data)
    later = ds.load("gsm8k", 3, data, skip=5)
    assert [it.id for it in later] == ["gsm8k-5", "gsm8k-6", "gsm8k-7"]
    assert [it.reference for it in later] == ["2550", "3050", "3550"]
    assert not {it.id for it in first} & {it.id for it in later}
    # A skip past the end gives nothing rather than the file's last items.
    assert ds.load("gsm8k", 3, data, skip=10) == []


@pytest.mark.e2e
def test_small_benchmark_run(tiny_pair, tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                       "answer": f"...\n#### {2 * i}"}) + "\n"
                           for i in range(2)))
    out = SCRATCH / "bench"
    common = ["--model", tiny_pair["target"],
              "--drafter", tiny_pair["near"], "-k", "4", "--window", "2", "--threshold", "0",
              "--sweep-threshold", "0.5",
              "--sweep-window", "1", "--datasets", "gsm8k,mtbench", "--data", str(gsm),
              "--limit", "gsm8k=2,mtbench=3", "--max-tokens", "12", "--temperatures", "0",
              "--concurrency", "1,2", "--engine", '{"max_model_len": 512}']
    r = subprocess.run(
        [sys.executable, "benchmarks/run_bench.py", *common,
         "--modes", "nospec,strict,fly,fly-ngram,sweep", "--out", str(out)],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    every = {(t["mode"], t["dataset"], t["concurrency"]): t["metrics"] for t in res["table"]}
    assert {m for m, _, _ in every} == {"no-spec", "strict", "fly", "fly-ngram",
                                        "fly t=0.5 w=2", "fly t=0 w=1"}
    assert {c for _, _, c in every} == {1, 2}
    for conc in (1, 2):
        rows = {(m, d): v for (m, d, c), v in every.items() if c == conc}
        # Strict speculation reproduces the target exactly, one at a time and
        # batched; FLy at threshold 0 does not have to, and its loose accepts
        # are counted.
        for d in ("gsm8k", "mtbench"):
            assert rows[("strict", d)]["agreement_lcs"] == 1.0
            assert rows[("strict", d)]["loose_rate"] == 0.0
            assert rows[("no-spec", d)]["mean_accepted_length"] is None
            assert rows[("fly-ngram", d)]["n"] == rows[("no-spec", d)]["n"]
        assert rows[("fly", "gsm8k")]["loose_rate"] > 0 or \
            rows[("fly", "mtbench")]["loose_rate"] > 0
    assert every[("no-spec", "mtbench", 2)]["n"] == 3
    specs = {t["mode"]: t["spec"] for t in res["table"]}
    assert "prompt_lookup_max" in specs["fly-ngram"] and "model" not in specs["fly-ngram"]
    assert res["settings"]["items"] == {"gsm8k": 2, "mtbench": 3}
    assert "vllm" in res["environment"]["versions"] or res["environment"]["versions"]
    report = (out / "report.md").read_text()
    assert "| gsm8k | strict |" in report and "command:" in report
    assert "| mtbench | fly-ngram | 2 |" in report
    for png in ("speedup_vs_retention.png", "acceptance_per_position.png",
                "speed_vs_concurrency.png"):
        assert (out / png).stat().st_size > 1000

    # The divergence explainer finds where strict speculation left the
    # target's output. Strict is exact here, so one is made up: a copy of the
    # run whose strict output for one item takes another token at position 3.
    # The target alone, re-run there, must rank its own token first.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    base_raw = strict_raw = None
    for p in (copy / "raw").glob("*.json"):
        d = json.loads(p.read_text())
        if d["concurrency"] == 1 and d["mode"] in ("no-spec", "strict"):
            if d["mode"] == "no-spec":
                base_raw = d
            else:
                strict_raw = (p, d)
    item = next(r for r in strict_raw[1]["run"]["results"] if r["group"] == "mtbench")
    assert len(item["token_ids"]) > 4
    item["token_ids"][3] = (item["token_ids"][3] + 1) % 50
    strict_raw[0].write_text(json.dumps(strict_raw[1]))
    r = subprocess.run(
        [sys.executable, "benchmarks/explain_divergence.py", str(copy), "--mode", "strict",
         "--concurrency", "1"],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((copy / "divergence-strict.json").read_text())
    assert [(x["id"], x["position"]) for x in rows] == [(item["id"], 3)]
    assert rows[0]["rank_target_token"] == 0
    assert base_raw is not None and "1 differ" in (copy / "divergence-strict.md").read_text()

    # --cached-only scores what a folder already holds and runs nothing: a
    # point never run is named and left out, the cached modes come back.
    cached = tmp_path / "cached"
    shutil.copytree(out, cached)
    (cached / "results.json").unlink()
    r = subprocess.run(
        [sys.executable, "benchmarks/run_bench.py", *common, "--cached-only",
         "--modes", "nospec,strict,points", "--out", str(cached),
         "--points", '[{"name": "new K3", "K": 3, "fly": {"gate": "margin"}}]'],
        cwd=ROOT, env=vllm_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "new K3, T=0, 1 at once: not run yet" in r.stderr
    again = json.loads((cached / "results.json").read_text())
    assert {t["mode"] for t in again["table"]} == {"no-spec", "strict"}
    assert len(list((cached / "raw").glob("*.json"))) == len(list((out / "raw").glob("*.json")))


def test_parts_split_and_merge():
    from fly_vllm.bench.parts import merge_runs, split

    assert [len(p) for p in split(list(range(664)), 133)] == [133, 133, 133, 133, 132]
    assert split([1, 2], None) == [[1, 2]] and split([1, 2], 5) == [[1, 2]]
    with pytest.raises(ValueError):
        split([1], 0)
    a = {"elapsed": 1.0, "results": [{"id": "a"}], "counters": {"n": 1, "pos": [1, 2]},
         "group_counters": {"g": {"n": 1}}, "group_elapsed": {"g": 1.0}}
    b = {"elapsed": 2.5, "results": [{"id": "b"}], "counters": {"n": 2, "pos": [1, 2, 3]},
         "group_counters": {"g": {"n": 2}, "h": {"n": 5}},
         "group_elapsed": {"g": 1.0, "h": 1.5}}
    m = merge_runs([a, b])
    assert [r["id"] for r in m["results"]] == ["a", "b"] and m["parts"] == 2
    assert m["counters"] == {"n": 3, "pos": [2, 4, 3]} and m["elapsed"] == 3.5
    assert m["group_counters"] == {"g": {"n": 3}, "h": {"n": 5}}
    assert m["group_elapsed"] == {"g": 2.0, "h": 1.5}
    assert a["counters"] == {"n": 1, "pos": [1, 2]}  # the parts are not changed
    with pytest.raises(ValueError):
        merge_runs([])


def test_run_in_parts_resumes_from_the_last_finished_part(tmp_path, monkeypatch, capsys):
    """--part-size: each part is one engine run cached on its own; a stopped
    run (here: a part whose engine fails) keeps the parts before it, and the
    next call runs only what is missing. The engine is faked: it answers each
    GSM8K item right and counts what it was asked to run."""
    from fly_vllm.bench import harness, offline

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                       "answer": f"...\n#### {2 * i}"}) + "\n"
                           for i in range(5)))
    calls: list[list[str]] = []
    fail_on = {"part": None}

    def fake_run_mode(job, *, env=None, log_path=None):
        ids = [r["id"] for r in job["requests"]]
        calls.append(ids)
        if fail_on["part"] is not None and len(calls) == fail_on["part"]:
            raise RuntimeError("engine stopped")
        return {"elapsed": 1.0, "counters": {}, "group_counters": {"gsm8k": {}},
                "group_elapsed": {"gsm8k": 1.0},
                "results": [{"id": i, "group": "gsm8k", "token_ids": [1, 2],
                             "finish_reason": "stop",
                             "text": f"#### {2 * int(i.split('-')[-1])}"} for i in ids]}

    monkeypatch.setattr(offline, "run_mode", fake_run_mode)
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "m"), "--datasets", "gsm8k", "--data", str(gsm),
            "--temperatures", "0", "--concurrency", "2", "--modes", "nospec",
            "--part-size", "2", "--out", str(out)]
    fail_on["part"] = 3
    with pytest.raises(RuntimeError):
        harness.main(argv)
    assert [len(c) for c in calls] == [2, 2, 1]
    assert len(list((out / "raw" / "parts").glob("*.json"))) == 2
    assert not list((out / "raw").glob("*.json"))  # the mode is not done

    calls.clear()
    fail_on["part"] = None
    assert harness.main(argv) == 0
    assert [len(c) for c in calls] == [1]  # only the missing part ran
    assert capsys.readouterr().err.count("reusing parts/") == 2
    res = json.loads((out / "results.json").read_text())
    (row,) = res["table"]
    assert row["metrics"]["n"] == 5 and row["metrics"]["accuracy"] == 1.0
    (raw,) = (out / "raw").glob("*.json")
    run = json.loads(raw.read_text())["run"]
    assert run["parts"] == 3 and len(run["results"]) == 5
    part = json.loads(next((out / "raw" / "parts").glob("*.json")).read_text())
    assert part["machine"] == harness.machine() and "date" in part

    calls.clear()
    assert harness.main(argv) == 0 and calls == []  # the whole mode is cached


def _fake_engine_in_parts(tmp_path, monkeypatch, n_items: int, part_size: int):
    """A harness call on n_items GSM8K items, the target and strict, 2 at
    once, in parts of part_size with --part-order part, on a faked engine: it
    records (is the target, item ids) per run, answers "#### 0", and stops
    (raises) at the run numbered stop["at"] (3 unless set)."""
    from fly_vllm.bench import offline

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                       "answer": f"...\n#### {2 * i}"}) + "\n"
                           for i in range(n_items)))
    calls: list[tuple[bool, list[str]]] = []
    stop = {"at": 3}

    def fake_run_mode(job, *, env=None, log_path=None):
        ids = [r["id"] for r in job["requests"]]
        calls.append((job["spec"] is None, ids))
        if len(calls) == stop["at"]:
            raise RuntimeError("engine stopped")
        return {"elapsed": 1.0, "counters": {}, "group_counters": {"gsm8k": {}},
                "group_elapsed": {"gsm8k": 1.0},
                "results": [{"id": i, "group": "gsm8k", "token_ids": [1, 2],
                             "finish_reason": "stop", "text": "#### 0"} for i in ids]}

    monkeypatch.setattr(offline, "run_mode", fake_run_mode)
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "m"), "--datasets", "gsm8k", "--data", str(gsm),
            "--temperatures", "0", "--concurrency", "2", "--modes", "nospec,strict",
            "-k", "2", "--part-size", str(part_size), "--part-order", "part",
            "--out", str(out)]
    return argv, out, calls, stop


def test_parts_in_part_order_and_unfinished_modes_scored(tmp_path, monkeypatch, capsys):
    """--part-order part runs the first part of every mode, then the second;
    --cached-only scores a mode stopped midway on the items of its finished
    parts and says so, in the log, results.json and report.md."""
    from fly_vllm.bench import harness

    argv, out, calls, _ = _fake_engine_in_parts(tmp_path, monkeypatch, 4, 2)
    with pytest.raises(RuntimeError):
        harness.main(argv)
    # Part 1 of the target, part 1 of strict, then part 2 of the target.
    assert calls == [(True, ["gsm8k-0", "gsm8k-1"]), (False, ["gsm8k-0", "gsm8k-1"]),
                     (True, ["gsm8k-2", "gsm8k-3"])]
    capsys.readouterr()
    assert harness.main(argv + ["--cached-only"]) == 0
    err = capsys.readouterr().err
    assert err.count("not finished, scored on the 2 items of its 1 finished parts") == 2
    res = json.loads((out / "results.json").read_text())
    rows = {r["mode"]: r for r in res["table"]}
    assert rows["strict"]["unfinished"] == {"parts": 1, "of": 2, "which": [1]}
    assert rows["strict"]["metrics"]["n"] == 2
    # Only gsm8k-0 is right ("#### 0"): the same on both, so retention is 1.
    assert rows["strict"]["metrics"]["retention"] == 1.0
    assert "| gsm8k | strict (1 of 2 parts) |" in (out / "report.md").read_text()
    assert len(calls) == 3  # --cached-only ran nothing
    # The unfinished modes are left for readers of raw/ apart from the
    # finished ones, and cleared by the next call.
    left = {json.loads(p.read_text())["mode"] for p in (out / "raw" / "unfinished").iterdir()}
    assert left == {"no-spec", "strict"} and not list((out / "raw").glob("*.json"))
    assert harness.main(argv) == 0
    assert not list((out / "raw" / "unfinished").iterdir())
    assert len(list((out / "raw").glob("*.json"))) == 2


def test_parts_first_runs_the_named_parts_before_the_others(tmp_path, monkeypatch, capsys):
    """--parts-first 3 with --part-order part: part 3 of every mode, then
    parts 1 and 2; the parts (and their cache keys) are those of a plain run,
    and a mode scored on part 3 alone says which part it is."""
    from fly_vllm.bench import harness

    argv, out, calls, stop = _fake_engine_in_parts(tmp_path, monkeypatch, 3, 1)
    with pytest.raises(RuntimeError):
        harness.main(argv + ["--parts-first", "3"])
    assert calls == [(True, ["gsm8k-2"]), (False, ["gsm8k-2"]), (True, ["gsm8k-0"])]
    capsys.readouterr()
    assert harness.main(argv + ["--cached-only"]) == 0
    rows = {r["mode"]: r for r in json.loads((out / "results.json").read_text())["table"]}
    assert rows["strict"]["unfinished"] == {"parts": 1, "of": 3, "which": [3]}
    assert rows["no-spec"]["unfinished"]["which"] == [3]
    assert "| gsm8k | strict (parts 3 of 3) |" in (out / "report.md").read_text()
    # Without --parts-first the same part files are found and reused.
    calls.clear()
    stop["at"] = None
    assert harness.main(argv) == 0
    assert calls == [(True, ["gsm8k-0"]), (False, ["gsm8k-0"]),
                     (True, ["gsm8k-1"]), (False, ["gsm8k-1"])]
    # Bad part numbers: a clear error before anything runs.
    for bad in ("0", "2,2", "x"):
        with pytest.raises(SystemExit):
            harness.main(argv + ["--parts-first", bad])
    assert "--parts-first takes distinct part numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="the run has 3 parts"):
        harness.main(argv + ["--out", str(tmp_path / "new"), "--parts-first", "4"])
    assert len(calls) == 4


def _overhead_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_overhead_median_interval_and_ratios():
    """benchmarks/overhead.py --paired: the median's distribution-free 95%
    interval is the textbook one (n = 60: the 22nd and 39th of the sorted
    values; n = 6: the whole range), it covers a known median in about 95%
    of samples, and a pair's ratio is the two speeds' on the same prompt."""
    import random

    ov = _overhead_module()
    assert ov.median_interval(list(range(1, 61))) == (30.5, 22, 39)
    assert ov.median_interval([6, 1, 5, 2, 4, 3]) == (3.5, 1, 6)
    rng = random.Random(0)
    cover = sum(lo <= 0 <= hi for lo, hi in (
        ov.median_interval([rng.gauss(0, 1) for _ in range(36)])[1:] for _ in range(2000)))
    assert 0.94 <= cover / 2000 <= 0.99
    rows = [{"round": r, "prompt": p, "mode": m, "seconds": s, "cpu_seconds": 2 * s,
             "token_ids": [7] * 10}
            for r in (1, 2) for p in (0, 1)
            for m, s in (("vllm ngram", 1.0), ("fly strict", 1.25 if p else 0.8))]
    lines, fig = ov.paired_report(rows, ["vllm ngram", "fly strict"], 2)
    assert sorted(fig["fly strict"]["per_prompt_ratio"]) == [0.8, 0.8, 1.25, 1.25]
    assert fig["fly strict"]["per_round_ratio"] == pytest.approx([2 / 2.05] * 2)
    assert sorted(fig["fly strict"]["cpu_ratio"]) == [0.8, 0.8, 1.25, 1.25]
    assert fig["fly strict"]["outputs_equal_target"] and len(lines) == 4
