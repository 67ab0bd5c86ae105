"""docker/: lint and context check, the .dockerignore matcher, the entrypoint
(with a fake `vllm`). No Docker engine and no vLLM engine needed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

_spec = importlib.util.spec_from_file_location(
    "check_context", ROOT / "docker" / "check_context.py"
)
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)


def test_check_sh_passes_and_runs_the_linters():
    r = subprocess.run(
        ["bash", "docker/check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for tool in ("hadolint", "shellcheck"):
        if (BIN / tool).exists():  # in the test lock, so CI has them
            assert f"OK   {tool}" in r.stdout, r.stdout
            assert f"SKIPPED {tool}" not in r.stdout
    assert "FAIL" not in r.stdout


@pytest.fixture(scope="module")
def patterns():
    return cc.parse_dockerignore((ROOT / ".dockerignore").read_text())


@pytest.mark.parametrize("path, included", [
    ("fly_vllm/plugin.py", True),
    ("fly_vllm/bench/harness.py", True),
    ("kernels/fly_verify.py", True),
    ("configs/fly-ngram.json", True),
    ("docker/entrypoint.sh", True),
    ("pyproject.toml", True),
    ("docker/Dockerfile.rocm", False),  # BuildKit sends the Dockerfile on its own
    ("docker/check.sh", False),
    ("tests/test_e2e.py", False),
    ("fly_vllm/__pycache__/x.pyc", False),
    ("kernels/fly_verify.pyc", False),
    (".venv/bin/python", False),
    (".git/HEAD", False),
    ("benchmarks/results/smollm2-ngram/report.md", False),
])
def test_dockerignore(patterns, path, included):
    assert cc.is_included(path, patterns) is included


def test_matcher_rules():
    p = cc.parse_dockerignore("*\n!a/\n**/c\n!a/**/c/keep.txt\n# comment\n")
    assert cc.is_included("a/b/x", p)
    assert not cc.is_included("b/x", p)  # `*` matches the parent folder b
    assert not cc.is_included("a/c/x", p)  # `**/` also stands for no folder
    assert not cc.is_included("a/b/c/x", p)
    assert cc.is_included("a/b/c/keep.txt", p)  # the last matching pattern wins
    assert not cc.is_included("a/b/c/d/keep.txt", p)
    q = cc.parse_dockerignore("a?c\n/d/*.py")
    assert not cc.is_included("abc", q) and cc.is_included("a/c", q)
    assert not cc.is_included("d/x.py", q) and cc.is_included("d/e/x.py", q)
    with pytest.raises(ValueError):
        cc.parse_dockerignore("[ab]")


def test_forbidden_dirs_are_caught(tmp_path):
    leaky = cc.parse_dockerignore("**/__pycache__\ntests/\n.git\nbenchmarks\n.scratch")
    problems = cc.check_forbidden(tmp_path, leaky, [])
    assert len(problems) == 1 and ".venv/" in problems[0]
    big = tmp_path / "fly_vllm" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(b"\0" * (cc.MAX_FILE_BYTES + 1))
    strict = cc.parse_dockerignore("*\n!fly_vllm")
    assert cc.check_forbidden(tmp_path, strict, []) == []
    problems = cc.check_forbidden(tmp_path, strict, ["fly_vllm/big.bin"])
    assert len(problems) == 1 and "over 5 MB" in problems[0]


def test_copy_sources():
    text = (
        "# syntax=docker/dockerfile:1\nARG BASE_IMAGE=x:v0.33.0\nFROM ${BASE_IMAGE}\n"
        "COPY --chown=1:1 ./pkg/ /opt/pkg/\ncopy [\"a.txt\", \"b.txt\", \"/opt/\"]\n"
        "COPY --from=builder /wheels /wheels\nADD https://example.org/f.tgz \\\n    /tmp/\n"
        "COPY --link --chmod=755 [\"run.sh\", \"/opt/\"]\n"
        "COPY missing/ \\\n  # a comment inside the instruction\n  /opt/missing/\n"
    )
    assert cc.copy_sources(text) == ["pkg", "a.txt", "b.txt", "run.sh", "missing"]
    files = ["pkg/__init__.py", "a.txt", "b.txt", "run.sh", "missing.txt"]
    assert cc.check_copy_sources(text, files) == [
        "COPY source 'missing' is not in the build context "
        "(.dockerignore excludes it, or the repo lacks it)"
    ]
    assert cc.check_copy_sources(text, [*files, "missing/x"]) == []


@pytest.mark.parametrize("image, ok", [
    ("vllm/vllm-openai-rocm:v0.33.0", True),
    ("vllm/vllm-openai:v0.32.1", True),
    ("rocm/vllm:rocm7.0.0_vllm_0.32.2_20260101", True),
    ("vllm/vllm-openai:v0.34.0", False),
    ("vllm/vllm-openai:v0.31.1", False),
    ("vllm/vllm-openai:latest", False),
    ("vllm/vllm-openai", False),
])
def test_base_image(image, ok):
    assert (cc.check_base_image(f"ARG BASE_IMAGE={image}\nFROM ${{BASE_IMAGE}}\n") == []) is ok


def test_base_image_must_come_from_the_arg():
    assert cc.check_base_image("FROM vllm/vllm-openai:v0.33.0\n")
    assert cc.check_base_image("FROM ${BASE_IMAGE}\n")  # no default


# --- the entrypoint, with a fake `vllm` that prints its argv -----------------


@pytest.fixture
def run_entrypoint(tmp_path):
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "FAKE-VLLM $*"\n')
    fake.chmod(0o755)
    path = os.pathsep.join([str(fake.parent), str(BIN), os.environ.get("PATH", "")])

    def run(config: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": path, "FLY_CONFIG": config}
        return subprocess.run(
            ["bash", str(ROOT / "docker" / "entrypoint.sh"), *args],
            env=env, capture_output=True, text=True, timeout=300,
        )

    return run


def _vllm_calls(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stdout.splitlines() if line.startswith("FAKE-VLLM")]


def test_entrypoint_missing_config(run_entrypoint, tmp_path):
    missing = tmp_path / "fly.json"
    r = run_entrypoint(str(missing), "MODEL")
    assert r.returncode == 2
    assert f"speculative config not found: {missing}" in r.stderr
    assert f'-v "$PWD/fly.json:{missing}:ro"' in r.stderr
    assert "/opt/fly-vllm/configs" in r.stderr
    assert not _vllm_calls(r)
    r = run_entrypoint(str(tmp_path), "MODEL")  # what a -v of a missing host file gives
    assert r.returncode == 2 and "is a directory" in r.stderr


def test_entrypoint_valid_config(run_entrypoint):
    config = str(ROOT / "configs" / "fly-ngram.json")
    r = run_entrypoint(config, "MODEL", "-tp", "8")
    assert r.returncode == 0, r.stderr
    assert _vllm_calls(r) == [f"FAKE-VLLM serve MODEL -tp 8 --speculative-config {config}"]


def test_entrypoint_invalid_config(run_entrypoint, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({
        "method": "fly", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "fly": {"window": 99},
    }))
    r = run_entrypoint(str(bad), "MODEL")
    assert r.returncode != 0
    assert "fly.window" in r.stderr and "vLLM not started" in r.stderr
    assert not _vllm_calls(r)


def test_entrypoint_without_speculation(run_entrypoint):
    r = run_entrypoint("none", "MODEL", "--port", "8001")
    assert r.returncode == 0, r.stderr
    assert _vllm_calls(r) == ["FAKE-VLLM serve MODEL --port 8001"]
    r = run_entrypoint("none")
    assert r.returncode == 2 and "no model given" in r.stderr


def test_wheel_check_fails_on_a_wheel_without_kernels(tmp_path):
    wheel = tmp_path / "fly_vllm-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fly_vllm/__init__.py", "")
        z.writestr("fly_vllm/plugin.py", "")
        z.writestr("fly_vllm-0.1.0.dist-info/entry_points.txt",
                   "[vllm.general_plugins]\nfly = fly_vllm.plugin:register\n")
    files = ["fly_vllm/__init__.py", "fly_vllm/bench/__init__.py"]
    problems = cc.check_wheel(wheel, files)
    assert problems[:2] == [
        "fly_vllm/kernels/fly_verify.py is not in the wheel",
        "entry point console_scripts: fly-vllm = fly_vllm.cli:main missing (got None)",
    ]
    assert len(problems) == 3 and problems[2].startswith("fly_vllm/bench is in the context")
