"""Run one mode (one speculative config) offline, in a fresh process.

Each mode gets its own vLLM engine in its own process, so modes cannot leak
state into each other. The parent sends a job as JSON and reads back, per
request, the text, token ids and latency, plus the change in every
``vllm:spec_decode_*`` and ``vllm:fly_*`` counter over the timed part.

    python -m fly_vllm.bench.offline JOB.json OUT.json
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from fly_vllm.bench.parts import add_counters

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
    counter deltas, and the draft model's forward passes per proposal; None
    where nothing was drafted."""
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    drafted = counters.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
    fly_drafted = counters.get("vllm:fly_draft_tokens", 0)
    calls = counters.get("vllm:fly_drafter_calls", 0)
    return {
        "drafter_passes_per_step": (counters.get("vllm:fly_drafter_passes", 0) / calls
                                    if calls else None),
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "loose_rate": (counters.get("vllm:fly_loose_accepted_tokens", 0) / fly_drafted
                       if fly_drafted else None),
    }


class Progress:
    """Stands in for tqdm in `LLM.chat(use_tqdm=...)`: one progress line
    (which the parent echoes) per tenth of the requests finished. vLLM also
    wraps iterables with it (rendering prompts); those pass through silently."""

    def __init__(self, iterable=None, *, total: int | None = None, label: str = "", **_):
        self._iterable = iterable
        self.total, self.label, self.n = total or 0, label, 0
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._step = max(1, self.total // 10)

    @property
    def format_dict(self) -> dict:
        return {"elapsed": time.perf_counter() - self._t0}

    def update(self, k: int = 1) -> None:
        before, self.n = self.n, self.n + k
        if self.n // self._step > before // self._step or self.n == self.total:
            print(f"{PROGRESS}    {self.label}: {self.n}/{self.total} requests done "
                  f"({self.format_dict['elapsed']:.0f} s)", file=sys.stderr, flush=True)

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _request_stats(outs) -> list:
    """Per-request FLy totals (steps, native and loose accepts), or None for
    each output where the engine keeps none (no FLy config)."""
    try:
        from fly_vllm import request_stats

        return request_stats(outs)
    except Exception:  # the totals are a report, never a reason to fail a run
        return [None] * len(outs)


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
    group_elapsed: dict[str, float] = {}
    for g in groups:
        todo = [r for r in reqs if r.get("group", "all") == g]
        before = counters(llm)
        t_group = time.perf_counter()
        # One request at a time: per-request latency. More: the whole group is
        # submitted and the engine (max_num_seqs = concurrency) keeps that many
        # running, so only the group's wall time is meaningful.
        chunks = [todo[i:i + 1] for i in range(len(todo))] if conc == 1 else [todo]
        for chunk in chunks:
            t0 = time.perf_counter()
            progress = conc > 1 and bool(job.get("progress"))
            outs = llm.chat([r["messages"] for r in chunk], [params(r) for r in chunk],
                            use_tqdm=functools.partial(Progress, label=g) if progress
                            else False)
            dt = time.perf_counter() - t0
            stats = _request_stats(outs)
            for r, o, st in zip(chunk, outs, stats):
                results.append({"id": r.get("id"), "group": g, "text": o.outputs[0].text,
                                "token_ids": list(o.outputs[0].token_ids),
                                "finish_reason": o.outputs[0].finish_reason,
                                "fly_stats": st,
                                "latency": dt if conc == 1 else None})
            if job.get("progress") and conc == 1:
                done = sum(1 for x in results if x["group"] == g)
                print(f"{PROGRESS}    {g}: {done}/{len(todo)} requests done",
                      file=sys.stderr, flush=True)
        group_elapsed[g] = time.perf_counter() - t_group
        group_counters[g] = counter_delta(counters(llm), before)
    elapsed = time.perf_counter() - t_all
    total: dict = {}
    for c in group_counters.values():
        add_counters(total, c)
    return {"elapsed": elapsed, "results": results, "counters": total,
            "group_counters": group_counters, "group_elapsed": group_elapsed}


WORKER_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": str(os.cpu_count() or 2),
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_HOST_IP": "127.0.0.1",
}


def worker_env(env: dict | None = None) -> dict:
    """The worker's environment: `env` (default: ours) with the engine's
    thread and process defaults filled in where unset."""
    env = dict(os.environ if env is None else env)
    for k, v in WORKER_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    return env


def run_mode(job: dict, *, env: dict | None = None, log_path: str | None = None) -> dict:
    """Run `job` in a fresh Python process and return its result dict."""
    env = worker_env(env)
    with tempfile.TemporaryDirectory() as d:
        jp, op = os.path.join(d, "job.json"), os.path.join(d, "out.json")
        with open(jp, "w") as f:
            json.dump(job, f)
        # Stream the worker's stderr: progress lines are echoed, all is logged.
        # The worker gets its own process group, so that an engine-core
        # process it spawned cannot outlive it (an orphaned one keeps polling
        # and skews every later measurement).
        proc = subprocess.Popen([sys.executable, "-m", "fly_vllm.bench.offline", jp, op],
                                env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith(PROGRESS):
                    print(line.rstrip()[len(PROGRESS):], file=sys.stderr, flush=True)
            proc.wait()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
