"""``fly-vllm judge mine``: label mismatches of a pair by what they do to the
answer, with no human labels (AutoJudge's mining, one swap at a time).

For each item of a task with an answer checker (GSM8K: the final number):

1. The target answers greedily. It runs under *strict* speculative decoding
   with the user's drafter at K, which gives the target's own greedy text,
   and the verifier's recorder (``judge/record.py``) writes every first
   mismatch of a step: a position where the drafter's greedy token, given the
   target's text so far, differs from the target's, with the judge features
   the serving path computes there (the same function, the same pass).
2. Up to ``--per-answer`` of those positions per answer, drawn at random
   (seeded), are *swapped*: the target's text up to the position, the
   drafter's token in place of the target's, and the target continues
   greedily to the same total budget of new tokens.
3. Label: *important* (1) when the swapped answer's final answer differs from
   the target's own answer (the reference is the target, not the gold
   answer), else 0.

Items run in chunks of ``--chunk``; each finished chunk is kept under
``OUT/chunks/``, so a stopped run resumes where it stopped. At the end (and
after each chunk) ``OUT/dataset.npz`` and ``OUT/meta.json`` hold every label
with its features, the input of ``fly-vllm judge train``.

Each label costs one target continuation of up to ``--max-tokens`` tokens
(on average about half an answer), so mining costs about ``per_answer / 2``
answers of generation per item; ``meta.json`` records the seconds per
thousand labels measured on the machine that ran it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fly_vllm.judge import record, run_command
from fly_vllm.judge.features import COMPONENTS

TASKS = ("gsm8k",)
# The frontier's calibration (0-99) and evaluation (1000-1499) GSM8K items.
RESERVED_GSM8K = ((0, 100), (1000, 1500))


class MineError(RuntimeError):
    """A bad request to mine; the message is for the user as it is."""


def _log(msg: str) -> None:
    print(f"[fly-vllm judge mine] {msg}", file=sys.stderr, flush=True)


def answer_of(task: str, text: str) -> str | None:
    from fly_vllm.bench.scoring import gsm8k_extract

    return gsm8k_extract(text)


def item_index(item_id: str) -> int:
    """'gsm8k-123' -> 123."""
    return int(str(item_id).rsplit("-", 1)[-1])


def reserved_overlap(task: str, indices: list[int]) -> list[int]:
    if task != "gsm8k":
        return []
    return [i for i in indices if any(a <= i < b for a, b in RESERVED_GSM8K)]


def choose_swaps(records: dict[str, np.ndarray], rows: list[int], out_ids: list[int],
                 per_answer: int, rng: random.Random) -> tuple[list[int], int, int]:
    """Which of one answer's recorded mismatches to swap: rows of
    ``records`` inside the answer (pos < its length), one per position,
    ``per_answer`` at most, drawn with ``rng``. Returns (rows, the answer's
    mismatches, how many of them disagree with the answer's own token, which
    should be 0 under strict verification)."""
    seen: dict[int, int] = {}
    for r in rows:
        p = int(records["pos"][r])
        if p < len(out_ids) and p not in seen:
            seen[p] = r
    off = sum(1 for p, r in seen.items() if int(records["target"][r]) != out_ids[p])
    good = [r for p, r in sorted(seen.items()) if int(records["target"][r]) == out_ids[p]
            and int(records["draft"][r]) != out_ids[p]]
    chosen = sorted(rng.sample(good, min(per_answer, len(good))))
    return chosen, len(seen), off


def build_llm(args):
    from vllm import LLM

    spec = {"method": "fly", "model": args.drafter, "num_speculative_tokens": args.k,
            "fly": {"strict": True}}
    engine = {"dtype": args.dtype, "max_model_len": args.max_model_len, "seed": 0,
              "max_num_seqs": args.concurrency, "enable_prefix_caching": True,
              **json.loads(args.engine)}
    return LLM(model=args.model, speculative_config=spec, **engine)


def mine_chunk(llm, items, args, rec_dir: Path, rng: random.Random) -> dict[str, Any]:
    """Steps 1-3 for one chunk of items; returns its arrays and per-item log."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from fly_vllm.metrics import _external_id

    shutil.rmtree(rec_dir, ignore_errors=True)
    rec_dir.mkdir(parents=True)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    _log(f"answering {len(items)} items ({items[0].id}..{items[-1].id}) under strict SD")
    outs = llm.chat([it.messages for it in items], greedy, use_tqdm=args.progress)
    t_answer = time.perf_counter() - t0
    (rec_dir / record.PAUSE_FILE).touch()
    recs = record.read(rec_dir)
    by_req: dict[str, list[int]] = {}
    for r, rid in enumerate(recs.get("req_id", [])):
        by_req.setdefault(_external_id(str(rid)), []).append(r)

    swaps, log = [], []
    for it, o in zip(items, outs):
        out_ids = list(o.outputs[0].token_ids)
        text = o.outputs[0].text
        rows, n_mis, off = choose_swaps(recs, by_req.get(o.request_id, []), out_ids,
                                        args.per_answer, rng) if recs else ([], 0, 0)
        ref = answer_of(args.task, text)
        log.append({"item": it.id, "tokens": len(out_ids), "mismatches": n_mis,
                    "target_token_disagrees": off, "swapped": len(rows), "answer": ref,
                    "correct": ref is not None and ref == str(it.reference),
                    "capped": o.outputs[0].finish_reason == "length",
                    "prompt_token_ids": list(o.prompt_token_ids), "token_ids": out_ids})
        for r in rows:
            swaps.append((it, o, out_ids, ref, r))

    t1 = time.perf_counter()
    prompts, params = [], []
    for it, o, out_ids, ref, r in swaps:
        p = int(recs["pos"][r])
        ids = list(o.prompt_token_ids) + out_ids[:p] + [int(recs["draft"][r])]
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        params.append(SamplingParams(temperature=0, max_tokens=max(1, args.max_tokens - p - 1)))
    _log(f"continuing {len(prompts)} swapped answers")
    conts = llm.generate(prompts, params, use_tqdm=args.progress) if prompts else []
    t_swap = time.perf_counter() - t1
    tok = llm.get_tokenizer()
    important, new_answers, cont_tokens = [], [], 0
    for (it, o, out_ids, ref, r), c in zip(swaps, conts):
        p = int(recs["pos"][r])
        ids = out_ids[:p] + [int(recs["draft"][r])] + list(c.outputs[0].token_ids)
        cont_tokens += len(c.outputs[0].token_ids)
        new = answer_of(args.task, tok.decode(ids, skip_special_tokens=True))
        new_answers.append(new)
        important.append(int(new != ref))
    take = [s[4] for s in swaps]
    arrays = {name: recs[name][take] for name in COMPONENTS if name in recs} if take else {}
    arrays.update(
        item=np.array([item_index(s[0].id) for s in swaps], dtype=np.int64),
        pos=np.array([int(recs["pos"][s[4]]) for s in swaps], dtype=np.int64),
        draft=np.array([int(recs["draft"][s[4]]) for s in swaps], dtype=np.int64),
        target=np.array([int(recs["target"][s[4]]) for s in swaps], dtype=np.int64),
        important=np.array(important, dtype=np.int8),
    )
    return {"arrays": arrays, "items": log, "answers": new_answers,
            "seconds": {"answer": t_answer, "swap": t_swap},
            "tokens": {"answer": sum(x["tokens"] for x in log), "swap": cont_tokens}}


