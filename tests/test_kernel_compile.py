"""Every Triton kernel compiles, ahead of time, for the GPUs our users run:
sm_90a (H100), gfx942 (MI300X) and gfx950 (MI355X), at every specialisation
its wrapper launches, within its resource budget (fly_vllm.kernels.aot).

The interpreter tests (test_kernels, test_fsd_kernels) set TRITON_INTERPRET=1
at import, which turns every kernel into Python; so the compiler runs here in
subprocesses, one per target, each with an empty Triton cache (else a cached
binary would answer instead of the compiler).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT

triton = pytest.importorskip("triton")

BACKEND_OF = {"sm_90a": "nvidia", "gfx942": "amd", "gfx950": "amd"}
KERNELS = ("_row_stats_kernel", "_accept_kernel", "_fsd_row_kernel", "_fsd_accept_kernel",
           "_judge_score_kernel")


def _missing_backends() -> list[str]:
    """Triton backends this install lacks (each needs its wheel's compiler)."""
    from triton.backends import backends

    return sorted({b for b in BACKEND_OF.values() if b not in backends})


pytestmark = pytest.mark.skipif(
    bool(_missing_backends()),
    reason=f"the installed triton lacks the backend(s) {_missing_backends()}")


def _env(cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    return env


def _start(args: list[str], cache: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def compiled():
    """{target: (exit code, stdout, per-case figures)}: all targets compiled
    at once, each in its own process and cache."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for target in BACKEND_OF:
            out = os.path.join(tmp, f"{target}.json")
            procs[target] = (_start(["-m", "fly_vllm.kernels.aot", "--targets", target,
                                     "--quiet", "--json", out],
                                    os.path.join(tmp, f"cache-{target}")), out)
        results = {}
        for target, (proc, out) in procs.items():
            stdout, stderr = proc.communicate(timeout=900)
            assert os.path.exists(out), f"{target}: no results\n{stderr[-3000:]}"
            with open(out) as f:
                results[target] = (proc.returncode, stdout, json.load(f))
        return results


@pytest.mark.parametrize("target", list(BACKEND_OF))
def test_every_kernel_compiles_within_budget(compiled, target):
    code, stdout, cases = compiled[target]
    failures = [line for line in stdout.splitlines() if line.startswith("FAIL")]
    assert code == 0 and not failures, "\n".join(failures) or stdout
    assert {c["kernel"] for c in cases} == set(KERNELS)
    for c in cases:
        assert c["error"] is None and c["spills"] == 0 and c["scratch"] == 0, c
        assert c["runtime_loops"] == 0, c
        if target.startswith("gfx"):
            assert c["num_stages"] == 1, c
    print(stdout)  # the resource table, with -s


@pytest.mark.parametrize("target", list(BACKEND_OF))
def test_the_matrix_covers_what_the_wrappers_launch(compiled, target):
    labels = {(c["kernel"], c["label"]) for c in compiled[target][2]}
    for k in (2, 4, 8, 15, 25):
        for mode in ("greedy", "greedy veto", "random", "random veto"):
            assert ("_accept_kernel", f"K={k} {mode}") in labels
        assert ("_fsd_accept_kernel", f"K={k} resample random veto") in labels
    for variant in ("resample", "fallback"):
        for mode in ("greedy", "greedy veto", "random", "random veto"):
            assert ("_fsd_accept_kernel", f"K=8 {variant} {mode}") in labels
    for dtype in ("fp32", "bf16", "fp16"):
        for vocab in (32000, 49152, 128256, 151936, 50257):
            assert ("_row_stats_kernel", f"{dtype} V={vocab} top_k=3") in labels
            assert ("_fsd_row_kernel", f"{dtype} V={vocab} js") in labels
    for top_k in range(1, 9):
        assert any(k == "_row_stats_kernel" and lbl.endswith(f"top_k={top_k}")
                   for k, lbl in labels)
    for kind in ("js", "kl_draft_target", "kl_target_draft", "tv"):
        assert any(k == "_fsd_row_kernel" and lbl.endswith(kind) for k, lbl in labels)
    # The judge: every hidden dtype at the hidden sizes of the models we
    # serve (one not divisible by 16), and every feature spec the gate can
    # launch (which hidden rows; with and without scalar features).
    for dtype in ("fp32", "bf16", "fp16"):
        for hidden in (576, 896, 1536, 3584, 4096, 8192, 1000):
            assert ("_judge_score_kernel", f"{dtype} H={hidden} h_post") in labels
    for spec in ("h_post", "h_pre", "h_post+h_pre"):
        for scalars in ("", " +scalars"):
            assert ("_judge_score_kernel", f"bf16 H=4096 {spec}{scalars}") in labels


def test_the_check_reports_what_the_interpreter_accepts():
    """Negative controls: a kernel reading a plain global (the bug FSD's
    accept kernel had) fails to compile, and a runtime-bound loop is flagged;
    both are reported as failures, not passed over."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = _start(["-m", "tests.aot_controls"], tmp)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    for target, res in json.loads(stdout).items():
        assert res["global"] and "Cannot access global variable FLAG" in res["global"][0], res
        assert res["loop_count"] == 1 and res["loop"] == [
            "1 loop(s) with a runtime trip count"], (target, res)
