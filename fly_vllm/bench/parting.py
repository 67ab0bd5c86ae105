"""Why loose outputs change their answers: where each output first parts from
the target's own text, on what kind of token, how often a parted output ends
on another final answer, the loose-accept budget that a gain and an
agreement bar leave (``loose_budget``), and the ceiling of any loose rule at
that bar (``ceiling``).

Reads a harness folder's ``raw/`` (every mode's outputs, the target's as
``no-spec``); GSM8K only, greedy rows only. A final-answer agreement is about
1 - P(part) x P(answer changes | part), so the two shares here say which of
them a loose rule would have to lower.
"""

from __future__ import annotations

import json
from pathlib import Path

BUCKETS = ((0, 32), (32, 128), (128, 10 ** 9))


def token_kind(text: str) -> str:
    """What a token is, for the parting profile: digits, layout (whitespace,
    punctuation, markdown) or a word."""
    t = text.strip()
    if any(c.isdigit() for c in t):
        return "digit"
    if not t or not any(c.isalpha() for c in t):
        return "layout"
    return "word"


def harness_raws(run_dir: Path) -> list[dict]:
    """Every mode's run in a harness folder's ``raw/``, and the modes still
    running in parts as the harness's --cached-only last scored them
    (``raw/unfinished/``), unless they have finished since."""
    raws = [json.loads(p.read_text()) for p in sorted((run_dir / "raw").glob("*.json"))]
    finished = {r["mode"] for r in raws}
    raws += [r for r in (json.loads(p.read_text()) for p in
                         sorted((run_dir / "raw" / "unfinished").glob("*.json")))
             if r["mode"] not in finished]
    return raws


def gsm8k_references(run_dir: Path, ids: set[str]) -> dict[str, str]:
    """Item id -> GSM8K reference answer for ``ids``, from the dataset file
    the run used."""
    from fly_vllm.bench import datasets as ds

    data = None
    res = run_dir / "results.json"
    if res.exists():
        data = json.loads(res.read_text())["settings"].get("data")
    if not ids:
        return {}
    last = max(int(i.rsplit("-", 1)[1]) for i in ids)
    return {it.id: it.reference for it in ds.load("gsm8k", last + 1, data) if it.id in ids}


def divergence_profile(run_dir: Path, tokenizer=None,
                       raws: list[dict] | None = None) -> dict[str, dict]:
    """Per mode (GSM8K, against the target's own outputs in the same folder):
    the share of outputs that part from the target's, the share of those
    whose final answer changes, both by where the output first parts
    (token buckets), and the loose accepts per output. The final-answer
    agreement is about 1 - P(part) x P(answer changes | part). ``by_target``
    splits both by whether the target's own answer was right. ``raws``: the
    folder's ``harness_raws``, where the caller has read them already."""
    from fly_vllm.bench.scoring import first_difference, gsm8k_correct, gsm8k_extract

    raws = harness_raws(run_dir) if raws is None else raws
    by = {r["mode"]: {x["id"]: x for x in r["run"]["results"] if x["group"] == "gsm8k"}
          for r in raws if r["temperature"] == 0}
    refs = gsm8k_references(run_dir, set().union(*by.values()))
    base = by.get("no-spec")
    if not base:
        return {}
    out = {}
    for mode, res in by.items():
        if mode == "no-spec":
            continue
        rows = []
        for rid, r in res.items():
            t = base.get(rid)
            if t is None:
                continue
            a, b = t["token_ids"], r["token_ids"]
            first = None if a == b else first_difference(a, b)
            if a != b and first is None:
                first = min(len(a), len(b))
            changed = gsm8k_extract(r["text"]) != gsm8k_extract(t["text"])
            loose = (r.get("fly_stats") or {}).get("loose_accepted_tokens")
            kind = None
            if tokenizer is not None and first is not None and first < min(len(a), len(b)):
                kind = token_kind(tokenizer.decode([a[first]]))
            right = gsm8k_correct(t["text"], refs[rid]) if rid in refs else None
            rows.append((first, changed, loose, kind, right))
        parted = [x for x in rows if x[0] is not None]
        entry = {"n": len(rows), "parted": len(parted),
                 "answer_changed": sum(x[1] for x in rows),
                 "changed_given_parted": (sum(x[1] for x in parted) / len(parted)
                                          if parted else None), "by_first_parting": []}
        for lo, hi in BUCKETS:
            inb = [x for x in parted if lo <= x[0] < hi]
            entry["by_first_parting"].append(
                {"from": lo, "to": hi if hi < 10 ** 9 else None, "parted": len(inb),
                 "answer_changed": sum(x[1] for x in inb)})
        kinds = {}
        for x in parted:
            if x[3] is not None:
                k = kinds.setdefault(x[3], {"parted": 0, "answer_changed": 0})
                k["parted"] += 1
                k["answer_changed"] += int(x[1])
        if kinds:
            entry["by_target_token"] = kinds
        if all(x[4] is not None for x in rows):
            entry["by_target"] = {
                name: {"n": sum(1 for x in rows if x[4] is ok),
                       "parted": sum(1 for x in parted if x[4] is ok),
                       "answer_changed": sum(1 for x in parted if x[4] is ok and x[1])}
                for name, ok in (("right", True), ("wrong", False))}
        loose = [x[2] for x in rows if x[2] is not None]
        if loose:
            entry["loose_accepts_per_output"] = sum(loose) / len(loose)
            entry["outputs_with_loose_accepts"] = sum(1 for x in loose if x > 0)
        out[mode] = entry
    return out


