"""Robustness of a serving endpoint: load, faults and bad input.

Every check sends a bounded number of requests, each with a time limit, and
sorts what came back into three kinds:

- completed: HTTP 200 with a well-formed answer;
- clean error: an HTTP 4xx with a JSON error body (what a client can act on);
- failure: anything else (a hang past the time limit, a 5xx, a broken
  connection, a malformed answer, or an answer that breaks the check's rule).

After each check the server must still be healthy: ``/health`` answers 200,
no request is left running (``vllm:num_requests_running`` drains to 0) and
a canary completion succeeds. Meant for a server started with a FLy
``--speculative-config``; per-request strict/loose switches go through
``vllm_xargs``.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import requests

STRICT = {"fly_strict": True}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey").split()


@dataclass
class Check:
    name: str
    requests: int = 0
    completed: int = 0
    clean_errors: int = 0
    failures: list[str] = field(default_factory=list)
    healthy_after: bool | None = None
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)

    def count(self, outcome: dict, rule: Callable[[dict], str | None] | None = None) -> None:
        """Tally one outcome of `call`; `rule` returns a failure message for
        a completed answer that breaks the check's own rule."""
        self.requests += 1
        if outcome["kind"] == "completed":
            problem = rule(outcome) if rule else None
            if problem:
                self.failures.append(problem)
            else:
                self.completed += 1
        elif outcome["kind"] == "clean_error":
            self.clean_errors += 1
        else:
            self.failures.append(outcome["error"])

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.healthy_after)


def call(base: str, path: str, body=None, *, raw: str | None = None, stream: bool = False,
         timeout: float = 120, read_chunks: int | None = None) -> dict:
    """POST to the server and classify the answer. With `stream`, reads the
    SSE stream (or only `read_chunks` events, then hangs up)."""
    t0 = time.perf_counter()
    data = raw if raw is not None else json.dumps(body)
    try:
        r = requests.post(base + path, data=data, stream=stream, timeout=timeout,
                          headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            try:
                err = r.json()
                kind = "clean_error" if 400 <= r.status_code < 500 else "failure"
            except ValueError:
                err, kind = r.text[:200], "failure"
            return {"kind": kind, "status": r.status_code, "error":
                    f"HTTP {r.status_code}: {json.dumps(err)[:300]}",
                    "seconds": time.perf_counter() - t0}
        if not stream:
            return {"kind": "completed", "status": 200, "json": r.json(),
                    "seconds": time.perf_counter() - t0}
        text, usage, finish, events = [], None, None, 0
        with r:
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[len(b"data: "):])
                if "error" in ev:
                    return {"kind": "failure", "status": 200,
                            "error": f"error event in stream: {json.dumps(ev)[:300]}",
                            "seconds": time.perf_counter() - t0}
                events += 1
                for ch in ev.get("choices", []):
                    piece = ch.get("delta", {}).get("content") or ch.get("text") or ""
                    text.append(piece)
                    finish = ch.get("finish_reason") or finish
                usage = ev.get("usage") or usage
                if read_chunks is not None and events >= read_chunks:
                    break  # hang up mid-stream
        return {"kind": "completed", "status": 200, "text": "".join(text), "usage": usage,
                "finish_reason": finish, "events": events,
                "seconds": time.perf_counter() - t0}
    except requests.Timeout:
        return {"kind": "failure", "error": f"no answer in {timeout:.0f} s (hang)",
                "seconds": time.perf_counter() - t0}
    except (requests.RequestException, ValueError) as e:
        return {"kind": "failure", "error": f"{type(e).__name__}: {str(e)[:200]}",
                "seconds": time.perf_counter() - t0}


