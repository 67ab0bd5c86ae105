"""Where GSM8K comes from: --data, $FLY_VLLM_GSM8K, the cached copy, a
shared/ folder in or above the working folder, then a checked download into
the cache. None of these tests uses the network or this checkout's layout:
the download is served from a local file or a stand-in for urlopen."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fly_vllm.bench import datasets as ds
from fly_vllm.bench import scoring
from tests.conftest import real_gsm8k, write_gsm8k

GSM8K, NO_GSM8K = real_gsm8k()


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A working folder `work/clone` with nothing in it, an empty cache, no
    $FLY_VLLM_GSM8K; returns the paths a copy could be put at."""
    clone = tmp_path / "work" / "clone"
    clone.mkdir(parents=True)
    monkeypatch.chdir(clone)
    monkeypatch.setenv("FLY_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLY_VLLM_GSM8K", raising=False)
    assert ds.shared_gsm8k() is None, "a shared/ GSM8K copy lies above the temporary folder"
    return {"clone": clone, "shared": tmp_path / "work" / ds.GSM8K_SHARED,
            "cache": tmp_path / "cache" / "data" / "gsm8k" / "train.jsonl",
            "env": tmp_path / "env.jsonl", "data": tmp_path / "data.jsonl"}


def _copy(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_gsm8k(path, n)


def test_gsm8k_is_found_in_order(places, monkeypatch):
    # Each place holds a file of its own length, so load() shows which was read.
    _copy(places["shared"], 2)
    assert ds.gsm8k_path(fetch=False) == places["shared"]
    monkeypatch.chdir(places["clone"].parent.parent)  # shared/ is no longer above
    assert ds.shared_gsm8k() is None
    sub = places["clone"] / "benchmarks"
    sub.mkdir()
    monkeypatch.chdir(sub)  # ...and from a folder two levels below, it is
    assert ds.gsm8k_path(fetch=False) == places["shared"]
    assert len(ds.load("gsm8k", None)) == 2

    _copy(places["cache"], 3)
    assert ds.gsm8k_path(fetch=False) == places["cache"]
    assert len(ds.load("gsm8k", None)) == 3

    monkeypatch.setenv("FLY_VLLM_GSM8K", str(_copy(places["env"], 4)))
    assert ds.gsm8k_path(fetch=False) == places["env"]
    assert len(ds.load("gsm8k", None)) == 4

    _copy(places["data"], 5)
    assert ds.gsm8k_path(str(places["data"]), fetch=False) == places["data"]
    assert len(ds.load("gsm8k", None, str(places["data"]))) == 5


def test_a_named_file_that_is_missing_is_an_error(places, monkeypatch):
    _copy(places["cache"], 3)
    with pytest.raises(ds.GSM8KNotFound, match=r"nope\.jsonl \(from --data\) not found"):
        ds.load("gsm8k", 1, str(places["clone"] / "nope.jsonl"))
    monkeypatch.setenv("FLY_VLLM_GSM8K", str(places["clone"] / "gone.jsonl"))
    with pytest.raises(ds.GSM8KNotFound,
                       match=r"gone\.jsonl \(from \$FLY_VLLM_GSM8K\) not found"):
        ds.gsm8k_path()


def _no_network(*args, **kwargs):
    raise AssertionError("the finder tried the network")


def test_nothing_found_names_every_way(places, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(ds.GSM8KNotFound) as e:
        ds.gsm8k_path(fetch=False)
    msg = str(e.value)
    for way in ("--data FILE.jsonl", "FLY_VLLM_GSM8K=FILE.jsonl", str(places["cache"]),
                ds.GSM8K_URL, ds.GSM8K_SHA256, str(places["clone"]), "fetch=False"):
        assert way in msg
    # The offline switches turn the download off by default; the message says so.
    monkeypatch.delenv("FLY_VLLM_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ds.GSM8KNotFound, match="downloads are off"):
        ds.load("gsm8k", 3)
    assert not places["cache"].parent.exists()


def _serve(monkeypatch, tmp_path, n: int) -> bytes:
    """Point GSM8K_URL at a local file of ``n`` items and pin its sha256."""
    src = write_gsm8k(tmp_path / "served.jsonl", n)
    monkeypatch.setattr(ds, "GSM8K_URL", src.as_uri())
    monkeypatch.setattr(ds, "GSM8K_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    return src.read_bytes()


def test_download_is_checked_then_cached(places, tmp_path, monkeypatch, capsys):
    body = _serve(monkeypatch, tmp_path, 20000)  # 2.1 MiB: a line at each MiB
    assert len(body) > 1 << 20
    # Not offline and no fetch argument: the download is the default.
    monkeypatch.delenv("FLY_VLLM_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    items = ds.load("gsm8k", 2, skip=3)
    assert [it.id for it in items] == ["gsm8k-3", "gsm8k-4"]
    assert places["cache"].read_bytes() == body
    assert list(places["cache"].parent.iterdir()) == [places["cache"]]
    err = capsys.readouterr().err
    assert f"downloading {ds.GSM8K_URL} to {places['cache']}" in err
    mib = f"{len(body) / 2**20:.1f} MiB"
    assert f"GSM8K-train: 1.0 of {mib}\n" in err and f"2.0 of {mib}" in err
    assert f"{len(body)} bytes, sha256 checked, saved as {places['cache']}" in err
    # The cached copy is used from then on, with the network off.
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert ds.gsm8k_path() == places["cache"]
    assert capsys.readouterr().err == ""


def test_a_download_with_the_wrong_sha256_is_not_kept(places, tmp_path, monkeypatch):
    _serve(monkeypatch, tmp_path, 5)
    monkeypatch.setattr(ds, "GSM8K_SHA256", "0" * 64)
    with pytest.raises(ds.GSM8KChecksumError, match="not the pinned 0000"):
        ds.download_gsm8k()
    assert list(places["cache"].parent.iterdir()) == []
    with pytest.raises(ds.GSM8KNotFound) as e:
        ds.gsm8k_path(fetch=True)
    assert "it was not saved" in str(e.value) and "--data FILE.jsonl" in str(e.value)
    assert list(places["cache"].parent.iterdir()) == []


class _Broken(io.BytesIO):
    """A response that gives some bytes, then loses the connection."""

    headers = {"Content-Length": "1000"}

    def read(self, size=-1):
        if self.tell():
            raise ConnectionResetError("connection reset by peer")
        return super().read(100)


@pytest.mark.parametrize("failure", ["no name", "cut off"])
def test_a_failed_download_leaves_nothing(places, monkeypatch, failure):
    def urlopen(url, timeout):
        assert url == ds.GSM8K_URL and timeout > 0
        if failure == "no name":
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return _Broken(b"x" * 1000)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(ds.GSM8KNotFound) as e:
        ds.gsm8k_path(fetch=True)
    assert "the download failed:" in str(e.value)
    assert ("Name or service" if failure == "no name" else "connection reset") in str(e.value)
    assert list(places["cache"].parent.iterdir()) == []


def test_gsm8k_items_and_scoring_on_a_small_file(tmp_path):
    data = str(write_gsm8k(tmp_path / "gsm.jsonl", 4))
    items = ds.load("gsm8k", None, data)
    assert [it.id for it in items] == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"]
    assert [it.reference for it in items] == ["50", "550", "1050", "1550"]
    row = json.loads(open(data).readline())
    prompt = items[0].messages[0]["content"]
    assert prompt.startswith(row["question"] + "\n") and "'####'" in prompt
    assert items[2].meta["solution"].endswith("#### 1,050")
    for it in items:
        assert scoring.gsm8k_correct(it.meta["solution"], it.reference)
    assert not scoring.gsm8k_correct("so #### 1,500", items[2].reference)
    assert [it.id for it in ds.load("gsm8k", 2, data)] == ["gsm8k-0", "gsm8k-1"]


@pytest.mark.skipif(GSM8K is None, reason=NO_GSM8K)
def test_real_gsm8k_train_is_the_pinned_file():
    """The copy found on disk is GSM8K-train at the pinned commit (so the
    pinned sha256 is right), read as 7473 items."""
    assert hashlib.sha256(GSM8K.read_bytes()).hexdigest() == ds.GSM8K_SHA256
    items = ds.load("gsm8k", None, str(GSM8K))
    assert len(items) == 7473 and items[-1].id == "gsm8k-7472"
    assert items[0].reference == "72" and "Natalia" in items[0].messages[0]["content"]
