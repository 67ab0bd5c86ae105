"""Fetch vLLM 0.32.0's own rejection-sampler tests into an ignored folder.

The test modules ship only in vLLM's source release, not in its wheels: for
model runner V1, tests/v1/sample/test_rejection_sampler.py and the helper it
imports (tests/v1/sample/utils.py); for model runner V2,
tests/v1/spec_decode/test_rejection_sampler_utils.py and
tests/v1/worker/test_gpu_rejection_sampler_{chunking,i64}.py (they import
vLLM only). Their package markers come with them.
``pip download --no-binary :all: vllm==0.32.0`` does fetch that sdist but
then prepares its metadata, which needs vLLM's build dependencies (torch
from source under ``:all:``, setuptools-rust, cmake): it fails, or installs
gigabytes. So the sdist is taken from the package index pip uses
($PIP_INDEX_URL, else pip's configured index-url, else pip's own default),
checked against the pinned sha256, and only those files are unpacked. Nothing of vLLM is committed.

    python tests/vllm_suite/fetch.py [DEST]     (default .vllm032)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

VERSION = "0.32.0"
SDIST = f"vllm-{VERSION}.tar.gz"
SDIST_SHA256 = "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"
# Model runner V1's suite (tests/test_vllm_sampler_suite.py).
SUITE = Path("tests/v1/sample/test_rejection_sampler.py")
# Model runner V2's (tests/test_vllm_v2_sampler_suite.py).
V2_SUITES = (Path("tests/v1/spec_decode/test_rejection_sampler_utils.py"),
             Path("tests/v1/worker/test_gpu_rejection_sampler_chunking.py"),
             Path("tests/v1/worker/test_gpu_rejection_sampler_i64.py"))
MEMBERS = ("tests/__init__.py", "tests/v1/__init__.py", "tests/v1/sample/__init__.py",
           "tests/v1/sample/utils.py", str(SUITE),
           "tests/v1/spec_decode/__init__.py", "tests/v1/worker/__init__.py",
           *map(str, V2_SUITES))
TIMEOUT_S = 60


class FetchError(RuntimeError):
    pass


def _index() -> str:
    """The index pip would use: $PIP_INDEX_URL, its configured index-url, or
    its built-in default."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                       capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip()
    from pip._internal.models.index import PyPI  # pip's default index

    return PyPI.simple_url


def _sdist_url(index: str) -> str:
    """The sdist's URL from the index's page for vllm (PEP 691 JSON, else
    PEP 503 HTML)."""
    page = index.rstrip("/") + "/vllm/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        kind, body = r.headers.get("Content-Type", ""), r.read().decode()
    if "json" in kind:
        urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == SDIST]
    else:
        urls = [h for h in re.findall(r'href="([^"]+)"', body)
                if h.split("#")[0].endswith("/" + SDIST)]
    if not urls:
        raise FetchError(f"{page} lists no {SDIST}")
    return urllib.parse.urljoin(page, urls[0]).split("#")[0]


def fetch(dest: Path) -> Path:
    """Unpack the suites under ``dest`` (once: again only when one of the
    files is missing, e.g. in a folder fetched before V2's were added);
    return V1's test module's path. Raises FetchError (or OSError) when it
    cannot."""
    target = dest / SUITE
    if all((dest / name).exists() for name in MEMBERS):
        return target
    index = _index()
    url = _sdist_url(index)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=dest) as tmp:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                tmp.write(chunk)
        if digest.hexdigest() != SDIST_SHA256:
            raise FetchError(f"{url}: sha256 {digest.hexdigest()}, expected {SDIST_SHA256}")
        tmp.seek(0)
        with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
            prefix = f"vllm-{VERSION}/"
            for name in MEMBERS:
                out = dest / name
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    member = tar.extractfile(prefix + name)
                except KeyError:
                    member = None
                if member is None and not name.endswith("__init__.py"):
                    raise FetchError(f"{SDIST} has no {name}")
                # A package marker the sdist lacks is written empty.
                out.write_bytes(member.read() if member is not None else b"")
    return target


if __name__ == "__main__":
    where = Path(sys.argv[1] if len(sys.argv) > 1 else ".vllm032")
    try:
        print(fetch(where))
    except (FetchError, OSError) as e:
        sys.exit(f"could not fetch vLLM {VERSION}'s rejection-sampler tests: {e}")
