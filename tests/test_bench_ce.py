"""`monet-fast bench ce` (monet_fast/bench/chunked_ce.py) through its registry entry, at a small
head: the full 152k x 3584 head is a GPU-sized measurement, the report plumbing is not."""

from __future__ import annotations

import pytest

from monet_fast.bench import REGISTRY, run_benchmark


def test_bench_ce_reports_plain_and_chunked_rows(monkeypatch):
    from monet_fast.bench import chunked_ce as bench

    assert REGISTRY["ce"] == "monet_fast.bench.chunked_ce:run"
    # 1000 rows x 4096 vocab: the plain loss keeps fp32 [N, V] logits (15.6 MiB) for backward,
    # the chunked one only [N, 256] slices at a time.
    monkeypatch.setattr(bench, "VOCAB", 4096)
    monkeypatch.setattr(bench, "HIDDEN", 32)
    report = run_benchmark("ce", quick=True)
    assert report.skipped is None
    rows = {r["provider"]: r for r in report.rows}
    assert list(rows) == ["plain", "chunked 256"]
    plain, chunked = rows["plain"], rows["chunked 256"]
    assert plain["config"].startswith("1000 rows x 4096 vocab, head frozen")
    assert plain["saved_act_mib"] >= 1000 * 4096 * 4 / 2**20
    assert chunked["saved_act_mib"] < plain["saved_act_mib"] / 4
    assert chunked["speedup"] == pytest.approx(plain["seconds"] / chunked["seconds"])
    assert "speedup" not in plain and all(r["seconds"] > 0 for r in report.rows)
