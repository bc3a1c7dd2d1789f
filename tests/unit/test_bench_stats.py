"""The benchmark's arithmetic: nearest-rank percentiles, summaries, /proc parsing and the floor and peer ratios."""

from __future__ import annotations

import json
import math
import os

import pytest

from bench.cli import comparisons
from bench.loadgen import Load, PhaseResult, ProcessFigures
from bench.stats import (
    clear_peak_rss,
    cpu_ms_per_item,
    parse_stat_cpu_ms,
    parse_status_kib,
    percentile,
    read_process,
    summarize,
)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.0) == 1
    # Ten values: p50 is the 5th, p95 and p99 round up to the 10th.
    ten = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert percentile(ten, 0.5) == 50
    assert percentile(ten, 0.95) == 100
    assert percentile(ten, 0.91) == 100
    assert percentile(ten, 0.90) == 90


def test_percentile_ignores_input_order_and_handles_edges() -> None:
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        percentile([1.0], 1.5)


def test_summarize_reports_milliseconds() -> None:
    summary = summarize([0.001, 0.002, 0.003, 0.004])
    assert summary.count == 4
    assert summary.p50_ms == pytest.approx(2.0)
    assert summary.p99_ms == pytest.approx(4.0)
    assert summary.mean_ms == pytest.approx(2.5)
    empty = summarize([])
    assert empty.count == 0 and math.isnan(empty.p50_ms)
    # JSON has no NaN: an empty summary serializes with nulls.
    assert json.loads(json.dumps(empty.as_dict(), allow_nan=False))["p50_ms"] is None


def test_stat_line_parsing_survives_odd_process_names() -> None:
    # Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "4242 (python -m (odd) x) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0"
    assert parse_stat_cpu_ms(line, ticks_per_second=100) == pytest.approx(3000.0)
    status = "Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\nThreads:\t7\n"
    assert parse_status_kib(status, "VmHWM") == 123456
    assert parse_status_kib(status, "VmRSS") == 65432
    assert parse_status_kib(status, "VmSwap") == 0


def test_reading_this_process_from_proc() -> None:
    before = read_process(os.getpid())
    assert before is not None
    sum(i * i for i in range(200_000))  # burn a little CPU
    after = read_process(os.getpid())
    assert after is not None
    assert after.cpu_ms >= before.cpu_ms
    assert 0 < after.rss_kib <= after.peak_rss_kib
    assert clear_peak_rss(os.getpid()) in (True, False)
    assert cpu_ms_per_item(before, after, 4) == pytest.approx((after.cpu_ms - before.cpu_ms) / 4)
    assert math.isnan(cpu_ms_per_item(before, after, 0))
    assert math.isnan(cpu_ms_per_item(None, after, 4))
    assert read_process(2**22 + 12345) is None


def _phase(target: str, per_s: float, p50_ms: float, load: Load) -> PhaseResult:
    latency = summarize([p50_ms / 1000])
    return PhaseResult(
        target=target,
        load=load,
        round=1,
        window_seconds=10.0,
        outcomes={"COMPLETED": int(per_s * 10)},
        completed_per_second=per_s,
        start_latency=None,
        completion_latency=latency,
        processes=[ProcessFigures("orchestrator", 1, 2.0, 0.5, 80.0, 70.0, 71.0)],
        load_average=(1.0, math.nan),
    )


def test_comparisons_give_the_share_of_the_floor_and_the_multiple_of_each_peer() -> None:
    c32, c1 = Load(concurrency=32), Load(concurrency=1)
    phases = [
        _phase("floor (4 calls)", 800.0, 30.0, c32),
        _phase("orchestrator", 400.0, 80.0, c32),
        _phase("temporal (activities)", 8.0, 4000.0, c32),
        _phase("floor (4 calls)", 300.0, 3.0, c1),
        _phase("orchestrator", 150.0, 4.5, c1),
    ]
    report = {"phases": [p.as_dict() for p in phases]}
    json.dumps(report, allow_nan=False)
    rows = {row["load"]: row for row in comparisons(report)}
    assert rows["C=32"]["share_of_floor"] == pytest.approx(0.5)
    assert rows["C=32"]["x_temporal (activities)"] == pytest.approx(50.0)
    assert rows["C=1"]["p50_above_floor_ms"] == pytest.approx(1.5)
    assert "x_temporal (activities)" not in rows["C=1"]
