"""The plugin's registration: version range, idempotence, the LLM() path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fly_vllm.plugin import FlyVersionError, check_vllm_version
from tests.conftest import ROOT, vllm_env


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1+cpu", "0.33.0", "0.33.2"])
def test_supported_versions(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.34.0", "1.0.0", "garbage"])
def test_unsupported_versions_name_the_range(version):
    with pytest.raises(FlyVersionError, match=r">=0.32,<0.34.*found vLLM " + version):
        check_vllm_version(version)


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (default environment: vllm_env())."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=vllm_env() if env is None else env, capture_output=True,
                          text=True, timeout=300)


def test_register_is_idempotent_and_patches_once():
    r = run_python("""
        import fly_vllm.plugin as p
        from vllm.engine.arg_utils import EngineArgs
        from vllm.config import VllmConfig
        p.register()
        first = (EngineArgs.create_speculative_config, EngineArgs.add_cli_args,
                 VllmConfig.use_v2_model_runner)
        p._registered = False           # as if loaded again in this process
        p.register()
        again = (EngineArgs.create_speculative_config, EngineArgs.add_cli_args,
                 VllmConfig.use_v2_model_runner)
        assert first == again, "patched twice"
        import vllm.v1.sample.rejection_sampler as rs
        import vllm.v1.worker.gpu_model_runner as gmr
        assert getattr(rs.rejection_sample, "__fly_vllm_patched__", False)
        assert getattr(gmr.GPUModelRunner.__init__, "__fly_vllm_patched__", False)
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_llm_path_rejects_a_bad_config_before_the_engine(tiny_pair, tmp_path):
    import json
    import os
    from pathlib import Path

    from fly_vllm.tinyheads import build_tiny_eagle3
    from tests.conftest import SCRATCH

    # An EAGLE-3 head with a smaller vocabulary of its own (a draft-to-target
    # map): only its config is read before the engine.
    head = Path(build_tiny_eagle3(SCRATCH / "eagle3", tiny_pair["target"]))
    mapped = tmp_path / "eagle3-mapped"
    mapped.mkdir()
    for f in os.listdir(head):
        if f != "config.json":
            os.symlink(head / f, mapped / f)
    cfg = json.loads((head / "config.json").read_text())
    (mapped / "config.json").write_text(json.dumps({**cfg, "draft_vocab_size": 64}))
    r = run_python(f"""
        from vllm import LLM
        from fly_vllm.config import FlyConfigError
        try:
            LLM(model={tiny_pair['target']!r}, speculative_config={{
                "method": "fly", "model": {tiny_pair['near']!r},
                "num_speculative_tokens": 4, "fly": {{"entropy_threshold": -1}}}})
        except FlyConfigError as e:
            print("FlyConfigError:", e)
        # Flex skips the drafter's pass on some steps; data-parallel ranks
        # run theirs together. (LLM() itself refuses data parallelism, so
        # the engine's config as a data-parallel server builds it.)
        from vllm.engine.arg_utils import EngineArgs
        try:
            EngineArgs(model={tiny_pair['target']!r}, data_parallel_size=2,
                       speculative_config={{
                "method": "fly", "model": {tiny_pair['near']!r},
                "num_speculative_tokens": 4, "fly": {{"flex": True}}}}).create_engine_config()
        except FlyConfigError as e:
            print("FlyConfigError:", e)
        # FSD's KL(p || q) against a drafter that covers part of the vocabulary.
        try:
            LLM(model={tiny_pair['target']!r}, speculative_config={{
                "method": "fly", "model": {str(mapped)!r}, "num_speculative_tokens": 4,
                "fly": {{"drafter": "eagle3", "rule": "fsd", "fsd_threshold": 0.5,
                        "fsd_divergence": "kl_target_draft"}}}})
        except FlyConfigError as e:
            print("FlyConfigError:", e)
    """)
    assert "FlyConfigError: fly.entropy_threshold must be >= 0" in r.stdout, r.stderr[-3000:]
    assert ("FlyConfigError: fly.fsd_divergence 'kl_target_draft' is KL(p || q)" in r.stdout
            and "has 64 of the target's" in r.stdout), r.stderr[-3000:]
    assert ("FlyConfigError: fly.flex skips the drafter's forward pass" in r.stdout
            and "data_parallel_size 2, remove fly.flex" in r.stdout), r.stderr[-3000:]
    assert "Loading weights" not in r.stderr  # it stopped before any engine


def test_serve_binds_every_core_on_small_vllm_cpu_machines():
    from fly_vllm.cli import cpu_thread_binding

    assert cpu_thread_binding({}, {0, 1}, on_vllm_cpu=True) == "0,1"
    assert cpu_thread_binding({}, {3, 1}, on_vllm_cpu=True) == "1,3"
    # The user's choice, GPU builds, one core and larger machines keep vLLM's.
    assert cpu_thread_binding({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, {0, 1}, True) is None
    assert cpu_thread_binding({}, {0, 1}, on_vllm_cpu=False) is None
    assert cpu_thread_binding({}, {0}, on_vllm_cpu=True) is None
    assert cpu_thread_binding({}, set(range(8)), on_vllm_cpu=True) is None


def test_fsd_request_settings_are_client_errors():
    """Under rule fsd, a bad fly_fsd_threshold or a FLy-only key is vLLM's
    validation error (HTTP 400 in the server), raised before the engine."""
    from vllm.exceptions import VLLMValidationError

    from fly_vllm.config import parse_fly_config
    from fly_vllm.plugin import _check_request_fly

    _, fsd = parse_fly_config({"method": "fly", "model": "d", "num_speculative_tokens": 4,
                               "fly": {"rule": "fsd"}})
    _check_request_fly({"fly_fsd_threshold": "0.2"}, fsd, 4)  # fine
    for bad, words in [({"fly_fsd_threshold": 2}, "between 0 and 0.6931"),
                       ({"fly_entropy_threshold": 0.3}, "for a server with rule 'fsd'")]:
        with pytest.raises(VLLMValidationError, match=words):
            _check_request_fly(bad, fsd, 4)
