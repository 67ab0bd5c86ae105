"""Does a judge head tell the partings that changed an answer from those that kept it?

    python benchmarks/judge_partings.py RUN_DIR --head HEAD.json --mode MODE[,MODE...]
        [--out PREFIX]

The frontier's point 6 asked this of the margin and of the target's
confidence at the first token where a loose output parts from the target's:
separation 0.40-0.53, where 0.5 is a coin. This asks it of a judge head. For
every GSM8K output of MODE (a run_bench.py mode in RUN_DIR, greedy) that parts
from the target's, the target (transformers, fp32) reads the prompt as
LLM.chat renders it, the common prefix and MODE's token there, and the head
scores that token as serving would: ``h_pre`` the state whose logits verify
it, ``h_post`` the state at the token itself, the scalars from those logits
(one function, ``fly_vllm.judge.features``). Separation is P(the score of a
parting that changed the answer > the score of one that kept it), ties half,
with a bootstrap interval over partings.

Under a judge mode every first parting is a mismatch the judge let through
(strict SD reproduces the target token for token in fp32 on this pair), so
the question is whether the score still ranks harm among what it accepted;
under another gate's mode, whether the judge would have told that gate's
partings apart. Writes PREFIX.json (every parting) and PREFIX.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from fly_vllm.bench import datasets as ds
from fly_vllm.bench.parting import harness_raws, separation
from fly_vllm.bench.scoring import first_difference
from fly_vllm.judge.features import assemble, components
from fly_vllm.judge.head import JudgeHead

_spec = importlib.util.spec_from_file_location(
    "explain_divergence", Path(__file__).with_name("explain_divergence.py"))
explain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(explain)


def separation_ci(changed: list[float], kept: list[float], n_boot: int = 2000,
                  seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval (95%) of ``separation``, resampling the
    changed and the kept partings separately."""
    if not changed or not kept:
        return None
    rng = np.random.default_rng(seed)
    c, k = np.asarray(changed), np.asarray(kept)
    vals = []
    for _ in range(n_boot):
        cc = rng.choice(c, c.size)[:, None]
        kk = rng.choice(k, k.size)[None, :]
        vals.append(float(((cc > kk) + 0.5 * (cc == kk)).mean()))
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]


def _hidden_at(lm, prompt: list[int], base: list[int], spots: list[tuple[int, int]]):
    """For one item's partings ``spots`` [(position i, mode token t)] in the
    target's output ``base``: per spot, the target's final hidden states
    [2, H] (at the prefix's last token, and at t placed at i) and its logits
    [1, V] at the prefix's last token. One pass over the prompt and the
    output up to the last spot, then one token per spot on the same cache,
    cut back to the spot: the spots run from the last to the first, so each
    cut only drops what the one before it read (no copy of the cache)."""
    import torch

    ids = prompt + base[:max(i for i, _ in spots)]
    res: dict[int, tuple] = {}
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
        hs, cache = out.last_hidden_state[0], out.past_key_values
        for n in sorted(range(len(spots)), key=lambda n: -spots[n][0]):
            i, t = spots[n]
            at = len(prompt) + i  # the spot's position; hs[at - 1] verifies t
            # Drop what lies past the spot: a negative count, as transformers
            # 4.x and 5.x both read it (a positive length is deprecated in 5).
            drop = cache.get_seq_length() - at
            if drop > 0:
                cache.crop(-drop)
            post = lm.model(input_ids=torch.tensor([[t]]), past_key_values=cache,
                            use_cache=True).last_hidden_state[0, -1]
            pre = hs[at - 1]
            res[n] = (torch.stack([pre, post]).float(), lm.lm_head(pre[None]).float())
    return [res[n] for n in range(len(spots))]


def check_cache(lm, prompt: list[int], base: list[int], spot: tuple[int, int]) -> float:
    """Largest relative difference between the cached path's states and a
    pass over prompt + prefix + token from scratch (float32: about 1e-6)."""
    import torch

    i, t = spot
    (two, _), = _hidden_at(lm, prompt, base, [spot])
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([prompt + base[:i] + [t]])).last_hidden_state[0, -2:]
    return float(max((two[j] - ref[j]).norm() / ref[j].norm() for j in range(2)))