def chat(model: str, content: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def prompt(i: int, n_words: int = 12) -> str:
    rng = random.Random(i)
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def completion_text(outcome: dict) -> str:
    if "text" in outcome:
        return outcome["text"]
    choice = outcome["json"]["choices"][0]
    return choice.get("message", {}).get("content") or choice.get("text") or ""


def finish_reason(outcome: dict) -> str | None:
    if "json" in outcome:
        return outcome["json"]["choices"][0].get("finish_reason")
    return outcome.get("finish_reason")


def output_tokens(outcome: dict) -> int | None:
    usage = outcome["json"].get("usage") if "json" in outcome else outcome.get("usage")
    return usage.get("completion_tokens") if usage else None


def scrape(base: str) -> str | None:
    """The server's Prometheus text (None without /metrics)."""
    try:
        r = requests.get(base + "/metrics", timeout=10)
    except requests.RequestException:
        return None
    return r.text if r.status_code == 200 else None


def metric_sum(text: str, name: str, labels: str = "") -> float | None:
    """Sum of the series `name` in Prometheus `text` whose labels contain
    `labels` (None if there is none)."""
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name) and labels in line]
    return sum(vals) if vals else None


def running_requests(base: str) -> float | None:
    """Requests running or waiting on the server (None without /metrics)."""
    text = scrape(base)
    running = metric_sum(text, "vllm:num_requests_running") if text else None
    if running is None:
        return None
    return running + (metric_sum(text, "vllm:num_requests_waiting") or 0)


def finish_counts(base: str) -> tuple[float, float] | None:
    """(requests finished other than by abort, tokens generated) so far."""
    text = scrape(base)
    if text is None:
        return None
    done = metric_sum(text, "vllm:request_success_total")
    aborted = metric_sum(text, "vllm:request_success_total", 'finished_reason="abort"')
    tokens = metric_sum(text, "vllm:generation_tokens_total")
    if done is None or tokens is None:
        return None
    return done - (aborted or 0), tokens