def loose_budget(tokens: float, strict_len: float, length: float, loose: float,
                 parted: float, changed: float, gain: float = 1.10,
                 agreement: float = 0.97) -> dict | None:
    """What a point's own rates say the bar needs, per output (GSM8K).

    tokens: mean output tokens; strict_len, length: mean accepted length of
    strict SD and of the point at the same K; loose: loose accepts per output;
    parted: share of outputs that part from the target's; changed: share of
    parted outputs whose answer changes. A loose accept saves
    ``tokens * (1 - strict_len / length) / loose`` tokens' worth of steps, so
    ``gain`` needs ``tokens * (1 - 1 / gain)`` of them; ``agreement`` allows
    ``(1 - agreement) / changed`` of outputs to part, at the point's loose
    accepts per parted output. Both extrapolate the point's own rates (a
    linear model, not a measurement); None where the point gains nothing or
    never parts."""
    if not (loose > 0 and parted > 0 and changed > 0 and length > strict_len):
        return None
    per_accept = tokens * (1 - strict_len / length) / loose
    needed = tokens * (1 - 1 / gain) / per_accept
    share = min(1.0, (1 - agreement) / changed)
    allowed = share * loose / parted
    saved = min(allowed * per_accept / tokens, 0.999)
    return {"tokens_per_loose_accept": per_accept,
            "loose_accepts_needed": needed,
            "parted_share_allowed": share,
            "loose_accepts_allowed": allowed,
            "gain_at_allowed": 1 / (1 - saved),
            "required_gain": gain, "required_agreement": agreement}