def combine(out: Path) -> dict[str, np.ndarray]:
    """Every finished chunk's arrays, concatenated."""
    files = sorted((out / "chunks").glob("chunk-*.npz"))
    loaded = [dict(np.load(f)) for f in files]
    loaded = [d for d in loaded if d and d.get("item") is not None and len(d["item"])]
    if not loaded:
        return {}
    return {k: np.concatenate([d[k] for d in loaded]) for k in loaded[0]}


def machine() -> dict:
    """Where the figures come from: platform, cores, the CPU's model and the
    flags that decide its fp32/bf16 speed."""
    info = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and "cpu" not in info:
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                             if f in have]
            break
    return info


def write_dataset(out: Path, args, pair: dict, started: str) -> dict:
    data = combine(out)
    logs = [json.loads(f.read_text()) for f in sorted((out / "chunks").glob("chunk-*.json"))]
    items = [x for lg in logs for x in lg["items"]]
    secs = {k: sum(lg["seconds"][k] for lg in logs) for k in ("answer", "swap")}
    toks = {k: sum(lg["tokens"][k] for lg in logs) for k in ("answer", "swap")}
    n = int(len(data.get("item", [])))
    if data:
        np.savez(out / "dataset.npz", **data)
    meta = {
        "pair": pair, "task": args.task, "k": args.k, "dtype": args.dtype,
        "max_tokens": args.max_tokens, "per_answer": args.per_answer, "seed": args.seed,
        "items": [x["item"] for x in items], "n_items": len(items), "labels": n,
        "important": int(data["important"].sum()) if n else 0,
        "mismatches_recorded": sum(x["mismatches"] for x in items),
        "target_token_disagrees": sum(x["target_token_disagrees"] for x in items),
        "target_accuracy": (sum(x["correct"] for x in items) / len(items)) if items else None,
        "capped": sum(x["capped"] for x in items),
        "seconds": secs, "tokens": toks,
        "seconds_per_1000_labels": (1000 * (secs["answer"] + secs["swap"]) / n) if n else None,
        "machine": machine(),
        "started": started, "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "fly-vllm judge mine " + " ".join(args.argv),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fly-vllm judge mine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the target (a vLLM model name or path)")
    ap.add_argument("--drafter", required=True, help="the draft model (name or path)")
    ap.add_argument("--out", required=True, help="the mining folder (resumed if it exists)")
    ap.add_argument("--task", default="gsm8k", choices=TASKS)
    ap.add_argument("--data", default=None, help="the task's data file (GSM8K-train jsonl)")
    ap.add_argument("--skip", type=int, default=100,
                    help="items skipped first (default 100: the frontier calibrates on 0-99)")
    ap.add_argument("--limit", type=int, default=100, help="items to mine (default 100)")
    ap.add_argument("--per-answer", type=int, default=8,
                    help="mismatches swapped per answer (default 8)")
    ap.add_argument("--k", type=int, default=4, help="K of the strict run that records (4)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="float32",
                    help="float32 by default: in bf16 a target can disagree with itself")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--concurrency", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=10, help="items per cached chunk (10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="{}", help="more LLM(...) arguments, as JSON")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars (the per-chunk lines stay)")
    ap.add_argument("--allow-reserved", action="store_true",
                    help="mine GSM8K items 0-99 or 1000-1499 (the frontier's own sets)")
    return ap


