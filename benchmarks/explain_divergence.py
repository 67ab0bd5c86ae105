"""Explain where a mode's greedy output differs from the target's own.

    python benchmarks/explain_divergence.py RUN_DIR [--mode strict[,MODE...]]
        [--tie-nats 0.25] [--logprobs 20] [--batch 1]

RUN_DIR is a run_bench.py output folder. For every item whose output under
--mode differs from no speculation (same temperature 0, same requests at
once), this finds the first token where they part and asks the target alone
what it makes of that spot: the prompt in the chat template plus the common
prefix, one greedy step with its top --logprobs logprobs (each spot read
once, however many modes part there). A difference is a **near-tie** when
both tokens are the target's top two and their log-probabilities differ by
at most --tie-nats: another batch shape or reduction order can flip such a
choice in bf16. Anything else is flagged for a look. On GSM8K items each
parting also says whether the output's final answer changed and whether the
target's was right, and the report asks whether the gap (how far below the
target's choice the parting token was) or the target's confidence tells the
partings that changed an answer from those that did not
(``fly_vllm.bench.parting.gap_summary``). Writes divergence-MODE.md and
.json into RUN_DIR (MODE's spaces as dashes); with several modes also
divergence-summary.md, .json and divergence-gaps.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

from fly_vllm.bench import datasets as ds
from fly_vllm.bench.offline import Progress, worker_env
from fly_vllm.bench.parting import dash, gap_summary, harness_raws
from fly_vllm.bench.scoring import (classify_divergence, first_difference, gsm8k_correct,
                                    gsm8k_extract)


def _runs(run_dir: Path, raws: list[dict], mode: str, conc: int | None) -> tuple[dict, dict]:
    """The target's outputs and the mode's, by item id, from the folder's
    ``raws`` (parting.harness_raws: unfinished modes too)."""
    concs = sorted({r.get("concurrency", 1) for r in raws})
    if conc is None and len(concs) > 1:
        raise SystemExit(f"{run_dir} holds runs at {concs} requests at once: pick one "
                         "with --concurrency")
    conc = conc or concs[0]
    by = {r["mode"]: r for r in raws
          if r["temperature"] == 0 and r.get("concurrency", 1) == conc}
    if "no-spec" not in by or mode not in by:
        raise SystemExit(f"{run_dir} has no T=0 runs of both no-spec and {mode!r} "
                         f"at {conc} at once")
    pick = lambda name: {x["id"]: x for x in by[name]["run"]["results"]}  # noqa: E731
    return pick("no-spec"), pick(mode)


def _outcome(item, target: dict, other: dict) -> dict:
    """GSM8K: whether the mode's final answer differs from the target's, and
    whether the target's was right; nothing for other datasets."""
    if item.dataset != "gsm8k":
        return {}
    return {"answer_changed": gsm8k_extract(other["text"]) != gsm8k_extract(target["text"]),
            "target_right": gsm8k_correct(target["text"], item.reference)}


def _q(qs) -> str:
    return "–" if not qs else f"{qs[1]:.2f} [{qs[0]:.2f}, {qs[2]:.2f}]"


