"""A fresh clone with nothing beside it: the suite collects without errors,
and the tests that need the real GSM8K-train skip, saying how to give it,
instead of failing. The clone's own code is the one imported (fly_vllm is
installed in editable mode from this checkout, so PYTHONPATH puts the
clone first). A clone holds only what is committed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from fly_vllm.bench import datasets as ds
from tests.conftest import ROOT


def _run(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_bare_clone_collects_and_skips_what_needs_gsm8k(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    assert ds.shared_gsm8k(tmp_path) is None, "a shared/ GSM8K copy lies above the temp folder"
    clone = tmp_path / "clone"
    r = _run(["git", "clone", "-q", str(ROOT), str(clone)], tmp_path, None)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("FLY_VLLM_GSM8K", "PYTHONPATH")}
    env.update(PYTHONPATH=str(clone), FLY_VLLM_CACHE=str(tmp_path / "cache"),
               FLY_VLLM_OFFLINE="1", OMP_NUM_THREADS="1")

    r = _run([sys.executable, "-c", "import fly_vllm.bench.datasets as d; print(d.__file__)"],
             clone, env)
    assert r.stdout.strip() == str(clone / "fly_vllm" / "bench" / "datasets.py"), r.stderr

    # One run collects every test module (a collection error fails it) and
    # runs only the two that need the real GSM8K-train.
    real = "test_real_gsm8k_train_is_the_pinned_file or test_distill_tiny"
    r = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
              "-k", real], clone, env)
    assert r.returncode == 0, r.stdout[-3000:]
    assert re.search(r"^2 skipped, \d+ deselected in ", r.stdout, re.M), r.stdout[-3000:]
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert {re.search(r"tests/\w+\.py", s)[0] for s in skips} == {
        "tests/test_datasets.py", "tests/test_distill.py"}
    for line in skips:
        for way in ("GSM8K-train not found", "--data FILE.jsonl", "FLY_VLLM_GSM8K=FILE.jsonl",
                    str(tmp_path / "cache")):
            assert way in line, line

    # What a user of the clone sees: one message with the ways, not a path
    # that exists only beside this checkout.
    r = _run([sys.executable, "-c", "from fly_vllm.bench import datasets; "
              "datasets.load('gsm8k', 3)"], tmp_path, env)
    assert r.returncode == 1 and "GSM8KNotFound: GSM8K-train not found" in r.stderr, r.stderr
    assert "--data FILE.jsonl" in r.stderr and "downloads are off" in r.stderr