def ceiling(outputs: list[tuple[int, int]], k: int, changed: float, gain: float = 1.10,
            agreement: float = 0.97) -> dict | None:
    """The most any loose rule could gain over strict SD at ``k`` while
    keeping ``agreement``, if a parted output changes its answer with
    probability ``changed`` (GSM8K).

    outputs: (tokens, verification steps) of each output under strict SD at
    ``k``. The case most favourable to a loose rule: it loosens only the
    outputs where that saves most steps, accepts every draft in them (k + 1
    tokens a step, so ceil(tokens / (k + 1)) steps) and leaves their length
    unchanged; every loosened output parts from the target's text. The
    agreement then lets a share ``(1 - agreement) / changed`` of the outputs
    be loosened (interpolated between whole outputs). Returns the strict mean
    accepted length (tokens / steps), the gain with every output loosened
    (``gain_all``: no rule at ``k`` can pass it), the gain at the share the
    agreement allows (``gain_at_bar``), the share ``gain`` needs
    (``share_needed``, None if even ``gain_all`` falls short) and the
    largest ``changed`` that share could afford (``changed_allowed``). None
    without outputs."""
    outputs = [(t, s) for t, s in outputs if s > 0]
    if not outputs:
        return None
    steps = sum(s for _, s in outputs)
    tokens = sum(t for t, _ in outputs)
    saved = sorted((s - -(-t // (k + 1)) for t, s in outputs), reverse=True)
    n = len(saved)
    cum = [0.0]
    for x in saved:
        cum.append(cum[-1] + max(x, 0))

    def saved_at(share: float) -> float:  # steps saved loosening share * n outputs
        m = min(max(share, 0.0), 1.0) * n
        i = int(m)
        return cum[i] + (m - i) * (cum[i + 1] - cum[i] if i < n else 0.0)

    share = 1.0 if changed <= 0 else min(1.0, (1 - agreement) / changed)
    need_saved = steps * (1 - 1 / gain)
    share_needed = None
    if need_saved <= 0:  # a gain of 1.0 or less: strict already has it
        share_needed = 0.0
    elif cum[-1] >= need_saved:
        i = next(j for j in range(1, n + 1) if cum[j] >= need_saved)
        share_needed = (i - 1 + (need_saved - cum[i - 1]) / (cum[i] - cum[i - 1])) / n
    return {"K": k, "outputs": n, "strict_length": tokens / steps,
            "gain_all": steps / (steps - cum[-1]),
            "changed": changed, "share_allowed": share,
            "gain_at_bar": steps / (steps - saved_at(share)),
            "share_needed": share_needed,
            "changed_allowed": (None if share_needed is None else 1.0 if share_needed == 0
                                else min(1.0, (1 - agreement) / share_needed)),
            "required_gain": gain, "required_agreement": agreement}


def ceiling_table(ceilings: dict[str, dict]) -> list[str]:
    if not ceilings:
        return []
    c0 = next(iter(ceilings.values()))
    lines = [f"The ceiling of any loose rule (GSM8K; strict SD's own outputs): the most "
             "favourable case, where a rule loosens only the outputs where that saves most "
             "and accepts every draft in them, each loosened output parting from the "
             "target's text. The gain with every output loosened; the share of outputs "
             f"{c0['required_gain']:.2f}x needs loosened and the answer-change rate a parted "
             f"output may then have for {c0['required_agreement']} agreement; and the gain "
             "at the lowest answer-change rate measured here.", "",
             "| strict point | mean acc. len | gain, all loosened | outputs "
             f"{c0['required_gain']:.2f}x needs loosened | answer-change rate that allows | "
             "lowest measured rate | outputs it lets part | gain at that |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, c in ceilings.items():
        lines.append(f"| {mode} | {c['strict_length']:.2f} | {c['gain_all']:.3f}x | "
                     f"{dash(c['share_needed'], '{:.0%}')} | "
                     f"{dash(c['changed_allowed'], '{:.1%}')} | {c['changed']:.0%} | "
                     f"{c['share_allowed']:.0%} | {c['gain_at_bar']:.3f}x |")
    return lines + [""]


def budget_table(budgets: dict[str, dict], order: list[str] | None = None) -> list[str]:
    if not budgets:
        return []
    lines = ["What the bar needs, from each point's own rates (GSM8K, a linear "
             "extrapolation): the tokens of steps one loose accept saves, the loose "
             "accepts per output the gain needs, the share of outputs the agreement lets "
             "part and the loose accepts that allows, and the gain they would give.", "",
             "| point | tokens saved per loose accept | loose accepts needed for "
             f"{next(iter(budgets.values()))['required_gain']:.2f}x | outputs allowed to part | "
             "loose accepts allowed | gain at that |", "|---|---|---|---|---|---|"]
    for mode, b in in_order(budgets, order):
        lines.append(f"| {mode} | {b['tokens_per_loose_accept']:.1f} | "
                     f"{b['loose_accepts_needed']:.1f} | {b['parted_share_allowed']:.0%} | "
                     f"{b['loose_accepts_allowed']:.2f} | {b['gain_at_allowed']:.3f}x |")
    return lines + [""]


def in_order(d: dict, order: list[str] | None) -> list:
    """The items of ``d``, the keys in ``order`` first."""
    return [(k, d[k]) for k in order or [] if k in d] + [
        (k, v) for k, v in d.items() if k not in (order or [])]


def profile_table(profiles: dict[str, dict], set_name: str,
                  order: list[str] | None = None) -> list[str]:
    lines = [f"Where outputs part from the target's ({set_name}, GSM8K): parted = outputs "
             "not identical to the target's; changed = final answer differs; by the "
             "token where the output first parts, and by whether the target's own answer "
             "was right.", "",
             "| point | loose accepts / output | parted | changed | changed if parted | "
             "parted at 0-31 (changed) | 32-127 | 128+ | on a word / layout / digit "
             "(changed) | target right: parted (changed) | target wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, e in in_order(profiles, order):
        b = e["by_first_parting"]
        kinds = e.get("by_target_token", {})
        on = " / ".join(f"{kinds[k]['parted']} ({kinds[k]['answer_changed']})"
                        if k in kinds else "0" for k in ("word", "layout", "digit"))
        lines.append(
            f"| {mode} | {dash(e.get('loose_accepts_per_output'))} | {e['parted']}/{e['n']} | "
            f"{e['answer_changed']} | {dash(e['changed_given_parted'], '{:.0%}')} | "
            + " | ".join(f"{x['parted']} ({x['answer_changed']})" for x in b)
            + f" | {on if kinds else '–'} | "
            + " | ".join(f"{t['parted']}/{t['n']} ({t['answer_changed']})"
                         for t in e.get("by_target", {}).values())
            + (" |" if "by_target" in e else "– | – |"))
    return lines + [""]


def dash(x, fmt="{:.2f}") -> str:
    """``fmt`` of ``x``, or a dash for a missing figure."""
    return "–" if x is None else fmt.format(x)


def separation(changed: list[float], kept: list[float]) -> float | None:
    """The chance that a parting which changed the answer has a larger value
    than one which kept it (ties count half): the area under the ROC curve
    of the value as a test for harm. 0.5: the value tells them apart no
    better than a coin; 1: every harmful parting is above every harmless one.
    None without both kinds."""
    if not changed or not kept:
        return None
    wins = sum((c > k) + 0.5 * (c == k) for c in changed for k in kept)
    return wins / (len(changed) * len(kept))


def _quartiles(xs: list[float]) -> list[float] | None:
    if not xs:
        return None
    s = sorted(xs)
    at = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return [at(0.25), at(0.5), at(0.75)]


def gap_summary(rows: list[dict]) -> dict:
    """Per mode's partings (explain_divergence.py rows with ``gap_nats`` and
    ``answer_changed``): how far below the target's choice the parting token
    was, for the partings that changed the final answer and for those that
    kept it, and how well the gap, or the target's confidence, separates
    them. A gate that reads the gap (or the confidence) at a mismatch can only
    keep answers if the harmful partings sit apart from the harmless ones."""
    scored = [r for r in rows if r.get("answer_changed") is not None]
    out: dict = {"partings": len(scored),
                 "changed": sum(1 for r in scored if r["answer_changed"]),
                 "beyond_top": sum(1 for r in scored if r.get("gap_nats") is None)}
    for key, name in (("gap_nats", "gap"), ("target_top_logprob", "top_logprob")):
        ch = [r[key] for r in scored if r["answer_changed"] and r.get(key) is not None]
        kp = [r[key] for r in scored if not r["answer_changed"] and r.get(key) is not None]
        out[name] = {"changed_quartiles": _quartiles(ch), "kept_quartiles": _quartiles(kp),
                     "separation": separation(ch, kp)}
    return out
