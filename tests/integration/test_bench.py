"""`saga bench` end to end: a short closed-loop run of the floor and the orchestrator on a real local stack."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bench.cli import app


def test_a_short_bench_reports_every_figure_as_json(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        ["bench", "-c", "4", "--duration", "1", "--warmup", "0.3", "--data-dir", str(tmp_path), "--output",
         str(output)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    by_target = {phase["target"]: phase for phase in report["phases"]}
    assert set(by_target) == {"floor (4 calls)", "orchestrator", "orchestrator-yaml"}
    # The YAML definition of the same saga, on a replica of its own, completes the same orders.
    assert set(by_target["orchestrator-yaml"]["outcomes"]) == {"COMPLETED"}
    ours = by_target["orchestrator"]
    # Every saga of the bench is an accepted order: nothing but COMPLETED.
    assert set(ours["outcomes"]) == {"COMPLETED"} and ours["completed_per_s"] > 0
    # The documented client way (PlaceOrderAndWait) has no separate start to time.
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        assert ours["start_latency"] is None or ours["start_latency"][key] <= ours["completion_latency"][key]
    assert set(ours["processes"]) == {"inventory", "payment", "shipping", "notify", "orchestrator", "bench client"}
    assert all(p["peak_rss_mib"] > 0 for p in ours["processes"].values())
    assert by_target["floor (4 calls)"]["start_latency"] is None
    # The table goes to stdout, with the ratio to the floor.
    assert "share_of_floor" in result.output
