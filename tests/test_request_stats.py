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