def score_partings(lm, tok, head: JudgeHead, items: dict, todo: dict[str, list[tuple]],
                   n_check: int = 2) -> tuple[dict[str, list[dict]], float | None]:
    """Per mode, one row per parting (item id, position, target and mode
    tokens, the head's p(important), whether the answer changed); and the
    cache check's largest difference over ``n_check`` partings."""
    import torch

    by_item: dict[str, dict[tuple[int, int], list]] = {}
    for mode, rows in todo.items():
        for rid, i, base, other in rows:
            by_item.setdefault(rid, {}).setdefault((i, other["token_ids"][i]), []).append(
                (mode, base, other))
    out: dict[str, list[dict]] = {mode: [] for mode in todo}
    worst, t0 = None, time.monotonic()
    for n, (rid, spots) in enumerate(sorted(by_item.items()), 1):
        base = next(iter(spots.values()))[0][1]["token_ids"]
        prompt = explain._query(tok, items[rid], [])
        keys = sorted(spots)
        if n <= n_check:
            d = check_cache(lm, prompt, base, keys[0])
            worst = d if worst is None else max(worst, d)
        for (i, t), (hidden, logits) in zip(keys, _hidden_at(lm, prompt, base, keys)):
            parts = components(hidden, torch.tensor([0]), logits, torch.tensor([t]),
                               names=head.features)
            x = assemble({k: v.numpy() for k, v in parts.items()}, head.features)
            p = float(head.score_numpy(x)[0])
            for mode, b, other in spots[(i, t)]:
                out[mode].append({"id": rid, "position": i, "target_token": b["token_ids"][i],
                                  "mode_token": t, "p_important": p,
                                  **explain._outcome(items[rid], b, other)})
        if n % 10 == 0 or n == len(by_item):
            print(f"[judge-partings] {n}/{len(by_item)} items read "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out, worst


def summarise(rows: list[dict]) -> dict:
    scored = [r for r in rows if r.get("answer_changed") is not None]
    ch = [r["p_important"] for r in scored if r["answer_changed"]]
    kp = [r["p_important"] for r in scored if not r["answer_changed"]]
    return {"partings": len(scored), "changed": len(ch),
            "separation": separation(ch, kp), "separation_ci": separation_ci(ch, kp),
            "median_p_changed": float(np.median(ch)) if ch else None,
            "median_p_kept": float(np.median(kp)) if kp else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--head", required=True, help="the judge head file")
    ap.add_argument("--mode", required=True, help="modes, comma-separated")
    ap.add_argument("--out", default=None,
                    help="PREFIX of the .json and .md written (default RUN_DIR/judge-partings)")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    head = JudgeHead.load(args.head)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    res = json.loads((args.run_dir / "results.json").read_text())
    settings, raws = res["settings"], harness_raws(args.run_dir)
    skipped = settings.get("skipped") or {}
    items = {}
    for name, n in settings["items"].items():
        if name == "gsm8k":
            items.update({it.id: it for it in ds.load(name, n, settings.get("data"),
                                                      skipped.get(name, skipped.get("*", 0)))})
    lm = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    lm.eval()
    tok = AutoTokenizer.from_pretrained(settings["model"])
    out = {"run_dir": str(args.run_dir), "head": args.head, "model": settings["model"],
           "features": list(head.features), "modes": {}}
    todo = {}
    for mode in modes:
        base, other = explain._runs(args.run_dir, raws, mode, None)
        rows = [(rid, first_difference(b["token_ids"], other[rid]["token_ids"]), b, other[rid])
                for rid, b in base.items() if rid in items and rid in other
                and other[rid]["token_ids"] != b["token_ids"]]
        todo[mode] = [r for r in rows if r[1] is not None]  # not one a prefix of the other
        print(f"[judge-partings] {mode}: {len(todo[mode])} partings", file=sys.stderr,
              flush=True)
    rows_of, out["cache_check_max_rel_diff"] = score_partings(lm, tok, head, items, todo)
    for mode, rows in rows_of.items():
        out["modes"][mode] = {**summarise(rows), "rows": rows}
    prefix = Path(args.out) if args.out else args.run_dir / "judge-partings"
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# The judge's score at the first parting ({args.run_dir.name})", "",
             f"Head `{args.head}` ({'+'.join(head.features)}), target `{settings['model']}` "
             "in fp32 (transformers). Separation: P(p(important) of a parting that changed "
             "the GSM8K answer > that of one that kept it), 0.5 = chance; 95% bootstrap "
             "interval. Cached states checked against a pass from scratch: largest "
             f"relative difference {out['cache_check_max_rel_diff'] or 0:.1e}.", "",
             "| mode | partings | changed | separation [95%] | median p, changed | "
             "median p, kept |", "|---|---|---|---|---|---|"]
    for mode, s in out["modes"].items():
        sep = ("–" if s["separation"] is None else
               f"{s['separation']:.2f} [{s['separation_ci'][0]:.2f}, "
               f"{s['separation_ci'][1]:.2f}]")
        med = lambda v: "–" if v is None else f"{v:.2g}"  # noqa: E731
        lines.append(f"| {mode} | {s['partings']} | {s['changed']} | {sep} | "
                     f"{med(s['median_p_changed'])} | {med(s['median_p_kept'])} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
