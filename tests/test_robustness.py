"""The serving path under load, faults and bad input, and the serving
benchmark, against a local `fly-vllm serve` (multiprocess engine, as
`vllm serve` runs) with the tiny pair and loose FLy (threshold 0)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fly_vllm.bench import robustness as rb
from fly_vllm.bench import serve as bs
from fly_vllm.bench.server import launched
from tests.conftest import ROOT, SCRATCH, vllm_env

SERVER_ARGS = ("--enforce-eager", "--dtype", "float32", "--max-model-len", "1024",
               "--max-num-seqs", "16")


@pytest.fixture(scope="module")
def servers(tiny_pair):
    """A FLy server and a plain one (no speculation), started at once, each
    engine on a core of its own."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    d = SCRATCH / "robustness"
    d.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"method": "fly", "model": tiny_pair["near"],
                       "num_speculative_tokens": 4,
                       "fly": {"entropy_threshold": 0.0, "window": 2}})

    def env(core: str) -> dict[str, str]:
        return vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND=core)

    with ExitStack() as stack, ThreadPoolExecutor(2) as ex:
        fly = ex.submit(stack.enter_context, launched(
            tiny_pair["target"], spec, d / "server.log", *SERVER_ARGS, env=env("0")))
        plain = ex.submit(stack.enter_context, launched(
            tiny_pair["target"], None, d / "plain.log", *SERVER_ARGS, env=env("1")))
        yield {"fly": fly.result(), "plain": plain.result()}


@pytest.fixture(scope="module")
def server(servers):
    return servers["fly"]


# -------------------------------------------------------------- no server

def test_endpoint_and_xargs_parsing():
    ep = bs.parse_endpoint("fly=http://node:8000/")
    assert (ep.name, ep.url) == ("fly", "http://node:8000")
    for bad in ("http://node:8000", "fly=node:8000", "=http://x"):
        with pytest.raises(Exception, match="NAME=URL"):
            bs.parse_endpoint(bad)
    assert bs.parse_xargs('strict={"fly_strict": true}') == ("strict", {"fly_strict": True})
    with pytest.raises(Exception, match="JSON"):
        bs.parse_xargs("strict=[1]")
    with pytest.raises(SystemExit):
        bs.parse_args(["--endpoint", "a=http://x", "--xargs", 'b={"fly_strict": true}'])


def test_percentiles_and_summary():
    p = bs.percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert bs.percentiles([]) == {"p50": None, "p90": None, "p99": None}
    ok = {"error": None, "n_tokens": 10, "ttft": 0.1, "latency": 1.0, "tpot": 0.1}
    bad = {"error": "APITimeoutError: x", "n_tokens": 0, "ttft": None, "latency": 5.0,
           "tpot": None}
    s = bs.summarize([{"results": [ok, ok, bad], "wall_s": 2.0,
                       "counters": {"vllm:spec_decode_num_drafts": 4,
                                    "vllm:spec_decode_num_draft_tokens": 16,
                                    "vllm:spec_decode_num_accepted_tokens": 8,
                                    "vllm:fly_draft_tokens": 16,
                                    "vllm:fly_loose_accepted_tokens": 2}}])
    assert (s["ok"], s["failed"], s["output_tok_s"]) == (2, 1, 10.0)
    assert s["mean_accepted_length"] == 3.0 and s["acceptance_rate"] == 0.5
    assert s["loose_rate"] == 0.125 and s["errors"] == ["APITimeoutError: x"]


def test_an_unreachable_server_is_a_failure_not_a_crash():
    o = rb.call("http://127.0.0.1:9", "/v1/chat/completions", {"x": 1}, timeout=5)
    assert o["kind"] == "failure" and "ConnectionError" in o["error"]
    c = rb.Check("x")
    c.count(o)
    c.healthy_after = True
    assert not c.ok


def test_near_tie_is_the_runner_up_within_the_gap():
    def answer(*steps):
        return {"json": {"choices": [{"logprobs": {"content": [
            {"token": t, "top_logprobs": [{"token": a, "logprob": la},
                                          {"token": b, "logprob": lb}]}
            for t, (a, la), (b, lb) in steps]}}]}}

    alone = answer(("x", ("x", -0.1), ("y", -3)), ("p", ("p", -0.60), ("q", -0.70)))
    flipped = answer(("x", ("x", -0.1), ("y", -3)), ("q", ("q", -0.6), ("p", -0.7)))
    assert rb.near_tie(flipped, alone, 0.25) == pytest.approx(0.1)
    assert rb.near_tie(flipped, alone, 0.05) is None  # too far apart to be a tie
    other = answer(("z", ("z", -0.1), ("x", -3)), ("p", ("p", -0.6), ("q", -0.7)))
    assert rb.near_tie(other, alone, 10) is None  # not the runner-up at the first change


# ------------------------------------------------------------- the server

def _assert_ok(c: rb.Check, srv) -> None:
    """No failures, and the server healthy after the check."""
    c.healthy_after, why = rb.healthy(srv.base, srv.model)
    assert not c.failures, c.failures
    assert c.healthy_after, why


@pytest.mark.server
def test_load_64_streaming_clients(server):
    c = rb.check_load(server.base, server.model, clients=64, requests_per_round=64, rounds=2,
                      max_tokens=8, timeout=300, rss=server.rss_bytes)
    _assert_ok(c, server)
    assert c.requests == 128 and c.completed == 128
    assert [r["completed"] for r in c.detail["rounds"]] == [64, 64]
    assert all(r["server_rss_mib"] > 100 for r in c.detail["rounds"])


