"""benchmarks/frontier.py: settings from configs, gains over strict at the
same K, the screen's Pareto front, the choice of the best evaluated point,
and speed ratios over interleaved rounds (the parting profile and the loose
budget it reads: test_parting.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT, gsm8k_folder

spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
frontier = importlib.util.module_from_spec(spec)
spec.loader.exec_module(frontier)


def point(name, K, agreement, length, **fly):
    return {"name": name, "set": "evaluation", "agreement": agreement,
            "mean_accepted_length": length,
            "datasets": {"gsm8k": {"n": 100, "mean_accepted_length": length}},
            "settings": frontier.settings_of({"num_speculative_tokens": K, "fly": fly})}


def test_settings_of_configs():
    assert frontier.settings_of(None) is None
    assert frontier.settings_of({"num_speculative_tokens": 8, "fly": {"strict": True}}) == {
        "K": 8, "strict": True}
    s = frontier.settings_of({"num_speculative_tokens": 8,
                              "fly": {"gate": "margin", "margin": 0.3, "window": 6}})
    assert s == {"K": 8, "gate": "margin", "margin": 0.3, "window": 6,
                 "strict_prefix_tokens": 0}
    s = frontier.settings_of({"num_speculative_tokens": 4, "fly": {}})
    assert (s["gate"], s["entropy_threshold"], s["window"]) == ("entropy", 0.3, 3)


def test_judge_points_name_their_threshold(tmp_path):
    """A judge point's threshold is its config's, else its head file's
    default, else unknown (a head that cannot be read here)."""
    from fly_vllm.judge.head import JudgeHead

    head = tmp_path / "head.json"
    JudgeHead(("margin",), [1.0], 0.0, [0.0], [1.0], 0.0042,
              {"target": "t", "drafter": "d", "hidden_size": 8, "vocab_size": 10}).save(head)
    s = frontier.settings_of
    judge = {"gate": "judge", "judge_path": str(head), "window": 0}
    assert s({"num_speculative_tokens": 8, "fly": judge}) == {
        "K": 8, "gate": "judge", "judge_threshold": 0.0042, "window": 0,
        "strict_prefix_tokens": 0}
    assert frontier.point_label(s({"num_speculative_tokens": 8, "fly": {
        **judge, "judge_threshold": 6.72e-05}})) == "6.7e-05 W0"
    gone = s({"num_speculative_tokens": 8, "fly": {**judge, "judge_path": str(tmp_path / "x")}})
    assert gone["judge_threshold"] is None and frontier.point_label(gone) == "head's W0"
    assert frontier.point_order({"settings": gone}) < frontier.point_order({"settings": s(
        {"num_speculative_tokens": 8, "fly": judge})})


def test_gains_pareto_and_best():
    pts = [point("strict K4", 4, 1.0, 4.0, strict=True),
           point("strict K8", 8, 0.99, 5.0, strict=True),
           point("a", 4, 0.98, 4.2, gate="margin", margin=0.1, window=2),
           point("b", 4, 0.90, 4.6, gate="margin", margin=0.7, window=2),
           point("c", 8, 0.97, 6.0, gate="margin", margin=0.3, window=6),
           point("d", 4, 0.85, 4.4, entropy_threshold=0.3, window=2)]
    frontier.add_gains(pts)
    gains = {p["name"]: p.get("gain_over_strict") for p in pts}
    assert gains["a"] == pytest.approx(1.05) and gains["c"] == pytest.approx(1.2)
    assert gains["strict K8"] == pytest.approx(1.0)
    # b and d are beaten by c (more agreement and more gain); a and c are not.
    assert [p["name"] for p in frontier.pareto(pts)] == ["a", "c"]
    assert [p["name"] for p in frontier.pareto(pts[:4])] == ["a", "b"]
    best = frontier.pick_best(pts, 0.97)
    assert best["name"] == "c" and best["meets_agreement"]
    best = frontier.pick_best(pts, 0.99)
    assert best["name"] == "a" and best["meets_agreement"] is False


def test_gain_compares_only_the_items_both_ran():
    # Strict has finished GSM8K parts 1-2 and a HumanEval part; the loose
    # mode only GSM8K part 1: its gain is over GSM8K part 1's figure only if
    # the counts match, so here (100 items against 200) it has none, and
    # HumanEval, which it has not reached, never enters.
    def ds(n, steps, acc):
        return {"n": n, "spec_steps": steps, "accepted_tokens": acc,
                "mean_accepted_length": 1 + acc / steps}
    strict = point("strict K4", 4, 1.0, 0, strict=True)
    strict["datasets"] = {"gsm8k": ds(200, 100, 300), "humaneval": ds(100, 100, 400)}
    loose = point("m", 4, 0.9, 0, gate="margin", margin=0.3, window=2)
    loose["datasets"] = {"gsm8k": ds(100, 50, 160)}
    frontier.add_gains([strict, loose])
    assert "gain_over_strict" not in loose
    loose["datasets"] = {"gsm8k": ds(200, 100, 330)}
    frontier.add_gains([strict, loose])
    assert loose["gain_over_strict"] == pytest.approx(4.3 / 4.0)
    loose["datasets"]["humaneval"] = ds(100, 100, 410)
    frontier.add_gains([strict, loose])
    assert loose["gain_over_strict"] == pytest.approx((1 + 740 / 200) / (1 + 700 / 200))


def test_an_unfinished_point_gains_on_the_items_both_ran():
    """The per-output counters give the gain where the datasets' counts
    differ: pooled over the common items only, and add_gains' figure is
    kept where it exists."""
    def out(i, group, steps, native, loose=0):
        return {"id": f"{group}-{i}", "group": group,
                "fly_stats": {"steps": steps, "native_accepted_tokens": native,
                              "loose_accepted_tokens": loose}}

    def raw(mode, results):
        return {"mode": mode, "temperature": 0, "run": {"results": results}}

    strict = point("strict K4", 4, 1.0, 0, strict=True)
    loose = point("m", 4, 0.9, 0, gate="margin", margin=0.3, window=2)
    other = point("m2", 4, 0.9, 0, gate="margin", margin=0.7, window=2)
    other["gain_over_strict"] = 1.5
    raws = [raw("strict K4", [out(0, "gsm8k", 10, 20), out(1, "gsm8k", 10, 40),
                              out(0, "humaneval", 5, 15)]),
            raw("m", [out(0, "gsm8k", 8, 20, 6), out(0, "humaneval", 4, 12, 2)]),
            raw("m2", [out(0, "gsm8k", 1, 1)])]
    frontier.add_item_gains([strict, loose, other], raws)
    assert loose["gain_over_strict"] == pytest.approx((1 + 40 / 12) / (1 + 35 / 15))
    assert loose["gain_items"] == 2 and "gain_items" not in strict
    assert other["gain_over_strict"] == 1.5 and "gain_items" not in other
    assert "(on its 2 items)" in frontier.table([{
        **frontier.describe({**loose, "datasets": {}, "mean_accepted_length": 4.0})}])[2]


def test_speed_ratios_take_the_median_over_rounds(tmp_path):
    def rnd(i, rates):
        table = [{"mode": m, "concurrency": 1, "metrics": {"tokens": 100 * r, "time_s": 100},
                  "spec": spec_} for m, (r, spec_) in rates.items()]
        d = tmp_path / f"round-{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"table": table}))

    strict = {"num_speculative_tokens": 8, "fly": {"strict": True}}
    loose = {"num_speculative_tokens": 8, "fly": {"gate": "margin", "margin": 0.3}}
    strict4 = {"num_speculative_tokens": 4, "fly": {"strict": True}}
    for i, (t, s, x, s4) in enumerate([(10, 20, 22, 24), (10, 20, 26, 19), (10, 20, 21, 25)],
                                      1):
        rnd(i, {"no-spec": (t, None), "strict K8": (s, strict), "m": (x, loose),
                "strict K4": (s4, strict4)})
    r = frontier.speed_ratios(tmp_path)
    assert r["m"]["tok_s_vs_strict_at_1"] == pytest.approx(1.1)
    assert r["m"]["tok_s_vs_strict_at_1_rounds"] == pytest.approx([1.1, 1.3, 1.05])
    assert r["strict K8"]["tok_s_vs_target_at_1"] == pytest.approx(2.0)
    # The fastest strict K of each round: K4, K8 (20 > 19), K4.
    assert r["m"]["tok_s_vs_fastest_strict_at_1_rounds"] == pytest.approx(
        [22 / 24, 26 / 20, 21 / 25])
    assert r["strict K4"]["tok_s_vs_fastest_strict_at_1_rounds"] == pytest.approx(
        [1.0, 19 / 20, 1.0])


def test_table_rows_show_each_dataset_and_the_speed_rounds():
    p = {"name": "m", "set": "evaluation", "mean_accepted_length": 4.5,
         "mean_accepted_length_by_dataset": {"gsm8k": 4.4, "humaneval": 4.8},
         "gain_over_strict": 1.01, "retention": {}, "retention_ci": {}, "flips": {},
         "output_length_ratio_by_dataset": {}, "identical": {}, "first_parting_median": {},
         "capped": {}, "tok_s_vs_strict_at_1": 0.999,
         "tok_s_vs_strict_at_1_rounds": [1.003, 0.996]}
    header, rule, row = frontier.table([p])
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert len(cells) == header.count("|") - 1 == rule.count("---")
    assert cells[2] == "4.50 (4.40 / 4.80)"
    assert cells[-1] == "0.999x (1.003, 0.996)"
    fast = dict(p, tok_s_vs_fastest_strict_at_1=0.97, tok_s_vs_fastest_strict_at_1_rounds=[
        0.96, 0.98])
    cells = [c.strip() for c in frontier.table([fast])[2].split("|")[1:-1]]
    assert cells[-1] == "0.999x (1.003, 0.996); vs the fastest strict K 0.960, 0.980"
    # one dataset, no speed run: the pooled figure alone and a dash
    one = dict(p, mean_accepted_length_by_dataset={"gsm8k": 4.5})
    del one["tok_s_vs_strict_at_1"]
    cells = [c.strip() for c in frontier.table([one])[2].split("|")[1:-1]]
    assert cells[2] == "4.50" and cells[-1] == "–"


def test_point_labels_name_thresholds_and_unusual_windows():
    s = frontier.settings_of
    assert frontier.point_label(s({"num_speculative_tokens": 4,
                                   "fly": {"gate": "margin", "margin": 0.3, "window": 2}})) == "0.3"
    assert frontier.point_label(s({"num_speculative_tokens": 4, "fly": {
        "gate": "both", "entropy_threshold": 0.6, "margin": 0.7, "window": 3,
        "strict_prefix_tokens": 128}})) == "0.6/0.7 W3 N128"
    assert frontier.point_label(s({"num_speculative_tokens": 8,
                                   "fly": {"entropy_threshold": 0.9}})) == "0.9"


def test_no_best_while_the_evaluation_is_unfinished(tmp_path):
    """An evaluation scored before all its parts ran: its points say so, in
    summary.json and tables.md, and no best is chosen from them."""
    def results(d, rows):
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "settings": {"items": {"gsm8k": 4}, "skipped": None, "model": str(d / "none")},
            "environment": {"machine": "test"}, "table": rows}))

    def row(mode, spec, length, agree, **extra):
        m = {"n": 4, "mean_accepted_length": length, "answer_agreement": agree,
             "answer_agreement_exact_ci": [agree - 0.2, 1.0], "answer_agreement_k": 4,
             "output_length_ratio": 1.0}
        return {"mode": mode, "temperature": 0, "dataset": "gsm8k", "spec": spec,
                "metrics": m, **extra}

    strict = {"num_speculative_tokens": 4, "fly": {"strict": True}}
    loose = {"num_speculative_tokens": 4, "fly": {"gate": "margin", "margin": 0.1,
                                                   "window": 2}}
    results(tmp_path / "screen", [row("no-spec", None, None, 1.0),
                                  row("strict K4", strict, 4.0, 1.0),
                                  row("margin 0.1 K4 W2", loose, 4.4, 0.98)])
    results(tmp_path / "eval", [row("no-spec", None, None, 1.0),
                                row("strict K4", strict, 4.0, 1.0),
                                row("margin 0.1 K4 W2", loose, 4.4, 0.98,
                                    unfinished={"parts": 1, "of": 5})])
    out = tmp_path / "out"
    assert frontier.main(["--screen", str(tmp_path / "screen"), "--eval",
                          str(tmp_path / "eval"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"] is None
    assert summary["evaluation_unfinished"] == ["margin 0.1 K4 W2"]
    (ev,) = [p for p in summary["points"] if p["set"] == "evaluation"
             and p["name"] == "margin 0.1 K4 W2"]
    assert ev["unfinished"] == {"parts": 1, "of": 5} and ev["items"] == {"gsm8k": 4}
    assert "| margin 0.1 K4 W2 (1 of 5 parts) | evaluation |" in (out / "tables.md").read_text()


def test_strict_ceilings_read_strict_runs_at_the_lowest_measured_change_rate(tmp_path):
    """Each strict run's ceiling, at its own K, at the lowest rate at which a
    loose point's parted outputs changed their answers."""
    from fly_vllm.bench import parting

    gsm8k_folder(tmp_path, 4)

    def raw(mode, spec, outs):
        res = [{"id": f"gsm8k-{i}", "group": "gsm8k", "token_ids": ids, "text": f"#### {a}",
                "fly_stats": {"steps": steps, "loose_accepted_tokens": 0}}
               for i, (ids, a, steps) in enumerate(outs)]
        (tmp_path / "raw" / f"{mode.replace(' ', '-')}.json").write_text(json.dumps(
            {"mode": mode, "spec": spec, "temperature": 0, "run": {"results": res}}))

    ids = list(range(20))
    raw("no-spec", None, [(ids, i, 0) for i in range(4)])
    raw("strict K4", {"num_speculative_tokens": 4, "fly": {"strict": True}},
        [(ids, i, s) for i, s in enumerate((10, 4, 8, 5))])
    # Two loose points: one parts 2 outputs and changes 1 answer (50%), the
    # other parts 4 and changes 1 (25%, the lower rate).
    raw("a", {"num_speculative_tokens": 4, "fly": {"gate": "margin"}},
        [(ids, 0, 4), (ids[:-1] + [99], 1, 4), (ids[:-1] + [99], 7, 4), (ids, 3, 4)])
    raw("b", {"num_speculative_tokens": 4, "fly": {"gate": "margin"}},
        [([99] + ids[1:], 0, 4), ([99] + ids[1:], 1, 4), ([99] + ids[1:], 2, 4),
         ([99] + ids[1:], 8, 4)])
    prof = parting.divergence_profile(tmp_path)
    assert prof["a"]["changed_given_parted"] == 0.5
    assert prof["b"]["changed_given_parted"] == 0.25
    got = frontier.strict_ceilings(parting.harness_raws(tmp_path), prof, 0.97)
    assert list(got) == ["strict K4"]
    assert got["strict K4"] == parting.ceiling([(20, 10), (20, 4), (20, 8), (20, 5)], 4, 0.25)
    # Without a loose point's parted outputs there is no rate to use.
    assert frontier.strict_ceilings(parting.harness_raws(tmp_path), {}, 0.97) == {}