def run(args) -> int:
    from fly_vllm.bench import datasets as ds

    out = Path(args.out)
    try:
        items = ds.load(args.task, args.limit, args.data, skip=args.skip)
    except ds.GSM8KNotFound as e:
        raise MineError(str(e)) from None
    if not items:
        raise MineError(f"no {args.task} items after skipping {args.skip}")
    clash = reserved_overlap(args.task, [item_index(it.id) for it in items])
    if clash and not args.allow_reserved:
        raise MineError(
            f"items {clash[0]}..{clash[-1]} include the frontier's calibration or evaluation "
            "items (GSM8K 0-99, 1000-1499), which must stay out of training; choose --skip "
            "and --limit around them, or pass --allow-reserved")
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rec_dir = out / "records"
    os.environ[record.ENV] = str(rec_dir.resolve())
    rec_dir.mkdir(exist_ok=True)
    (rec_dir / record.PAUSE_FILE).touch()  # vLLM's warm-up records nothing
    started = datetime.datetime.now().isoformat(timespec="seconds")
    llm = build_llm(args)
    mc = llm.llm_engine.model_config
    pair = {"target": args.model, "drafter": args.drafter,
            "hidden_size": mc.get_hidden_size(), "vocab_size": mc.get_vocab_size()}
    chunks = [items[i:i + args.chunk] for i in range(0, len(items), args.chunk)]
    t_all, done_labels = time.perf_counter(), 0
    for c, chunk in enumerate(chunks):
        name = f"chunk-{item_index(chunk[0].id):06d}"
        if (out / "chunks" / f"{name}.json").exists():
            continue
        rng = random.Random(f"{args.seed}-{chunk[0].id}")
        res = mine_chunk(llm, chunk, args, rec_dir, rng)
        np.savez(out / "chunks" / f"{name}.npz", **res["arrays"])
        (out / "chunks" / f"{name}.json").write_text(json.dumps(
            {k: res[k] for k in ("items", "answers", "seconds", "tokens")}, indent=1))
        meta = write_dataset(out, args, pair, started)
        n = len(res["arrays"].get("item", []))
        done_labels += n
        imp = int(res["arrays"]["important"].sum()) if n else 0
        rate = done_labels / max(time.perf_counter() - t_all, 1e-9) * 3600
        _log(f"chunk {c + 1}/{len(chunks)} ({chunk[0].id}..{chunk[-1].id}): {n} labels, "
             f"{imp} important; answers {res['seconds']['answer']:.0f} s, swaps "
             f"{res['seconds']['swap']:.0f} s; in all {meta['labels']} labels "
             f"({meta['important']} important), {rate:.0f} labels/h this run")
    meta = write_dataset(out, args, pair, started)
    shutil.rmtree(rec_dir, ignore_errors=True)
    _log(f"done: {meta['labels']} labels ({meta['important']} important) from "
         f"{meta['n_items']} items in {out}; next: fly-vllm judge train {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    def check(args) -> str | None:
        if args.per_answer < 1 or args.k < 2 or args.limit < 1 or args.chunk < 1:
            return "--per-answer, --limit and --chunk must be >= 1 and --k >= 2"
        return None

    return run_command("fly-vllm judge mine", parser(), run, MineError, argv, check)

if __name__ == "__main__":
    sys.exit(main())
