"""Run the benchmark's requests against any OpenAI-compatible endpoint.

The endpoint's speculative config is whatever it serves, so one run is one
mode. Acceptance comes from its Prometheus ``/metrics``, read before and
after each dataset. Requests stream, so time to first token is measured too.
Results have the same shape as ``offline.run_mode`` (without token ids: the
OpenAI API returns text).
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from fly_vllm.bench.offline import PROGRESS, counter_delta

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFNaN]+)$')
_POS = re.compile(r'position="(\d+)"')


def parse_metrics(text: str) -> dict:
    """Spec-decode and FLy counters from Prometheus text, keyed as
    ``LLM.get_metrics()`` names them (no ``_total``), summed over labels;
    per-position counters become lists."""
    out: dict = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m or not m.group(1).startswith(("vllm:spec_decode", "vllm:fly_")):
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if not name.endswith("_total"):
            continue
        name = name[: -len("_total")]
        pos = _POS.search(labels)
        if pos:
            vec = out.setdefault(name, [])
            p = int(pos.group(1))
            vec.extend([0.0] * (p + 1 - len(vec)))
            vec[p] += value
        else:
            out[name] = out.get(name, 0.0) + value
    return out


def _metrics_text(base: str) -> str | None:
    """The server's ``/metrics`` text, or None where it has none."""
    import requests

    try:
        r = requests.get(base.rstrip("/") + "/metrics", timeout=30)
    except requests.RequestException:
        return None
    return r.text if r.status_code == 200 else None


def settled_metrics_text(base: str, interval: float = 0.6, tries: int = 20) -> str | None:
    """``/metrics`` text once two reads ``interval`` apart agree on every
    spec-decode and FLy counter (at most ``tries`` reads), or None where the
    server has none. With several API servers fly-vllm's counters reach
    ``/metrics`` up to half a second after the step (metrics_multiproc.py),
    so a read right after the last response can miss its last steps."""
    text = _metrics_text(base)
    for _ in range(tries - 1):
        if text is None:
            return None
        time.sleep(interval)
        again = _metrics_text(base)
        if again is not None and parse_metrics(again) == parse_metrics(text):
            return again
        text = again
    return text


def fetch_metrics(base: str, settled: bool = False) -> dict | None:
    """Parsed ``/metrics`` of the server at `base`, or None where it has none;
    ``settled``: once its counters have stopped moving (settled_metrics_text)."""
    text = settled_metrics_text(base) if settled else _metrics_text(base)
    return parse_metrics(text) if text is not None else None


def stream_chat(client, model: str, req: dict, extra_body: dict | None = None,
                timeout: float | None = None) -> dict:
    """One streamed chat completion: its text, output tokens (from the usage
    chunk), end-to-end latency and time to first token, in seconds."""
    t0 = time.perf_counter()
    ttft = None
    pieces: list[str] = []
    n_tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=req["messages"], max_tokens=req["max_tokens"],
        temperature=req["temperature"], seed=req.get("seed"), stream=True,
        stream_options={"include_usage": True}, extra_body=extra_body, timeout=timeout)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            n_tokens = chunk.usage.completion_tokens
    return {"id": req.get("id"), "group": req.get("group", "all"), "text": "".join(pieces),
            "n_tokens": n_tokens, "latency": time.perf_counter() - t0, "ttft": ttft}


def run_remote(base_url: str, model: str, requests_: list[dict], concurrency: int = 1,
               api_key: str = "EMPTY") -> dict:
    """`base_url` is the server root (``http://host:8000``)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key,
                    timeout=600)
    groups = list(dict.fromkeys(r.get("group", "all") for r in requests_))
    results: list[dict] = []
    group_counters, group_elapsed = {}, {}
    t_all = time.perf_counter()
    for g in groups:
        todo = [r for r in requests_ if r.get("group", "all") == g]
        before = fetch_metrics(base_url) or {}
        t_group = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for i, res in enumerate(pool.map(lambda r: stream_chat(client, model, r), todo), 1):
                results.append(res)
                print(f"{PROGRESS}    {g}: {i}/{len(todo)} requests done"[len(PROGRESS):],
                      file=sys.stderr, flush=True)
        group_elapsed[g] = time.perf_counter() - t_group
        group_counters[g] = counter_delta(fetch_metrics(base_url, settled=True) or {}, before)
    return {"elapsed": time.perf_counter() - t_all, "results": results,
            "group_counters": group_counters, "group_elapsed": group_elapsed}
