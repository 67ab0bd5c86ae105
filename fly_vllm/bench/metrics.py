"""Per-dataset metrics of one mode's run: speed, acceptance, accuracy, what
it changes against the target's own outputs, and retention against it."""

from __future__ import annotations

import statistics

from fly_vllm.bench import datasets as ds
from fly_vllm.bench import scoring
from fly_vllm.bench.offline import acceptance


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if not xs:
        return (float("nan"),) * 3
    if len(xs) == 1:
        return (xs[0],) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _capped(r: dict, max_tokens: int | None) -> bool:
    """Did the output stop at the token cap? vLLM's finish reason where the
    run recorded it, else its length against ``max_tokens``."""
    if r.get("finish_reason") is not None:
        return r["finish_reason"] == "length"
    n = len(r["token_ids"]) if "token_ids" in r else r.get("n_tokens", 0)
    return max_tokens is not None and n >= max_tokens


def divergence_metrics(res: list[dict], tgt: dict[str, dict]) -> dict:
    """What a mode changes in the outputs against the target's own (items of
    ``res`` that ``tgt`` has, by id): output length ratio (tokens over the
    target's, summed over the items), the share of identical outputs, and,
    among the others, the first token where the output parts from the
    target's (median and quartiles; an output that is a prefix of the other
    parts where the shorter ends)."""
    pairs = [(r["token_ids"], tgt[r["id"]]["token_ids"]) for r in res
             if r["id"] in tgt and "token_ids" in r and "token_ids" in tgt[r["id"]]]
    if not pairs:
        return {}
    mine, theirs = sum(len(a) for a, _ in pairs), sum(len(b) for _, b in pairs)
    parts = []
    for a, b in pairs:
        if a == b:
            continue
        first = scoring.first_difference(a, b)
        parts.append(min(len(a), len(b)) if first is None else first)
    return {"output_length_ratio": mine / theirs if theirs else float("nan"),
            "identical": (len(pairs) - len(parts)) / len(pairs),
            "parted": len(parts), "first_parting_q": _quantiles([float(x) for x in parts])}


def score_run(run: dict, items: dict[str, ds.Item], target: dict | None,
              sandbox_cache: dict, max_tokens: int | None = None) -> dict[str, dict]:
    """Per-dataset metrics of one run (`target`: the no-spec run, same T;
    `max_tokens`: the cap, for runs that did not record a finish reason)."""
    out = {}
    tgt = {r["id"]: r for r in (target or {}).get("results", [])}
    for group, counters in run["group_counters"].items():
        res = [r for r in run["results"] if r["group"] == group]
        ntok = [len(r["token_ids"]) if "token_ids" in r else r["n_tokens"] for r in res]
        timed = [(n, r["latency"]) for n, r in zip(ntok, res) if r.get("latency")]
        tpot = [l / max(n, 1) * 1000 for n, l in timed]
        tok_s = [n / l for n, l in timed]
        # Throughput over the group's wall time; per-request latencies overlap
        # when several requests run at once, so their sum would undercount it.
        wall = run.get("group_elapsed", {}).get(group) or sum(l for _, l in timed)
        drafts = counters.get("vllm:spec_decode_num_drafts", 0)
        per_pos = counters.get("vllm:spec_decode_num_accepted_tokens_per_pos", [])
        m = {
            "n": len(res), "tokens": sum(ntok), "time_s": wall,
            "tok_s": sum(ntok) / wall if wall else float("nan"),
            "tok_s_q": _quantiles(tok_s), "tpot_ms_q": _quantiles(tpot),
            **acceptance(counters),
            "spec_steps": drafts,
            "accepted_tokens": counters.get("vllm:spec_decode_num_accepted_tokens", 0),
            "acceptance_per_position": [a / drafts for a in per_pos] if drafts else [],
            "output_tokens_mean": sum(ntok) / len(ntok) if ntok else float("nan"),
            "capped": (sum(_capped(r, max_tokens) for r in res) / len(res)
                       if res else float("nan")),
            **divergence_metrics(res, tgt),
        }
        correct = []
        if group in ("gsm8k", "humaneval"):
            for r in res:
                it = items[r["id"]]
                if group == "gsm8k":
                    correct.append(float(scoring.gsm8k_correct(r["text"], it.reference)))
                else:
                    key = (r["id"], r["text"])
                    if key not in sandbox_cache:
                        sandbox_cache[key] = scoring.humaneval_passes(it.reference, r["text"])
                    correct.append(float(sandbox_cache[key]))
            m["correct_by_id"] = {r["id"]: c for r, c in zip(res, correct)}
            m["accuracy"] = sum(correct) / len(correct)
            m["accuracy_ci"] = scoring.bootstrap_ci(correct)
        agree, same_answer = [], []
        for r in res:
            t = tgt.get(r["id"])
            if t is None:
                continue
            a = r.get("token_ids") or r["text"].split()
            b = t.get("token_ids") or t["text"].split()
            agree.append(scoring.lcs_ratio(a, b))
            if group == "gsm8k":
                same_answer.append(float(scoring.gsm8k_extract(r["text"])
                                         == scoring.gsm8k_extract(t["text"])))
        if agree:
            m["agreement_lcs"] = sum(agree) / len(agree)
            m["agreement_lcs_ci"] = scoring.bootstrap_ci(agree)
            m["exact_match"] = sum(float(x == 1.0) for x in agree) / len(agree)
        if same_answer:
            k = int(sum(same_answer))
            m["answer_agreement"] = k / len(same_answer)
            m["answer_agreement_ci"] = scoring.bootstrap_ci(same_answer)
            m["answer_agreement_k"] = k
            m["answer_agreement_exact_ci"] = scoring.exact_ci(k, len(same_answer))
            m["answer_disagree"] = [r["id"] for r, x in zip(
                [r for r in res if r["id"] in tgt], same_answer) if not x]
        out[group] = m
    return out


def add_relative(metrics: dict, base: dict) -> None:
    """Speed-up and retention against the no-spec run (same dataset, same T)."""
    for group, m in metrics.items():
        b = base.get(group)
        if not b:
            continue
        m["speedup"] = m["tok_s"] / b["tok_s"] if b["tok_s"] else None
        if "correct_by_id" in m and "correct_by_id" in b:
            mine, theirs = scoring.aligned(m["correct_by_id"], b["correct_by_id"])
            m["paired"] = scoring.paired(m["correct_by_id"], b["correct_by_id"])
            if sum(theirs) > 0:
                m["retention"] = sum(mine) / sum(theirs)
                m["retention_ci"] = scoring.ratio_ci(mine, theirs)