def _slug(mode: str) -> str:
    """A mode's name in a file name: 'margin 0.1 K4 W2' -> 'margin-0.1-K4-W2'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", mode).strip("-")


def _write(args, mode: str, rows: list[dict], n: int) -> dict:
    """divergence-MODE.md and .json; returns the mode's gap summary."""
    ties = sum(r["kind"] == "near-tie" for r in rows)
    summary = gap_summary(rows)
    lines = [f"# Where `{mode}` differs from the target alone", "",
             f"- run: `{args.run_dir}`; {n} items, {len(rows)} differ; "
             f"near-tie threshold {args.tie_nats} nats; top {args.logprobs} read; "
             f"command: `explain_divergence.py {' '.join(sys.argv[1:])}`",
             f"- near-ties: {ties}; other: {len(rows) - ties}", ""]
    if summary["partings"]:
        g, t = summary["gap"], summary["top_logprob"]
        lines += [f"GSM8K: {summary['changed']} of {summary['partings']} partings changed the "
                  "final answer. Gap (nats), median [quartiles]: changed "
                  f"{_q(g['changed_quartiles'])}, "
                  f"kept {_q(g['kept_quartiles'])}; P(changed gap > kept gap) = "
                  f"{dash(g['separation'], '{:.3f}')}. Target's top log-prob: changed "
                  f"{_q(t['changed_quartiles'])}, kept {_q(t['kept_quartiles'])}; "
                  f"P(changed > kept) = {dash(t['separation'], '{:.3f}')}. 0.5: no separation.", ""]
    lines += ["| item | first differing token | target's token | mode's token | ranks "
              "(target alone, re-run) | gap nats | verdict | answer changed |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['position']} | {r.get('target_token', '')!r} | "
                     f"{r.get('mode_token', '')!r} | {r.get('rank_target_token')}, "
                     f"{r.get('rank_mode_token')} | {r.get('gap_nats', float('nan')):.3f} | "
                     f"{r['kind']} | {dash(r.get('answer_changed'), '{}')} |")
    (args.run_dir / f"divergence-{_slug(mode)}.md").write_text("\n".join(lines) + "\n")
    (args.run_dir / f"divergence-{_slug(mode)}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines[:6]))
    return summary


def _write_summary(args, summaries: dict[str, dict], rows: dict[str, list[dict]]) -> None:
    """divergence-summary.md/.json, and divergence-gaps.png: the gap of each
    mode's partings, those that changed the answer beside those that kept it."""
    lines = [f"# Does the gap at a parting tell harmful from harmless? (`{args.run_dir}`)", "",
             "Per mode, its GSM8K outputs that part from the target's, read at the first "
             "parting token: gap = log p(target's token) - log p(mode's token) there, in nats "
             f"(none when the mode's token is below the target's top {args.logprobs}); "
             "separation = P(a parting that changed the answer has the larger value than one "
             "that kept it), 0.5 for none.", "",
             "| mode | partings | answer changed | gap, changed: median [quartiles] | "
             "gap, kept | separation by gap | target's top log-prob, changed | kept | "
             "separation by it | beyond top |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summaries.items():
        g, t = s["gap"], s["top_logprob"]
        lines.append(f"| {mode} | {s['partings']} | {s['changed']} | "
                     f"{_q(g['changed_quartiles'])} | {_q(g['kept_quartiles'])} | "
                     f"{dash(g['separation'], '{:.3f}')} | {_q(t['changed_quartiles'])} | "
                     f"{_q(t['kept_quartiles'])} | {dash(t['separation'], '{:.3f}')} | "
                     f"{s['beyond_top']} |")
    lines += ["", f"command: `explain_divergence.py {' '.join(sys.argv[1:])}`"]
    (args.run_dir / "divergence-summary.md").write_text("\n".join(lines) + "\n")
    (args.run_dir / "divergence-summary.json").write_text(json.dumps(summaries, indent=1))
    print("\n".join(lines))
    _plot(args.run_dir, rows)


def _plot(run_dir: Path, rows: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    for y, (mode, rs) in enumerate(rows.items()):
        for changed, dy, color in ((False, -0.12, "tab:blue"), (True, 0.12, "tab:red")):
            xs = [r["gap_nats"] for r in rs
                  if r.get("answer_changed") is changed and r.get("gap_nats") is not None]
            ax.scatter(xs, [y + dy] * len(xs), s=9, alpha=0.5, color=color,
                       label=("answer changed" if changed else "answer kept") if y == 0
                       else None)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    ax.set_xlabel("gap at the first parting: log p(target's token) - log p(mode's token), nats")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Partings that changed the answer (red) and kept it (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "divergence-gaps.png", dpi=110)
    plt.close(fig)


def _query(tok, item, prefix: list[int]) -> list[int]:
    """The target's input at a parting: the prompt as LLM.chat renders it
    (chat template, then tokenized without special tokens) plus the common
    prefix."""
    text = tok.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False) + prefix


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--mode", default="strict",
                    help="the mode to explain, or several, comma-separated (one engine)")
    ap.add_argument("--tie-nats", type=float, default=0.25,
                    help="largest log-prob gap called a near-tie (default 0.25: two bf16 "
                    "steps at logits of 16-32)")
    ap.add_argument("--logprobs", type=int, default=20,
                    help="how many of the target's top tokens to read at each parting "
                    "(default 20, vLLM's most); a mode's token below them has no gap")
    ap.add_argument("--batch", type=int, default=1,
                    help="partings the target reads at once (default 1: the target "
                    "alone, one sequence, as in a run without speculation)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="requests at once of the runs to compare, where there are several")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    res = json.loads((args.run_dir / "results.json").read_text())
    raws = harness_raws(args.run_dir)
    runs = {m: _runs(args.run_dir, raws, m, args.concurrency) for m in modes}
    settings = res["settings"]
    items = {}
    skipped = settings.get("skipped") or {}
    for name, n in settings["items"].items():
        skip = skipped.get(name, skipped.get("*", 0))
        items.update({it.id: it for it in ds.load(name, n, settings.get("data"), skip)})
    todo = {}
    for mode, (base, other) in runs.items():
        todo[mode] = [(rid, first_difference(b["token_ids"], other[rid]["token_ids"]), b,
                       other[rid])
                      for rid, b in base.items()
                      if rid in other and other[rid]["token_ids"] != b["token_ids"]]
        print(f"[explain] {mode}: {len(todo[mode])} of {len(base)} outputs differ from "
              "the target's", file=sys.stderr, flush=True)
    # One read of the target per (item, parting token): the input is the
    # target's own prefix, the same for every mode that parts there.
    spots = sorted({(rid, i) for rows in todo.values() for rid, i, _, _ in rows
                    if i is not None})
    tops = {}
    if spots:
        import os

        os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
        from vllm import LLM, SamplingParams

        engine = {"enforce_eager": True, "max_model_len": 2048, "seed": 0,
                  **settings.get("engine", {}), "max_num_seqs": args.batch,
                  "max_logprobs": max(20, args.logprobs)}
        llm = LLM(model=settings["model"], **engine)
        tok = llm.get_tokenizer()
        base_of = {rid: b for rows in todo.values() for rid, _, b, _ in rows}
        prompts = [{"prompt_token_ids": _query(tok, items[rid], base_of[rid]["token_ids"][:i])}
                   for rid, i in spots]
        print(f"[explain] the target reads {len(spots)} partings", file=sys.stderr,
              flush=True)
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0,
                                                    logprobs=args.logprobs),
                            use_tqdm=functools.partial(Progress, label="partings"))
        for spot, out in zip(spots, outs):
            lps = out.outputs[0].logprobs[0]
            tops[spot] = sorted(((t, lp.logprob) for t, lp in lps.items()),
                                key=lambda x: -x[1])[:args.logprobs]
        decode = lambda t: tok.decode([t])  # noqa: E731
    summaries, rows_of = {}, {}
    for mode, rows_in in todo.items():
        rows = rows_of[mode] = []
        for rid, i, b, o in rows_in:
            row = {"id": rid, "position": i, **_outcome(items[rid], b, o)}
            if i is None:
                row["kind"] = "same tokens, one output shorter (stopped or cut)"
                rows.append(row)
                continue
            top = tops[(rid, i)]
            ours, theirs = b["token_ids"][i], o["token_ids"][i]
            row.update(classify_divergence(top, ours, theirs, args.tie_nats),
                       target_token=decode(ours), mode_token=decode(theirs),
                       alone_now=decode(top[0][0]), target_top_logprob=top[0][1])
            row["kind"] = "near-tie" if row["near_tie"] else "look"
            rows.append(row)
        summaries[mode] = _write(args, mode, rows, len(runs[mode][0]))
    if len(modes) > 1:
        _write_summary(args, summaries, rows_of)
    return 0


if __name__ == "__main__":
    sys.exit(main())