def drain(base: str, timeout: float = 60) -> float | None:
    """Seconds until no request is running, or None if that never happens."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        n = running_requests(base)
        if n is None or n == 0:
            return time.perf_counter() - t0
        time.sleep(0.25)
    return None


def healthy(base: str, model: str) -> tuple[bool, str]:
    try:
        if requests.get(base + "/health", timeout=10).status_code != 200:
            return False, "/health is not 200"
    except requests.RequestException as e:
        return False, f"/health: {type(e).__name__}"
    if drain(base) is None:
        return False, "requests still running 60 s after the check"
    canary = call(base, "/v1/chat/completions", chat(model, "canary", 4), timeout=120)
    if canary["kind"] != "completed":
        return False, f"canary request: {canary.get('error')}"
    return True, "ok"


# ---------------------------------------------------------------- the checks

def serves_fly(base: str, model: str) -> bool:
    """Whether the server takes per-request FLy settings (it was started
    with a FLy speculative config)."""
    o = call(base, "/v1/chat/completions", chat(model, "probe", 1, vllm_xargs=STRICT))
    return o["kind"] == "completed"


def check_load(base: str, model: str, *, clients: int = 64, requests_per_round: int = 128,
               rounds: int = 3, max_tokens: int = 32, timeout: float = 600,
               rss: Callable[[], int] | None = None, fly: bool | None = None,
               progress=print) -> Check:
    """`clients` concurrent streaming clients share `requests_per_round`
    requests (on a FLy server half strict, half loose) for `rounds` rounds;
    the server's resident memory (if `rss` is given) is read after each
    round. `fly`: whether the server serves FLy (asked if not given)."""
    c = Check("load")
    c.detail["rounds"] = []
    mixed = serves_fly(base, model) if fly is None else fly
    for rnd in range(rounds):
        t0 = time.perf_counter()
        bodies = [chat(model, prompt(rnd * 100000 + i), max_tokens,
                       stream=True, stream_options={"include_usage": True},
                       **({"vllm_xargs": STRICT} if mixed and i % 2 else {}))
                  for i in range(requests_per_round)]
        with ThreadPoolExecutor(max_workers=clients) as pool:
            outs = list(pool.map(lambda b: call(base, "/v1/chat/completions", b, stream=True,
                                                timeout=timeout), bodies))
        before = (c.completed, c.clean_errors, len(c.failures))
        for o in outs:
            c.count(o, lambda o: None if output_tokens(o) else "stream ended without usage")
        lat = sorted(o["seconds"] for o in outs)
        row = {"round": rnd + 1, "completed": c.completed - before[0],
               "clean_errors": c.clean_errors - before[1],
               "failures": len(c.failures) - before[2],
               "wall_s": round(time.perf_counter() - t0, 2),
               "max_request_s": round(lat[-1], 2),
               "output_tokens": sum(output_tokens(o) or 0 for o in outs
                                    if o["kind"] == "completed")}
        if rss is not None:
            row["server_rss_mib"] = round(rss() / 2**20, 1)
        c.detail["rounds"].append(row)
        progress(f"load round {rnd + 1}/{rounds}: {row}")
    return c


def _abandoned(c: Check, base: str, outs: list[dict], before: tuple | None,
               gave_up: Callable[[dict], bool], max_tokens: int) -> None:
    """Tally requests the client abandoned on purpose, then check nothing is
    left running. How many the server still finished normally, and the
    tokens it generated, are recorded: a fast server can finish a request
    before it notices the hang-up, so that alone is not a failure."""
    c.detail["client_gave_up"] = sum(map(gave_up, outs))
    for o in outs:
        c.count({"kind": "completed"} if gave_up(o) else o)
    c.detail["drained_s"] = drain(base)
    if c.detail["drained_s"] is None:
        c.failures.append("abandoned requests kept running on the server for 60 s")
    after = finish_counts(base)
    if after is not None and before is not None:
        c.detail["server_finished_normally"] = after[0] - before[0]
        c.detail["server_generated_tokens"] = after[1] - before[1]
        c.detail["max_tokens"] = max_tokens


def long_max_tokens(base: str, model: str) -> int:
    """A max_tokens that fills most of the context: long enough that only
    an abort ends the request early."""
    _, max_len = tokenize(base, model, "x")
    return max(16, max_len - 128)


def check_disconnects(base: str, model: str, n: int = 8, max_tokens: int | None = None
                      ) -> Check:
    """Clients that hang up after the first two streamed events."""
    c = Check("client disconnects mid-stream")
    max_tokens = max_tokens or long_max_tokens(base, model)
    before = finish_counts(base)
    with ThreadPoolExecutor(max_workers=n) as pool:
        outs = list(pool.map(lambda i: call(
            base, "/v1/chat/completions", chat(model, prompt(i), max_tokens, stream=True,
                                               ignore_eos=True),
            stream=True, read_chunks=2, timeout=120), range(n)))
    _abandoned(c, base, outs, before, lambda o: o["kind"] == "completed"
               and o["finish_reason"] is None, max_tokens)
    return c


def _send_raw(base: str, path: str, body: dict) -> socket.socket:
    """Send a POST and leave the answer unread (the caller hangs up)."""
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port or 80), timeout=30)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + payload)
    return sock


def _answered(sock: socket.socket) -> bool:
    """Whether any of the answer has arrived (without waiting for it)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def check_aborts(base: str, model: str, n: int = 8, max_tokens: int | None = None,
                 wait_s: float = 30) -> Check:
    """Non-streaming requests whose clients hang up while the server runs
    them: the client sends n requests, waits until the server counts them
    as running or waiting (at most `wait_s`), then closes the connections.
    A request already answered by then counts as finished, not abandoned."""
    c = Check("aborted requests")
    max_tokens = max_tokens or long_max_tokens(base, model)
    before = finish_counts(base)
    socks = [_send_raw(base, "/v1/chat/completions",
                       chat(model, prompt(50 + i), max_tokens, ignore_eos=True))
             for i in range(n)]
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline and (running_requests(base) or 0) < n:
        time.sleep(0.02)
    outs = []
    for sock in socks:
        outs.append({"kind": "completed"} if _answered(sock) else
                    {"kind": "failure", "error": "client hung up (hang)"})
        sock.close()
    _abandoned(c, base, outs, before, lambda o: o["kind"] == "failure"
               and "hang" in o["error"], max_tokens)
    return c


