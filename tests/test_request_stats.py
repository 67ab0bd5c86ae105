"""The per-request table: totals by the caller's id, bounded size."""

from __future__ import annotations

import numpy as np

from fly_vllm import metrics


def test_totals_by_external_id_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_SLOTS", 2)
    table = metrics.RequestTable(tmp_path)
    table.add(["7-abcdefgh", "8-12345678", None],
              np.array([[1, 4, 2, 1], [1, 4, 4, 0], [1, 4, 0, 0]]))
    table.add(["7-abcdefgh"], np.array([[1, 3, 0, 3]]))
    got = metrics.request_totals(tmp_path)
    assert got["7"] == {"steps": 2, "draft_tokens": 7, "native_accepted_tokens": 2,
                        "loose_accepted_tokens": 4}
    assert got["8"]["native_accepted_tokens"] == 4
    # A third request takes the oldest row: the table never grows.
    table.add(["9-zzzzzzzz"], np.array([[1, 2, 1, 0]]))
    got = metrics.request_totals(tmp_path)
    assert set(got) == {"8", "9"}
    # Ids that carry no vLLM suffix are kept whole.
    assert metrics._external_id("a-b") == "a-b" and metrics._external_id("x-1-abcdefgh") == "x-1"


def test_host_and_device_recording_count_the_same(monkeypatch):
    """The core's counters: the CPU path (numpy, written each step) and the
    accelerator path (torch, flushed later) add the same totals and the same
    per-request rows, run here both on CPU tensors."""
    import torch

    from fly_vllm.core.recording import StepCounts
    from fly_vllm.verifier import fly_verify
    from fly_vllm.verify_cases import CaseShape, make_case

    added: dict[str, list] = {"host": [], "device": []}
    rows: dict[str, list] = {"host": [], "device": []}
    which = ["host"]

    class Store:
        def add_array(self, counts):
            added[which[0]].append(np.asarray(counts, dtype=np.int64).copy())

    class Table:
        def add(self, ids, counts):
            rows[which[0]].append((list(ids), np.asarray(counts, dtype=np.int64).copy()))

    monkeypatch.setattr(metrics, "worker_store", Store)
    monkeypatch.setattr(metrics, "request_table", Table)
    g = torch.Generator().manual_seed(3)
    for i in range(25):
        args = make_case("fly", g, CaseShape(4, 1 + i % 6, 50, sampled=i % 2 == 0,
                                             veto=True, margin=i % 3 == 0), "cpu")
        B = args["cu_num_draft_tokens"].shape[0]
        args["entropy_threshold"] = torch.where(torch.rand(B, generator=g) < 0.3,
                                                float("inf"), 0.0)
        out = fly_verify(**args)
        masks = {"digits": torch.rand(out.native.shape[0], generator=g) < 0.4,
                 "judge": torch.rand(out.native.shape[0], generator=g) < 0.2}
        ids = [f"r{b}" for b in range(B)]
        for path in ("host", "device"):
            which[0] = path
            counts = StepCounts("fly")
            getattr(counts, f"_record_{path}")(out, args["cu_num_draft_tokens"], [
                out.native & out.in_prefix, out.loose_accepted, out.uncertain, out.gated,
                out.guard_vetoed,
                *[out.rule_vetoed & masks[r] if r in masks else torch.zeros_like(out.native)
                  for r in metrics.GUARD_RULES],
                out.prefix_exact], ids)
            counts.flush()
        host, device = sum(added["host"]), sum(added["device"])
        assert np.array_equal(host, device), i
    assert [r[0] for r in rows["host"]] == [r[0] for r in rows["device"]]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(rows["host"], rows["device"]))
    assert sum(added["host"])[metrics.INDEX["loose_accepted_tokens"]] > 0


def test_a_step_the_runner_verified_exactly_counts_as_the_rule_would(monkeypatch):
    """All-strict steps are verified by vLLM itself and counted from its
    accepted lengths (record_exact): the same totals and per-request rows
    as counting the exact rule's per-draft decisions."""
    import torch

    from fly_vllm.core.recording import StepCounts
    from fly_vllm.verifier import exact_verify
    from fly_vllm.verify_cases import CaseShape, make_case

    added = {"exact": np.zeros(metrics.NUM_SLOTS, np.int64),
             "rule": np.zeros(metrics.NUM_SLOTS, np.int64)}
    rows: dict[str, dict] = {"exact": {}, "rule": {}}
    which = ["exact"]

    class Store:
        def add_array(self, counts):
            added[which[0]][: len(counts)] += counts

        def add_first(self, drafts, draft_tokens, native_accepted):
            added[which[0]][:3] += [drafts, draft_tokens, native_accepted]

    class Table:
        def _add(self, rid, c):
            mine = rows[which[0]]
            mine[rid] = mine.get(rid, np.zeros(4, np.int64)) + c

        def add(self, ids, counts):
            for rid, c in zip(ids, np.asarray(counts, dtype=np.int64)):
                if c.any():
                    self._add(rid, c)

        def add_exact(self, rid, draft_tokens, native_accepted):
            self._add(rid, np.array([1, draft_tokens, native_accepted, 0]))

    monkeypatch.setattr(metrics, "worker_store", Store)
    monkeypatch.setattr(metrics, "request_table", Table)
    g = torch.Generator().manual_seed(5)
    for i in range(20):
        a = make_case("fly", g, CaseShape(4, 1 + i % 6, 40, sampled=i % 2 == 1), "cpu")
        out = exact_verify(a["draft_token_ids"], a["cu_num_draft_tokens"], a["target_logits"],
                           a["bonus_token_ids"], a["max_spec_len"],
                           **{k: a[k] for k in ("is_greedy", "target_probs", "draft_probs",
                                                "uniform_probs", "recovered_token_ids")
                              if k in a})
        n = torch.diff(a["cu_num_draft_tokens"].long(), prepend=torch.zeros(1)).long().tolist()
        ids = [f"r{i}-{b}" for b in range(len(n))]
        which[0] = "exact"
        # As each runner hands it over: a torch tensor, or numpy (V1 on the CPU).
        held = out.output_token_ids if i % 2 else out.output_token_ids.numpy()
        StepCounts("fly").record_exact((held >= 0).sum(1) - 1, n, ids)
        which[0] = "rule"
        none = torch.zeros_like(out.native)
        StepCounts("fly")._record_host(out, a["cu_num_draft_tokens"], [
            out.native & out.in_prefix, out.loose_accepted, out.uncertain, out.gated,
            out.guard_vetoed, *[none for _ in metrics.GUARD_RULES], out.prefix_exact], ids)
    assert np.array_equal(added["exact"], added["rule"])
    assert added["exact"][metrics.INDEX["native_accepted_tokens"]] > 0
    assert rows["exact"].keys() == rows["rule"].keys() and rows["exact"]
    assert all(np.array_equal(rows["exact"][r], rows["rule"][r]) for r in rows["exact"])