@pytest.mark.server
@pytest.mark.parametrize("check", [rb.check_disconnects, rb.check_aborts,
                                   rb.check_max_tokens_one, rb.check_mixed_batch])
def test_faults_leave_the_server_healthy(server, check):
    c = check(server.base, server.model)
    _assert_ok(c, server)
    assert c.completed == c.requests > 0
    if "client_gave_up" in c.detail:  # abandoned requests end; none hangs
        assert c.detail["drained_s"] is not None, c.detail
    if check is rb.check_disconnects:
        # Stable: a stream hung up after two events is aborted by the server.
        # (The non-streamed abort check is recorded, not asserted here: in two
        # fresh-clone CI runs the tiny server answered all 8 requests before
        # the hang-up reached it; see the note on issue 7.)
        assert c.detail["client_gave_up"] >= 4, c.detail
        # Most were aborted, not run to the end (the tiny model is fast enough
        # to finish some before the hang-up is noticed, so not all).
        assert c.detail["server_generated_tokens"] < 8 * c.detail["max_tokens"] * 0.75


@pytest.mark.server
def test_prompts_near_the_context_limit(server):
    c = rb.check_context_limit(server.base, server.model)
    _assert_ok(c, server)
    n = c.detail["max_model_len"]
    assert n == 1024
    cases = {(n - x["prompt_tokens"], x["max_tokens"]): x for x in c.detail["cases"]}
    assert cases[(8, 8)]["outcome"] == "completed"
    assert cases[(1, 1)]["output_tokens"] == 1
    assert cases[(0, 1)]["status"] == 400 and cases[(-10, 1)]["status"] == 400


@pytest.mark.server
def test_stop_string_inside_a_loose_span(server):
    c = rb.check_stop_in_loose_span(server.base, server.model)
    _assert_ok(c, server)
    # With threshold 0 the near draft's mismatches are loosely accepted, so
    # FLy's text leaves the strict text in most answers.
    assert c.detail["exercised"] >= 2


@pytest.mark.server
def test_bad_input_gets_clean_4xx(server):
    c = rb.check_bad_input(server.base, server.model)
    _assert_ok(c, server)
    assert c.clean_errors == len(rb.bad_inputs(server.model))
    answers = {a["case"]: a for a in c.detail["answers"]}
    assert answers["unknown model"]["status"] == 404
    assert "largest top-3 entropy" in answers["threshold 1e30"]["answer"]
    assert "window must be an integer" in answers["fly_window is text"]["answer"]


@pytest.mark.server
def test_bench_serve_compares_fly_with_strict_on_one_server(server, tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                        "answer": f"#### {2 * i}"}) + "\n" for i in range(6)))
    rc = bs.main(["--endpoint", f"fly={server.base}", "--endpoint", f"strict={server.base}",
                  "--xargs", 'strict={"fly_strict": true}', "--datasets", "gsm8k", "--data", str(data),
                  "--limit", "6", "--max-tokens", "12", "--concurrency", "1,4",
                  "--request-rate", "50",
                  "--rounds", "2", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["request_rate"] == 50
    rows = {(r["endpoint"], r["concurrency"]): r for r in res["rows"]}
    assert set(rows) == {("fly", 1), ("strict", 1), ("fly", 4), ("strict", 4)}
    for r in rows.values():
        assert r["ok"] == 6 and r["failed"] == 0 and r["output_tokens"] > 0
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p90"] <= r["ttft_ms"]["p99"]
        assert r["mean_accepted_length"] >= 1
    for c in (1, 4):
        assert rows[("strict", c)]["loose_rate"] == 0
        assert rows[("fly", c)]["loose_rate"] > 0
        assert rows[("fly", c)]["vs_fly"]["output_tok_s"] == 1.0
    # Rounds alternate the order: A B, then B A.
    order = [(s["concurrency"], s["endpoint"]) for s in res["schedule"]]
    assert order[:4] == [(1, "fly"), (1, "strict"), (1, "strict"), (1, "fly")]
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert "| 4 | strict | 6 / 0 |" in (tmp_path / "report.md").read_text()


@pytest.mark.server
def test_robustness_script_writes_its_report(server, tmp_path):
    r = subprocess.run(
        [sys.executable, "benchmarks/serve_robustness.py", "--url", server.base,
         "--clients", "8", "--requests", "8", "--rounds", "1", "--max-tokens", "4",
         "--out", str(tmp_path)], cwd=ROOT, env=vllm_env(), capture_output=True,
        text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["checks"]) == 8 and all(c["ok"] for c in res["checks"])
    assert "No failures." in (tmp_path / "report.md").read_text()


@pytest.mark.server
def test_a_server_without_fly_gets_the_checks_that_apply(servers):
    """Against a plain server (no speculation) the FLy-only checks are
    skipped, per-request FLy settings are refused cleanly, and the rest pass."""
    srv = servers["plain"]
    assert not rb.serves_fly(srv.base, srv.model)
    said = []
    checks = rb.run_all(srv.base, srv.model, progress=said.append,
                        only=("max_tokens_one", "stop_in_loose_span", "bad_input"))
    assert [c.name for c in checks] == ["max_tokens 1", "bad input"]
    assert any("skipping stop_in_loose_span" in s for s in said)
    assert all(c.ok for c in checks), [c.failures for c in checks]
    bad = checks[1]
    assert bad.clean_errors == len(rb.bad_inputs(srv.model))
    assert any("need a server started with" in a["answer"] for a in bad.detail["answers"])
