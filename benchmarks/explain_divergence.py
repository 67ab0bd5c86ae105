"""Explain where a mode's greedy output differs from the target's own.

    python benchmarks/explain_divergence.py RUN_DIR [--mode strict] [--tie-nats 0.25]

RUN_DIR is a run_bench.py output folder. For every item whose output under
--mode differs from no speculation (same temperature 0, same requests at
once), this finds the first token where they part and asks the target alone,
one sequence, what it makes of that spot: the prompt in the chat template plus
the common prefix, one greedy step with top-5 logprobs. A difference is a
**near-tie** when both tokens are the target's top two there and their
log-probabilities differ by at most --tie-nats: another batch shape or
reduction order can flip such a choice in bf16. Anything else is flagged for
a look. Writes divergence-MODE.md and .json into RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fly_vllm.bench import datasets as ds
from fly_vllm.bench.scoring import classify_divergence, first_difference
from fly_vllm.bench.offline import worker_env


def _runs(run_dir: Path, mode: str, conc: int | None) -> tuple[dict, dict, dict]:
    res = json.loads((run_dir / "results.json").read_text())
    raws = [json.loads(p.read_text()) for p in sorted((run_dir / "raw").glob("*.json"))]
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
    return res, pick("no-spec"), pick(mode)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--mode", default="strict")
    ap.add_argument("--tie-nats", type=float, default=0.25,
                    help="largest log-prob gap called a near-tie (default 0.25: two bf16 "
                    "steps at logits of 16-32)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="requests at once of the runs to compare, where there are several")
    args = ap.parse_args(argv)
    res, base, other = _runs(args.run_dir, args.mode, args.concurrency)
    settings = res["settings"]
    items = {}
    skipped = settings.get("skipped") or {}
    for name, n in settings["items"].items():
        skip = skipped.get(name, skipped.get("*", 0))
        items.update({it.id: it for it in ds.load(name, n, settings.get("data"), skip)})
    todo = []
    for rid, b in base.items():
        o = other.get(rid)
        if o is None or o["token_ids"] == b["token_ids"]:
            continue
        i = first_difference(b["token_ids"], o["token_ids"])
        todo.append((rid, i, b, o))
    print(f"[explain] {len(todo)} of {len(base)} outputs differ from the target's",
          file=sys.stderr, flush=True)
    rows = []
    if todo:
        import os

        os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
        from vllm import LLM, SamplingParams

        engine = {"enforce_eager": True, "max_model_len": 2048, "seed": 0,
                  **settings.get("engine", {}), "max_num_seqs": 1}
        llm = LLM(model=settings["model"], **engine)
        tok = llm.get_tokenizer()
        for rid, i, b, o in todo:
            row = {"id": rid, "position": i}
            if i is None:
                row["kind"] = "same tokens, one output shorter (stopped or cut)"
                rows.append(row)
                continue
            # As LLM.chat does: render the chat template, then tokenize without
            # adding special tokens.
            text = tok.apply_chat_template(items[rid].messages, add_generation_prompt=True,
                                           tokenize=False)
            ids = tok.encode(text, add_special_tokens=False) + b["token_ids"][:i]
            out = llm.generate({"prompt_token_ids": ids},
                               SamplingParams(max_tokens=1, temperature=0, logprobs=5),
                               use_tqdm=False)[0].outputs[0]
            top = sorted(((t, lp.logprob) for t, lp in out.logprobs[0].items()),
                         key=lambda x: -x[1])[:5]
            ours, theirs = b["token_ids"][i], o["token_ids"][i]
            row.update(classify_divergence(top, ours, theirs, args.tie_nats),
                       target_token=tok.decode([ours]), mode_token=tok.decode([theirs]),
                       alone_now=tok.decode([top[0][0]]))
            row["kind"] = "near-tie" if row["near_tie"] else "look"
            rows.append(row)
            print(f"[explain] {rid} @{i}: {row['target_token']!r} vs {row['mode_token']!r} "
                  f"gap {row.get('gap_nats', float('nan')):.3f} -> {row['kind']}",
                  file=sys.stderr, flush=True)
    ties = sum(r["kind"] == "near-tie" for r in rows)
    lines = [f"# Where `{args.mode}` differs from the target alone", "",
             f"- run: `{args.run_dir}`; {len(base)} items, {len(todo)} differ; "
             f"near-tie threshold {args.tie_nats} nats; "
             f"command: `explain_divergence.py {' '.join(sys.argv[1:])}`",
             f"- near-ties: {ties}; other: {len(rows) - ties}", "",
             "| item | first differing token | target's token | mode's token | ranks "
             "(target alone, re-run) | gap nats | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['position']} | {r.get('target_token', '')!r} | "
                     f"{r.get('mode_token', '')!r} | {r.get('rank_target_token')}, "
                     f"{r.get('rank_mode_token')} | {r.get('gap_nats', float('nan')):.3f} | "
                     f"{r['kind']} |")
    (args.run_dir / f"divergence-{args.mode}.md").write_text("\n".join(lines) + "\n")
    (args.run_dir / f"divergence-{args.mode}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