def check_max_tokens_one(base: str, model: str) -> Check:
    """max_tokens 1, streamed and not, strict and loose: exactly one token,
    although a speculative step can accept several."""
    c = Check("max_tokens 1")
    for stream in (False, True):
        for xargs in ({}, STRICT):
            body = chat(model, prompt(7), 1, **({"vllm_xargs": xargs} if xargs else {}))
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
            o = call(base, "/v1/chat/completions", body, stream=stream)
            c.count(o, lambda o: None if output_tokens(o) == 1 else
                    f"max_tokens 1 gave {output_tokens(o)} tokens (stream={stream})")
    return c


def tokenize(base: str, model: str, text: str) -> tuple[list[int], int]:
    r = requests.post(base + "/tokenize", json={"model": model, "prompt": text}, timeout=60)
    r.raise_for_status()
    j = r.json()
    return j["tokens"], j["max_model_len"]


def check_context_limit(base: str, model: str) -> Check:
    """Prompts that leave 8, 1 and 0 free positions, and one over the limit.
    Those that fit must complete within what is left (speculation near the
    limit must not write past it); the rest must get a clean 4xx."""
    c = Check("prompts near the context limit")
    ids, max_len = tokenize(base, model, " ".join(WORDS) * 4)
    cases = [(8, 8), (1, 1), (2, 64), (0, 1), (-10, 1)]  # (free positions, max_tokens)
    c.detail["max_model_len"] = max_len
    c.detail["cases"] = []
    for free, max_tokens in cases:
        n = max_len - free
        prompt_ids = (ids * (n // len(ids) + 1))[:n]
        body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens,
                "temperature": 0}
        o = call(base, "/v1/completions", body)

        def rule(o, free=free, max_tokens=max_tokens):
            got = output_tokens(o)
            if got is None or got > min(free, max_tokens):
                return f"{free} free positions, max_tokens {max_tokens}: got {got} tokens"
            return None

        if free >= max_tokens and o["kind"] == "clean_error":  # fits: must complete
            o = {**o, "kind": "failure", "error": f"a prompt that fits was refused: "
                 f"{o['error']}"}
        elif free <= 0 and o["kind"] == "completed":  # no room: must be refused
            o = {"kind": "failure", "error": f"a prompt of {n} tokens (limit {max_len}) "
                 f"was accepted"}
        c.count(o, rule)
        c.detail["cases"].append({"prompt_tokens": n, "max_tokens": max_tokens,
                                  "outcome": o["kind"], "status": o.get("status"),
                                  "output_tokens": output_tokens(o)
                                  if o["kind"] == "completed" else None})
    return c


def _first_difference(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _first_unique(text: str, start: int, shortest: int = 3, longest: int = 24) -> str | None:
    """The shortest printable stop string that begins at `start` and occurs
    nowhere earlier in `text`, so the cut falls exactly at `start`."""
    for n in range(shortest, longest + 1):
        stop = text[start:start + n]
        if len(stop) < n or not stop.isprintable() or "\ufffd" in stop:
            return None  # stop strings are printable text
        if text.find(stop) == start:
            return stop
    return None


def check_stop_in_loose_span(base: str, model: str, n_prompts: int = 12,
                             max_tokens: int = 64) -> Check:
    """Stop strings that start where FLy's output first leaves the strict
    (target's own) output, and one and two characters later: inside the step
    that accepted a loose token. The answer must be FLy's text cut just before
    the stop string, with finish reason "stop"."""
    c = Check("stop string inside a loose-accepted span")
    c.detail["examples"] = []
    for i in range(n_prompts):
        p = prompt(200 + i)
        loose = call(base, "/v1/chat/completions", chat(model, p, max_tokens))
        strict = call(base, "/v1/chat/completions",
                      chat(model, p, max_tokens, vllm_xargs=STRICT))
        c.count(loose)
        c.count(strict)
        if loose["kind"] != "completed" or strict["kind"] != "completed":
            continue
        a, b = completion_text(loose), completion_text(strict)
        d = _first_difference(a, b)
        if d is None:
            continue
        for start in (d, d + 1, d + 2):
            stop = _first_unique(a, start)
            if stop is None:
                continue
            want = a[:start]
            o = call(base, "/v1/chat/completions", chat(model, p, max_tokens, stop=[stop]))

            def rule(o, want=want, stop=stop):
                got = completion_text(o)
                if got != want or finish_reason(o) != "stop":
                    return (f"stop {stop!r}: expected {want!r} (finish 'stop'), got {got!r} "
                            f"(finish {finish_reason(o)!r})")
                return None

            c.count(o, rule)
            c.detail["examples"].append({"stop": stop, "cut_at_char": len(want),
                                         "loose_diverged_at_char": d})
    c.detail["exercised"] = len(c.detail["examples"])
    return c


def _token_logprobs(outcome: dict) -> list[dict]:
    return (outcome["json"]["choices"][0].get("logprobs") or {}).get("content") or []


def near_tie(batched: dict, alone: dict, tie_nats: float) -> float | None:
    """Where two answers first differ by token: the gap in nats between the
    alone run's top choice there and the token the batched run took, if that
    token was the alone run's runner-up within `tie_nats`; else None."""
    a, b = _token_logprobs(alone), _token_logprobs(batched)
    for x, y in zip(a, b):
        if x["token"] == y["token"]:
            continue
        top = x.get("top_logprobs") or []
        if len(top) >= 2 and top[1]["token"] == y["token"]:
            gap = top[0]["logprob"] - top[1]["logprob"]
            return gap if gap <= tie_nats else None
        return None
    return None


def check_mixed_batch(base: str, model: str, n: int = 8, max_tokens: int = 32,
                      tie_nats: float = 0.0) -> Check:
    """Strict and loose requests in one batch: every strict answer equals the
    same request's strict answer when it runs alone, so loose neighbours do
    not leak into a strict request.

    In fp32 the answers must be identical (`tie_nats` 0). In bf16 a batch of
    another shape can flip a near-tie of the target itself; with `tie_nats`
    > 0, a difference whose first changed token was the alone run's
    runner-up within `tie_nats` nats is recorded as a near-tie, not a
    failure. Any other difference is a failure."""
    c = Check("strict and loose requests in one batch")
    c.detail.update(near_ties=[], tie_nats=tie_nats)
    bodies = [chat(model, prompt(300 + i), max_tokens, logprobs=True, top_logprobs=2,
                   **({"vllm_xargs": STRICT} if i % 2 == 0 else {})) for i in range(n)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        together = list(pool.map(lambda b: call(base, "/v1/chat/completions", b), bodies))
    for i, o in enumerate(together):
        if i % 2:
            c.count(o)
            continue
        alone = call(base, "/v1/chat/completions", bodies[i])
        c.count(alone)

        def rule(o, alone=alone):
            if alone["kind"] != "completed" or completion_text(o) == completion_text(alone):
                return None
            gap = near_tie(o, alone, tie_nats) if tie_nats > 0 else None
            if gap is None:
                return "a strict request's answer changed with loose neighbours in the batch"
            c.detail["near_ties"].append(round(gap, 4))
            return None

        c.count(o, rule)
    return c


def bad_inputs(model: str) -> list[tuple[str, str, dict | None, str | None]]:
    """(name, path, body, raw body) of requests a server must refuse cleanly."""
    ok = chat(model, "hi", 8)
    return [
        ("malformed JSON", "/v1/chat/completions", None, '{"model": "x", "messages": ['),
        ("body is a list", "/v1/chat/completions", None, "[1, 2, 3]"),
        ("messages is a string", "/v1/chat/completions", {**ok, "messages": "hi"}, None),
        ("max_tokens -1", "/v1/chat/completions", {**ok, "max_tokens": -1}, None),
        ("temperature is text", "/v1/chat/completions", {**ok, "temperature": "hot"}, None),
        ("unknown model", "/v1/chat/completions", {**ok, "model": "no-such-model"}, None),
        ("vllm_xargs is a string", "/v1/chat/completions", {**ok, "vllm_xargs": "strict"},
         None),
        ("fly_window is text", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_window": "six"}}, None),
        ("fly_window 0", "/v1/chat/completions", {**ok, "vllm_xargs": {"fly_window": 0}},
         None),
        ("fly_strict 'maybe'", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_strict": "maybe"}}, None),
        ("unknown fly key", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_threshold": 0.3}}, None),
        ("threshold -1", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_entropy_threshold": -1}}, None),
        ("threshold 1e30", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_entropy_threshold": 1e30}}, None),
        ("threshold NaN", "/v1/chat/completions", None,
         json.dumps({**ok, "vllm_xargs": {"fly_entropy_threshold": float("nan")}})),
        ("streamed, fly_window 99", "/v1/chat/completions",
         {**ok, "stream": True, "vllm_xargs": {"fly_window": 99}}, None),
        ("streamed completion, fly_strict 'maybe'", "/v1/completions",
         {"model": model, "prompt": "hi", "max_tokens": 8, "stream": True,
          "vllm_xargs": {"fly_strict": "maybe"}}, None),
        ("fly_margin under the entropy gate", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_gate": "entropy", "fly_margin": 0.3}}, None),
        ("fly_gate 'cosine'", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_gate": "cosine"}}, None),
        ("fly_strict_prefix_tokens -1", "/v1/chat/completions",
         {**ok, "vllm_xargs": {"fly_strict_prefix_tokens": -1}}, None),
        ("threshold Infinity", "/v1/completions", None,
         json.dumps({"model": model, "prompt": "hi", "max_tokens": 8,
                     "vllm_xargs": {"fly_entropy_threshold": float("inf")}})),
    ]


def check_bad_input(base: str, model: str) -> Check:
    c = Check("bad input")
    c.detail["answers"] = []
    for name, path, body, raw in bad_inputs(model):
        o = call(base, path, body, raw=raw, timeout=60)
        if o["kind"] == "completed":
            c.requests += 1
            c.failures.append(f"{name}: accepted with HTTP 200")
        else:
            c.count(o)
        c.detail["answers"].append({"case": name, "status": o.get("status"),
                                    "answer": o.get("error", "")[:200]})
    return c


CHECKS = ("load", "disconnects", "aborts", "max_tokens_one", "context_limit",
          "stop_in_loose_span", "mixed_batch", "bad_input")
FLY_ONLY = ("stop_in_loose_span", "mixed_batch")


def run_all(base: str, model: str, *, only: tuple[str, ...] = CHECKS,
            load: dict | None = None, tie_nats: float = 0.0,
            rss: Callable[[], int] | None = None, progress=print) -> list[Check]:
    """The checks named in `only` (all by default) in turn, each followed by
    a health check."""
    fly = serves_fly(base, model)
    checks: dict[str, Callable[[], Check]] = {
        "load": lambda: check_load(base, model, rss=rss, fly=fly, progress=progress,
                                   **(load or {})),
        "disconnects": lambda: check_disconnects(base, model),
        "aborts": lambda: check_aborts(base, model),
        "max_tokens_one": lambda: check_max_tokens_one(base, model),
        "context_limit": lambda: check_context_limit(base, model),
        "stop_in_loose_span": lambda: check_stop_in_loose_span(base, model),
        "mixed_batch": lambda: check_mixed_batch(base, model, tie_nats=tie_nats),
        "bad_input": lambda: check_bad_input(base, model),
    }
    if not fly:
        skipped = [n for n in only if n in FLY_ONLY]
        if skipped:
            progress(f"the server does not serve FLy: skipping {', '.join(skipped)}")
        only = tuple(n for n in only if n not in FLY_ONLY)
    out = []
    for make in (checks[name] for name in only):
        t0 = time.perf_counter()
        c = make()
        c.healthy_after, why = healthy(base, model)
        if not c.healthy_after:
            c.failures.append(f"server unhealthy after the check: {why}")
        c.seconds = round(time.perf_counter() - t0, 2)
        progress(f"{c.name}: {c.requests} requests, {c.completed} completed, "
                 f"{c.clean_errors} clean errors, {len(c.failures)} failures, "
                 f"healthy after: {c.healthy_after}")
        out.append(c)
    return out


def as_dict(c: Check) -> dict:
    return {**asdict(c), "ok": c.ok}

