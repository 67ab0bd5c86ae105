"""fly.json parsing and validation: every bad config gets one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fly_vllm.config import (
    FlyConfig,
    FlyConfigError,
    load_speculative_config,
    parse_fly_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = {"method": "fly", "model": "draft", "num_speculative_tokens": 8}


def test_defaults_and_translation():
    vllm_spec, fly = parse_fly_config(dict(BASE))
    assert fly == FlyConfig(entropy_threshold=0.3, window=6, entropy_top_k=3,
                            strict=False, window_convention="vllm", drafter=None)
    # method "fly" is removed: vLLM infers the drafter from "model".
    assert vllm_spec == {"model": "draft", "num_speculative_tokens": 8}


def test_window_defaults_to_k_minus_one_for_small_k():
    _, fly = parse_fly_config({**BASE, "num_speculative_tokens": 4})
    assert fly.window == 3


def test_ngram_drafter_is_inferred_and_other_keys_pass_through():
    spec = {"method": "fly", "prompt_lookup_min": 2, "prompt_lookup_max": 4,
            "num_speculative_tokens": 8, "fly": {"entropy_threshold": 0.5}}
    vllm_spec, fly = parse_fly_config(spec)
    assert vllm_spec == {"method": "ngram", "prompt_lookup_min": 2,
                         "prompt_lookup_max": 4, "num_speculative_tokens": 8}
    assert fly.entropy_threshold == 0.5 and fly.drafter == "ngram"


def test_paper_convention_checks_w_minus_one():
    _, fly = parse_fly_config({**BASE, "fly": {"window_convention": "paper"}})
    assert fly.window_span == 5
    _, fly = parse_fly_config(dict(BASE))
    assert fly.window_span == 6


@pytest.mark.parametrize(
    "spec, words",
    [
        ({**BASE, "fly": {"entropy_treshold": 0.3}}, ["fly.entropy_treshold", "entropy_threshold"]),
        ({**BASE, "bogus": 1}, ["'bogus'", "num_speculative_tokens"]),
        ({**BASE, "fly": {"window": 8}}, ["fly.window", "1..7", "K=8"]),
        ({**BASE, "fly": {"window": 0}}, ["fly.window", ">= 1"]),
        ({**BASE, "fly": {"entropy_threshold": -0.1}}, ["fly.entropy_threshold", ">= 0"]),
        ({**BASE, "fly": {"entropy_threshold": "high"}}, ["fly.entropy_threshold"]),
        ({**BASE, "fly": {"entropy_threshold": 1.2}}, ["above 1.099", "strict: true"]),
        ({**BASE, "fly": {"entropy_threshold": 0.8, "entropy_top_k": 2}},
         ["above 0.7358", "top-2"]),
        ({**BASE, "fly": {"entropy_top_k": 9}}, ["fly.entropy_top_k", "between 1 and 8"]),
        ({**BASE, "fly": {"strict": "yes"}}, ["fly.strict", "true or false"]),
        ({**BASE, "fly": {"window_convention": "x"}}, ["fly.window_convention", "paper"]),
        ({"method": "fly", "num_speculative_tokens": 8}, ["needs a drafter", "model", "prompt_lookup"]),
        ({"method": "fly", "model": "d"}, ["num_speculative_tokens"]),
        ({**BASE, "num_speculative_tokens": 1}, ["num_speculative_tokens", ">= 2"]),
        ({**BASE, "rejection_sample_method": "synthetic"}, ["rejection_sample_method"]),
        ({**BASE, "fly": {"gate": "cosine"}}, ["fly.gate", "'entropy', 'margin', 'both'"]),
        ({**BASE, "fly": {"margin": 0.3}}, ["fly.margin", "gate 'entropy' does not use"]),
        ({**BASE, "fly": {"gate": "margin", "entropy_threshold": 0.3}},
         ["fly.entropy_threshold", "gate 'margin' does not use"]),
        ({**BASE, "fly": {"gate": "margin", "entropy_top_k": 2}}, ["fly.entropy_top_k"]),
        ({**BASE, "fly": {"gate": "margin", "margin": -0.1}}, ["fly.margin", ">= 0"]),
        ({**BASE, "fly": {"gate": "both", "margin": float("inf")}}, ["fly.margin", "finite"]),
        ({**BASE, "fly": {"strict_prefix_tokens": -1}}, ["fly.strict_prefix_tokens", ">= 0"]),
        ({**BASE, "fly": {"strict_prefix_tokens": 2.5}}, ["fly.strict_prefix_tokens"]),
        ({**BASE, "fly": {"rule": "fsd", "gate": "margin"}}, ["fly.gate", "rule 'fly' only"]),
    ],
)
def test_bad_configs_name_the_key(spec, words):
    with pytest.raises(FlyConfigError) as e:
        parse_fly_config(spec)
    for w in words:
        assert w in str(e.value)


def test_file_path_inline_json_and_comments(tmp_path):
    f = tmp_path / "fly.json"
    f.write_text('// a comment\n{"method": "fly",\n # another\n "model": "m", "num_speculative_tokens": 4}\n')
    assert load_speculative_config(str(f))["model"] == "m"
    assert load_speculative_config('{"model": "m"}') == {"model": "m"}
    with pytest.raises(FlyConfigError, match="does not exist"):
        load_speculative_config(str(tmp_path / "missing.json"))
    f.write_text('{"method": "fly",\n "model": }')
    with pytest.raises(FlyConfigError, match="not valid JSON.*line 2 column"):
        load_speculative_config(str(f))
    f.write_text("[1, 2]")
    with pytest.raises(FlyConfigError, match="JSON object"):
        load_speculative_config(str(f))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    spec = load_speculative_config(str(path))
    parse_fly_config(spec)
    # Each says where it comes from and what it runs on, in its comment.
    comment = "\n".join(line for line in path.read_text().splitlines()
                        if line.lstrip().startswith("//")).lower()
    assert "hardware" in comment and ("source" in comment or "paper" in comment
                                      or "demo" in comment), path.name


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(BASE))
    r = subprocess.run([sys.executable, "-m", "fly_vllm.cli", "check-config", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and '"entropy_threshold": 0.3' in r.stdout
    assert "fsd_threshold" not in r.stdout  # the other rule's keys are not shown
    fsd = tmp_path / "fsd.json"
    fsd.write_text(json.dumps({**BASE, "fly": {"rule": "fsd", "fsd_threshold": 0.2}}))
    r = subprocess.run([sys.executable, "-m", "fly_vllm.cli", "check-config", str(fsd)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and '"fsd_threshold": 0.2' in r.stdout, r.stderr
    assert "entropy" not in r.stdout and "window" not in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**BASE, "fly": {"window": 9}}))
    r = subprocess.run([sys.executable, "-m", "fly_vllm.cli", "check-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "fly.window must be smaller" in r.stderr
    assert "Traceback" not in r.stderr


def test_margin_gate_and_strict_prefix_config(tmp_path):
    _, fly = parse_fly_config(BASE)
    assert (fly.gate, fly.strict_prefix_tokens) == ("entropy", 0)
    _, fly = parse_fly_config({**BASE, "fly": {"gate": "margin", "margin": 0.7,
                                               "strict_prefix_tokens": 32}})
    assert (fly.gate, fly.margin, fly.strict_prefix_tokens) == ("margin", 0.7, 32)
    shown = fly.rule_settings()
    assert "entropy_threshold" not in shown and shown["margin"] == 0.7
    assert "margin" not in parse_fly_config(BASE)[1].rule_settings()
    both = parse_fly_config({**BASE, "fly": {"gate": "both"}})[1].rule_settings()
    assert (both["entropy_threshold"], both["margin"]) == (0.3, 0.3)  # the defaults
    # FSD takes a strict prefix too.
    _, fsd = parse_fly_config({**BASE, "fly": {"rule": "fsd", "strict_prefix_tokens": 8}})
    assert fsd.strict_prefix_tokens == 8 and "gate" not in fsd.rule_settings()
    f = tmp_path / "m.json"
    f.write_text(json.dumps({**BASE, "fly": {"gate": "margin", "margin": 0.2}}))
    r = subprocess.run([sys.executable, "-m", "fly_vllm.cli", "check-config", str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and '"gate": "margin", "margin": 0.2' in r.stdout
    assert "entropy" not in r.stdout


def test_margin_and_prefix_request_overrides():
    from fly_vllm.config import request_overrides

    _, entropy = parse_fly_config(BASE)
    _, margin = parse_fly_config({**BASE, "fly": {"gate": "margin"}})
    assert request_overrides({"fly_gate": "margin", "fly_margin": "0.5",
                              "fly_strict_prefix_tokens": "16"}, 8, 3, entropy) == {
        "gate": "margin", "margin": 0.5, "strict_prefix_tokens": 16}
    assert request_overrides({"fly_margin": 0.1}, 8, 3, margin) == {"margin": 0.1}
    for bad, server, words in [
            ({"fly_margin": 0.1}, entropy, "gate 'entropy' does not use"),
            ({"fly_entropy_threshold": 0.5}, margin, "gate 'margin' does not use"),
            ({"fly_gate": "margin", "fly_entropy_threshold": 0.5}, entropy, "does not use"),
            ({"fly_gate": "x"}, entropy, "gate must be one of"),
            ({"fly_margin": "wide"}, margin, "margin must be a finite number"),
            ({"fly_strict_prefix_tokens": "-3"}, entropy, "strict_prefix_tokens"),
            ({"fly_strict_prefix_tokens": True}, entropy, "strict_prefix_tokens")]:
        with pytest.raises(FlyConfigError, match=words):
            request_overrides(bad, 8, 3, server)
    _, fsd = parse_fly_config({**BASE, "fly": {"rule": "fsd"}})
    assert request_overrides({"fly_strict_prefix_tokens": 4}, 8, 3, fsd) == {
        "strict_prefix_tokens": 4}
    with pytest.raises(FlyConfigError, match="unknown per-request fly key 'margin'"):
        request_overrides({"fly_margin": 0.1}, 8, 3, fsd)


def test_guard_flags():
    _, fly = parse_fly_config({**BASE, "fly": {"guard_digits": True,
                                               "guard_eos_stop": True}})
    assert fly.guard_digits and fly.guard_eos_stop and not fly.guard_structured
    with pytest.raises(FlyConfigError, match="fly.guard_structured must be true or false"):
        parse_fly_config({**BASE, "fly": {"guard_structured": 1}})


def test_request_overrides():
    from fly_vllm.config import request_overrides

    assert request_overrides(None, 8) == {}
    assert request_overrides({"other": 1}, 8) == {}
    assert request_overrides({"fly": {"strict": True, "window": 3}}, 8) == {
        "strict": True, "window": 3}
    # HTTP's vllm_xargs carries flat values, possibly as strings.
    assert request_overrides({"fly_strict": "true", "fly_window": "2",
                              "fly_entropy_threshold": "0.5"}, 8) == {
        "strict": True, "window": 2, "entropy_threshold": 0.5}
    for bad, words in [({"fly_window": 8}, "1..7 (K=8)"), ({"fly_window": 0}, "1..7"),
                       ({"fly_window": "x"}, "window"), ({"fly_strict": 2}, "strict"),
                       ({"fly_entropy_threshold": float("nan")}, "finite"),
                       ({"fly_entropy_threshold": True}, "finite"),
                       ({"fly": {"threshold": 1}}, "unknown per-request fly key 'threshold'"),
                       ({"fly": 3}, "must be an object"),
                       ({"fly_entropy_threshold": 1e30}, "above 1.099, the largest top-3")]:
        with pytest.raises(FlyConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            request_overrides(bad, 8)


def test_fsd_rule_config():
    _, fly = parse_fly_config({**BASE, "fly": {"rule": "fsd"}})
    assert (fly.rule, fly.fsd_divergence, fly.fsd_threshold, fly.fsd_variant) == (
        "fsd", "js", 0.4, "resample")
    _, fly = parse_fly_config({**BASE, "fly": {"rule": "fsd", "fsd_divergence": "tv",
                                               "fsd_threshold": 0.2,
                                               "fsd_variant": "fallback"}})
    assert (fly.fsd_divergence, fly.fsd_threshold, fly.fsd_variant) == (
        "tv", 0.2, "fallback")
    ngram = {"method": "fly", "prompt_lookup_max": 3, "num_speculative_tokens": 4}
    for cfg, words in [
        ({**BASE, "fly": {"rule": "fuzzy"}}, "fly.rule must be one of"),
        ({**ngram, "fly": {"rule": "fsd"}}, "the 'ngram' drafter proposes tokens without"),
        ({**BASE, "draft_sample_method": "probabilistic", "fly": {"rule": "fsd"}},
         "drafts greedily"),
        ({**BASE, "fly": {"rule": "fsd", "window": 2}}, "fly.window applies to rule 'fly'"),
        ({**BASE, "fly": {"fsd_threshold": 0.1}}, "fly.fsd_threshold applies to rule 'fsd'"),
        ({**BASE, "fly": {"rule": "fsd", "fsd_divergence": "kl"}}, "fsd_divergence must be"),
        ({**BASE, "fly": {"rule": "fsd", "fsd_variant": "x"}}, "fsd_variant must be"),
        ({**BASE, "fly": {"rule": "fsd", "fsd_divergence": "kl_draft_target"}},
         "fsd_threshold is required"),
        ({**BASE, "fly": {"rule": "fsd", "fsd_threshold": 0.7}}, "between 0 and 0.6931"),
        ({**BASE, "fly": {"rule": "fsd", "fsd_divergence": "tv", "fsd_threshold": -1}},
         "between 0 and 1"),
    ]:
        with pytest.raises(FlyConfigError, match=words):
            parse_fly_config(cfg)


def test_fsd_request_overrides():
    from fly_vllm.config import request_overrides

    _, fsd = parse_fly_config({**BASE, "fly": {"rule": "fsd"}})
    assert request_overrides({"fly_fsd_threshold": "0.1", "fly_strict": "false"}, 8, 3,
                             fsd) == {"fsd_threshold": 0.1, "strict": False}
    with pytest.raises(FlyConfigError, match="'window' for a server with rule 'fsd'"):
        request_overrides({"fly_window": 2}, 8, 3, fsd)
    with pytest.raises(FlyConfigError, match="between 0 and 0.6931"):
        request_overrides({"fly": {"fsd_threshold": 0.9}}, 8, 3, fsd)
    with pytest.raises(FlyConfigError, match="'fsd_threshold' for a server with rule 'fly'"):
        request_overrides({"fly_fsd_threshold": 0.1}, 8)


def test_vllm_speculative_keys_are_read_from_source_as_vllm_defines_them():
    """check-config reads SpeculativeConfig's fields from vLLM's source (no
    vLLM import); they are the imported dataclass's fields."""
    import dataclasses

    from fly_vllm.config.parse import _INTERNAL_VLLM_KEYS, _vllm_speculative_keys

    speculative = pytest.importorskip("vllm.config.speculative")
    fields = {f.name for f in dataclasses.fields(speculative.SpeculativeConfig)}
    assert _vllm_speculative_keys() == fields - _INTERNAL_VLLM_KEYS
    assert {"model", "num_speculative_tokens", "method"} <= _vllm_speculative_keys()
