"""`fly-vllm judge train` on synthetic mining folders (no vLLM): a planted
signal is found and held out honestly, noise scores as chance, the split is
by item, and bad folders exit 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fly_vllm.bench.parting import separation
from fly_vllm.cli import main as cli_main
from fly_vllm.judge.evaluate import auc, recall_threshold
from fly_vllm.judge.features import assemble
from fly_vllm.judge.fit import make_pipeline
from fly_vllm.judge.head import JudgeHead
from fly_vllm.judge.train import AUTO_SPECS, labelled_rows, load_mining, split_items, train

H = 16
SMALL_GRID = (0.01, 1.0)


def mining_folder(path, n_items=60, per_item=8, signal="h_post", strength=2.5, seed=0,
                  unlabelled=0, labels=None, direction_seed=None):
    """A mining folder with labels drawn from a logistic model of one planted
    signal: "h_post" (a random direction), "margin", or None (pure noise).
    ``direction_seed`` draws h_post's direction apart from the rows, so two
    folders of other sizes or seeds share it."""
    rng = np.random.default_rng(seed)
    n = n_items * per_item
    data = {
        "item": np.repeat(np.arange(100, 100 + n_items), per_item).astype(np.int64),
        "pos": np.tile(np.arange(per_item), n_items).astype(np.int64),
        "draft": rng.integers(0, 50, n).astype(np.int64),
        "target": rng.integers(0, 50, n).astype(np.int64),
        "h_post": rng.normal(size=(n, H)).astype(np.float32),
        "h_pre": rng.normal(size=(n, H)).astype(np.float32),
        "entropy": rng.uniform(0, 1.1, n).astype(np.float32),
        "draft_logprob": -rng.exponential(2.0, n).astype(np.float32),
        "top_logprob": -rng.exponential(0.3, n).astype(np.float32),
    }
    data["margin"] = (data["top_logprob"] - data["draft_logprob"]).astype(np.float32)
    if signal == "h_post":
        d_rng = rng if direction_seed is None else np.random.default_rng(direction_seed)
        z = data["h_post"] @ d_rng.normal(size=H) / np.sqrt(H) * strength
    elif signal == "margin":
        m = data["margin"]
        z = (m - m.mean()) / m.std() * strength
    else:
        z = np.zeros(n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int8)
    if labels is not None:
        y = np.full(n, labels, dtype=np.int8)
    y[rng.permutation(n)[:unlabelled]] = -1
    data["important"] = y
    data["margin"][:3] = np.inf  # a placeholder draft's margin
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "dataset.npz", **data)
    meta = {"pair": {"target": "org/target-1b", "drafter": "org/draft-0.1b", "hidden_size": H,
                     "vocab_size": 50}, "task": "gsm8k", "k": 4, "items": n_items}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_planted_signal_through_cli(tmp_path, capsys):
    """`fly-vllm judge train` finds a linear signal in h_post on held-out
    items, writes the head and report, and the saved head scores as a
    sklearn pipeline refitted on the training items does."""
    mine = mining_folder(tmp_path / "mine")
    rc = cli_main(["judge", "train", str(mine), "--C", "0.01,0.1,1", "--bootstrap", "200"])
    assert rc == 0
    assert "chosen: features h_post" in capsys.readouterr().out
    head = JudgeHead.load(mine / "head.json")
    s = head.summary
    assert head.features == ("h_post",)
    assert head.pair["target"] == "org/target-1b" and head.pair["hidden_size"] == H
    assert s["mining"] == {"task": "gsm8k", "k": 4, "items": 60}
    assert s["test_auc"] > 0.8 and s["test_auc_ci"][0] > 0.6
    assert s["n_test_items"] == 12 and s["n_train_items"] == 48
    assert 0.0 < head.threshold < 1.0
    assert s["command"].startswith("fly-vllm judge train ")
    report = json.loads((mine / "train-report" / "report.json").read_text())
    assert report["summary"]["test_auc"] == s["test_auc"]
    assert report["head_reproduction_max_abs_diff"] < 1e-4
    assert (mine / "train-report" / "pr.png").stat().st_size > 1000
    assert "| h_post (chosen) |" in (mine / "train-report" / "report.md").read_text()

    # An independent refit of the chosen C on the training items, scored on
    # the held-out ones, matches the file.
    data, _ = load_mining(mine)
    test = np.isin(data["item"], report["test_items"])
    pipe = make_pipeline(s["C"]).fit(assemble(data, ["h_post"])[~test], data["important"][~test])
    x_te = assemble({k: v[test] for k, v in data.items()}, head.features)
    cal = s["calibration"]
    p = 1 / (1 + np.exp(-(cal["a"] * pipe.decision_function(x_te) + cal["c"])))
    assert np.abs(head.score_numpy(x_te) - p).max() < 1e-4
    assert "## Calibration" in (mine / "train-report" / "report.md").read_text()
    assert auc(data["important"][test], head.score_numpy(x_te)) == pytest.approx(s["test_auc"])


def test_platt_scaling_undoes_overconfidence():
    """Logits three times too large, and the order kept: a near 1/3, the
    calibrated p matching the observed rate by group; a reversed or flat
    signal is left alone."""
    from fly_vllm.judge.evaluate import reliability
    from fly_vllm.judge.fit import platt, sigmoid

    rng = np.random.default_rng(5)
    true = rng.normal(size=20000) * 1.5 - 1.0
    y = (rng.random(true.shape[0]) < sigmoid(true)).astype(int)
    a, c = platt(3 * true, y)
    assert a == pytest.approx(1 / 3, rel=0.08) and c == pytest.approx(0.0, abs=0.1)
    for g in reliability(sigmoid(a * 3 * true + c), y):
        assert g["mean_p"] == pytest.approx(g["important"], abs=0.03)
    over = reliability(sigmoid(3 * true), y)
    assert over[0]["mean_p"] < over[0]["important"] - 0.03  # before: too sure
    assert platt(-true, y) == (1.0, 0.0)
    assert reliability(np.array([0.1, 0.9]), np.array([0, 1]), bins=5) == [
        {"n": 1, "mean_p": 0.1, "important": 0.0}, {"n": 1, "mean_p": 0.9, "important": 1.0}]


def test_noise_scores_as_chance(tmp_path):
    data, meta = load_mining(mining_folder(tmp_path, signal=None))
    t = train(data, meta, specs=[("h_post",)], c_grid=SMALL_GRID, n_boot=300)
    s = t.head.summary
    lo, hi = s["test_auc_ci"]
    assert lo < 0.5 < hi
    assert abs(s["test_auc"] - 0.5) < 0.2
    assert abs(s["cv_auc"] - 0.5) < 0.1


def test_split_is_by_item():
    item = np.repeat(np.arange(37), 5)
    train_items, test_items = split_items(item, 0.2, seed=3)
    assert not set(train_items) & set(test_items)
    assert set(train_items) | set(test_items) == set(range(37))
    assert len(test_items) == 7
    again = split_items(item, 0.2, seed=3)
    assert np.array_equal(again[1], test_items)
    assert not np.array_equal(split_items(item, 0.2, seed=4)[1], test_items)
    # No item has rows on both sides.
    rows_te = np.isin(item, test_items)
    assert not set(item[rows_te]) & set(item[~rows_te])


def test_unlabelled_rows_are_dropped(tmp_path):
    data, meta = load_mining(mining_folder(tmp_path, unlabelled=100))
    kept = labelled_rows(data)
    assert kept["item"].shape[0] == 380 and set(np.unique(kept["important"])) == {0, 1}
    t = train(data, meta, specs=[("h_post",)], c_grid=(0.1,), n_boot=50)
    assert t.head.summary["n_labels"] == 380
    assert t.head.summary["n_unlabelled_dropped"] == 100
    assert t.head.summary["n_train_rows"] + t.head.summary["n_test_rows"] == 380


@pytest.mark.parametrize("case, folder_kw, extra, message", [
    ("one class", {"labels": 0}, [], "all 480 labelled mismatches are unimportant"),
    ("few items", {"n_items": 4, "per_item": 10}, [], "from 4 items, fewer than --folds 5"),
    ("few labels", {"n_items": 6, "per_item": 3}, [], "only 18 labelled mismatches"),
    ("bad feature", {}, ["--features", "h_post,logits"], "unknown judge feature 'logits'"),
    ("no folder", None, [], "not found"),
])
def test_bad_input_exits_2(tmp_path, capsys, case, folder_kw, extra, message):
    mine = tmp_path / "mine"
    if folder_kw is not None:
        mining_folder(mine, **folder_kw)
    rc = cli_main(["judge", "train", str(mine), *extra])
    err = capsys.readouterr().err
    assert rc == 2, case
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (mine / "head.json").exists()


def test_auto_picks_the_spec_with_the_signal(tmp_path):
    data, meta = load_mining(mining_folder(tmp_path, signal="margin", strength=2.0))
    t = train(data, meta, specs=AUTO_SPECS, c_grid=SMALL_GRID, n_boot=50)
    s = t.head.summary
    assert "margin" in s["features"]
    assert [row["features"] for row in s["ablation"]] == [list(x) for x in AUTO_SPECS]
    by_spec = {"+".join(row["features"]): row["cv_auc"] for row in s["ablation"]}
    assert by_spec["h_pre"] < 0.6 < by_spec["margin+entropy+draft_logprob+top_logprob"]
    # The raw margin baseline sees it too, on the same held-out rows.
    assert s["baselines"]["margin"]["auc"] > 0.7


def test_threshold_and_auc_definitions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = rng.random(200)
    t = recall_threshold(p, y, 0.9)
    assert (p[y == 1] >= t).mean() >= 0.9
    assert (p[y == 1] >= np.nextafter(t, 1.0)).mean() < 0.9  # the largest such t
    # AUC is parting.separation's figure, ties and infinities included.
    s = np.round(rng.normal(size=200), 1)
    s[:5] = np.inf
    assert auc(y, s) == pytest.approx(separation(list(s[y == 1]), list(s[y == 0])))
    assert auc(np.ones(4), np.arange(4)) is None


def test_judge_dispatch_unknown_verb(capsys):
    assert cli_main(["judge", "distil"]) == 2
    assert "unknown verb 'distil'" in capsys.readouterr().err


def test_assess_a_head_on_items_it_never_saw(tmp_path, capsys):
    """`fly-vllm judge assess`: the planted signal holds on a second folder
    of the same generator; the head's own items are dropped, not scored;
    the noise folder scores as chance; another pair exits 2."""
    from fly_vllm.judge.assess import assess

    mine = mining_folder(tmp_path / "mine", n_items=40, strength=4.0, direction_seed=7)
    assert cli_main(["judge", "train", str(mine), "--C", "0.01,0.1,1", "--bootstrap",
                     "50"]) == 0
    head = JudgeHead.load(mine / "head.json")
    head.summary["mining"]["items"] = [f"gsm8k-{i}" for i in range(100, 140)]
    head.save(tmp_path / "head.json")
    # The same direction, other rows: items 100-139 count as seen, 140-179 are new.
    other = mining_folder(tmp_path / "other", n_items=60, seed=1, strength=4.0,
                          direction_seed=7)
    data = dict(np.load(other / "dataset.npz"))
    data["item"] = data["item"] + 20
    np.savez(other / "dataset.npz", **data)
    js = tmp_path / "r.json"
    assert cli_main(["judge", "assess", str(other), "--head", str(tmp_path / "head.json"),
                     "--threshold", "0.3", "--json", str(js), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    r = json.loads(js.read_text())
    assert r["dropped_seen"] == {"rows": 20 * 8, "items": 20}
    assert r["n_items"] == 40 and r["n_labels"] == 40 * 8
    assert r["auc"]["head"]["auc"] > 0.8 and r["auc"]["head"]["auc_ci"][0] > 0.7
    assert abs(r["auc"]["margin"]["auc"] - 0.5) < 0.15
    assert [c["threshold"] for c in r["thresholds"]] == [head.threshold, 0.3]
    low = r["thresholds"][1]
    p = JudgeHead.load(tmp_path / "head.json").score_numpy(
        assemble({"h_post": data["h_post"][160:]}, ("h_post",)))
    y = data["important"][160:]
    assert low["accepted_unimportant"] == pytest.approx(float((p[y == 0] < 0.3).mean()))
    assert low["important_of_accepted"] == pytest.approx(float(y[p < 0.3].mean()))
    assert "dropped 160 rows of 20 items the head was mined on" in out
    noise = assess(dict(np.load(mining_folder(tmp_path / "noise", signal=None, seed=3)
                                / "dataset.npz")),
                   {"pair": head.pair, "task": "gsm8k"}, head, n_boot=50)
    assert abs(noise["auc"]["head"]["auc"] - 0.5) < 0.1
    meta = json.loads((other / "meta.json").read_text())
    meta["pair"]["hidden_size"] = H * 2
    (other / "meta.json").write_text(json.dumps(meta))
    assert cli_main(["judge", "assess", str(other), "--head", str(tmp_path / "head.json")]) == 2
    err = capsys.readouterr().err
    assert "trained for another pair" in err and "hidden_size 32" in err
