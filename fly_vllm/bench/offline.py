"""Run one mode (one speculative config) offline, in a fresh process.

Each mode gets its own vLLM engine in its own process, so modes cannot leak
state into each other. The parent sends a job as JSON and reads back, per
request, the text, token ids and latency, plus the change in every
``vllm:spec_decode_*`` and ``vllm:fly_*`` counter over the timed part.

    python -m fly_vllm.bench.offline JOB.json OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

PROGRESS = "[fly-bench] "
DEFAULT_ENGINE = {"enforce_eager": True, "dtype": "float32", "max_model_len": 2048,
                  "seed": 0}


def counters(llm) -> dict[str, Any]:
    """Spec-decode and FLy counters, summed over labels; vectors as lists."""
    out: dict[str, Any] = {}
    for m in llm.get_metrics():
        if not m.name.startswith(("vllm:spec_decode", "vllm:fly_")):
            continue
        if hasattr(m, "values"):
            out[m.name] = list(m.values)
        elif "position" in m.labels:
            vec = out.setdefault(m.name, [])
            p = int(m.labels["position"])
            vec.extend([0] * (p + 1 - len(vec)))
            vec[p] += m.value
        else:
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def counter_delta(after: dict, before: dict) -> dict:
    delta = {}
    for k, v in after.items():
        b = before.get(k, 0 if not isinstance(v, list) else [])
        if isinstance(v, list):
            b = list(b) + [0] * (len(v) - len(b))
            delta[k] = [x - y for x, y in zip(v, b)]
        else:
            delta[k] = v - b
    return delta


def acceptance(counters: dict) -> dict:
    """Mean accepted length, acceptance rate (accepted over drafted tokens)
    and FLy's loose-accept rate (loose accepts over drafted tokens) from
    counter deltas; None where nothing was drafted."""
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    drafted = counters.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
    fly_drafted = counters.get("vllm:fly_draft_tokens", 0)
    return {
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "loose_rate": (counters.get("vllm:fly_loose_accepted_tokens", 0) / fly_drafted
                       if fly_drafted else None),
    }


def _worker(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    engine = {**DEFAULT_ENGINE, **job.get("engine", {})}
    llm = LLM(model=job["model"], speculative_config=job.get("spec"),
              disable_log_stats=False, **engine)
    reqs = job["requests"]

    def params(r):
        return SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"],
                              seed=r.get("seed"))

    # Warm-up on the first request (not timed, not counted).
    llm.chat([reqs[0]["messages"]], params(reqs[0]), use_tqdm=False)
    conc = max(1, int(job.get("concurrency", 1)))
    results: list[dict] = []
    group_counters: dict[str, dict] = {}
    groups = list(dict.fromkeys(r.get("group", "all") for r in reqs))
    t_all = time.perf_counter()
    for g in groups:
        todo = [r for r in reqs if r.get("group", "all") == g]
        before = counters(llm)
        for start in range(0, len(todo), conc):
            chunk = todo[start:start + conc]
            t0 = time.perf_counter()
            outs = llm.chat([r["messages"] for r in chunk], [params(r) for r in chunk],
                            use_tqdm=False)
            dt = time.perf_counter() - t0
            for r, o in zip(chunk, outs):
                results.append({"id": r.get("id"), "group": g, "text": o.outputs[0].text,
                                "token_ids": list(o.outputs[0].token_ids),
                                "latency": dt})
            if job.get("progress"):
                print(f"{PROGRESS}    {g}: {min(start + conc, len(todo))}/{len(todo)} "
                      "requests done", file=sys.stderr, flush=True)
        group_counters[g] = counter_delta(counters(llm), before)
    elapsed = time.perf_counter() - t_all
    total: dict = {}
    for c in group_counters.values():
        for k, v in c.items():
            if isinstance(v, list):
                acc = total.setdefault(k, [])
                acc.extend([0] * (len(v) - len(acc)))
                for i, x in enumerate(v):
                    acc[i] += x
            else:
                total[k] = total.get(k, 0) + v
    return {"elapsed": elapsed, "results": results, "counters": total,
            "group_counters": group_counters}


def run_mode(job: dict, *, env: dict | None = None, log_path: str | None = None) -> dict:
    """Run `job` in a fresh Python process and return its result dict."""
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    with tempfile.TemporaryDirectory() as d:
        jp, op = os.path.join(d, "job.json"), os.path.join(d, "out.json")
        with open(jp, "w") as f:
            json.dump(job, f)
        # Stream the worker's stderr: progress lines are echoed, all is logged.
        proc = subprocess.Popen([sys.executable, "-m", "fly_vllm.bench.offline", jp, op],
                                env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(PROGRESS):
                print(line.rstrip()[len(PROGRESS):], file=sys.stderr, flush=True)
        proc.wait()
        if log_path:
            with open(log_path, "w") as f:
                f.writelines(lines)
        if proc.returncode != 0:
            raise RuntimeError("benchmark worker failed:\n" + "".join(lines)[-3000:])
        with open(op) as f:
            return json.load(f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    result = _worker(job)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
