"""Issue 15's targets checked against the phases of one report: each with what was measured, the goal, met or not."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FLOOR",
    "ORCHESTRATOR",
    "RESTATE",
    "GoalResult",
    "evaluate_goals",
    "setup_of",
]

FLOOR = "floor (4 calls)"
# The orchestrator as the docs tell a client to wait for the outcome: PlaceOrderAndWait.
ORCHESTRATOR = "orchestrator"
RESTATE = "restate"
ALL_SQLITE = "sqlite"
ALL_POSTGRESQL = "postgresql"

Phase = Mapping[str, Any]


@dataclass(frozen=True)
class GoalResult:
    """One target: what it asks, what the run measured (or why not), and whether it was met (None: not measured)."""

    key: str
    goal: str
    measured: str
    value: float | None
    threshold: float | None
    met: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "goal": self.goal,
            "measured": self.measured,
            "value": None if self.value is None else round(self.value, 4),
            "threshold": self.threshold,
            "met": self.met,
        }


def setup_of(phase: Phase) -> str:
    """The setup: "sqlite" or "postgresql" when orchestrator and services agree, else "mixed"."""
    ours = phase.get("database", ALL_SQLITE)
    services = phase.get("services_database", ALL_SQLITE)
    return str(ours) if ours == services else "mixed"


def _closed(phase: Phase, concurrency: int) -> bool:
    load = phase["load"]
    return bool(load.get("mode") == "closed" and load.get("concurrency") == concurrency)


def _rounds(phases: Sequence[Phase], target: str, concurrency: int, setup: str) -> dict[int, Phase]:
    return {
        int(p["round"]): p for p in phases if p["target"] == target and _closed(p, concurrency) and setup_of(p) == setup
    }


def _p50(phase: Phase) -> float | None:
    value = phase["completion_latency"].get("p50_ms")
    return None if value is None else float(value)


def _per_s(phase: Phase) -> float | None:
    value = phase.get("completed_per_s")
    return float(value) if value else None


def _cpu(phase: Phase, process: str) -> float | None:
    value = phase["processes"].get(process, {}).get("cpu_ms_per_saga")
    return float(value) if value else None


def _spread(values: Sequence[float], render: Callable[[float], str]) -> str:
    """How several rounds' values read: "median X (min-max, N rounds)"; one round shows nothing extra."""
    if len(values) < 2:
        return ""
    return f" (median of {len(values)} rounds; {render(min(values))} to {render(max(values))})"


def _paired(
    key: str,
    goal: str,
    threshold: float,
    at_most: bool,
    phases: Sequence[Phase],
    ours: str,
    theirs: str,
    concurrency: int,
    measure: Callable[[Phase, Phase], tuple[float | None, str]],
    render: Callable[[float], str],
    missing_theirs: str,
) -> GoalResult:
    """A target that compares `ours` with `theirs` round by round, in the all-SQLite setup, at one concurrency."""
    mine = _rounds(phases, ours, concurrency, ALL_SQLITE)
    other = _rounds(phases, theirs, concurrency, ALL_SQLITE)
    reason = ""
    if not any(_closed(p, concurrency) for p in phases):
        reason = f"the run had no C={concurrency} load (-c 1,32)"
    elif not mine:
        reason = f"no all-SQLite {ours} phase at C={concurrency} (run without --db)"
    elif not other:
        reason = missing_theirs
    values: list[float] = []
    detail = ""
    for round_number in sorted(set(mine) & set(other)):
        value, text = measure(mine[round_number], other[round_number])
        if value is not None:
            values.append(value)
            detail = detail or text
    if not reason and not values:
        reason = f"{ours} or {theirs} completed no saga at C={concurrency}"
    if reason:
        return GoalResult(key, goal, f"not measured: {reason}", None, threshold, None)
    value = statistics.median(values)
    measured = (detail if len(values) == 1 else render(value)) + _spread(values, render)
    met = value <= threshold if at_most else value >= threshold
    return GoalResult(key, goal, measured, value, threshold, met)


def _share(ours: Phase, theirs: Phase) -> tuple[float | None, str]:
    mine, other = _per_s(ours), _per_s(theirs)
    if mine is None or other is None:
        return None, ""
    return mine / other, f"{mine:.1f} / {other:.1f} sagas/s = {mine / other:.1%}"


def _times(ours: Phase, theirs: Phase) -> tuple[float | None, str]:
    mine, other = _per_s(ours), _per_s(theirs)
    if mine is None or other is None:
        return None, ""
    return mine / other, f"{mine:.1f} / {other:.1f} sagas/s = {mine / other:.2f}x"


def _p50_above(ours: Phase, theirs: Phase) -> tuple[float | None, str]:
    mine, other = _p50(ours), _p50(theirs)
    if mine is None or other is None:
        return None, ""
    return mine - other, f"{mine:.2f} - {other:.2f} ms = {mine - other:+.2f} ms"


def _cpu_ratio(ours: Phase, floor: Phase) -> tuple[float | None, str]:
    mine, client = _cpu(ours, "orchestrator"), _cpu(floor, "bench client")
    if mine is None or client is None:
        return None, ""
    return mine / client, f"{mine:.2f} / {client:.2f} ms = {mine / client:.2f}x"


def _across_setups(
    key: str,
    goal: str,
    threshold: float,
    at_most: bool,
    phases: Sequence[Phase],
    concurrency: int,
    value_of: Callable[[Phase], float | None],
    combine: Callable[[float, float], float],
    render: Callable[[float, float, float], str],
) -> GoalResult:
    """The orchestrator all on PostgreSQL against all on SQLite: the median of each setup's rounds, combined."""

    def values(setup: str) -> list[float]:
        found = (value_of(p) for p in _rounds(phases, ORCHESTRATOR, concurrency, setup).values())
        return [v for v in found if v is not None]

    sqlite, postgresql = values(ALL_SQLITE), values(ALL_POSTGRESQL)
    reason = ""
    if not any(_closed(p, concurrency) for p in phases):
        reason = f"the run had no C={concurrency} load (-c 1,32)"
    elif not postgresql:
        reason = "needs everything on PostgreSQL in the same run: --compare-postgres URL"
    elif not sqlite:
        reason = f"no all-SQLite orchestrator phase at C={concurrency}"
    if reason:
        return GoalResult(key, goal, f"not measured: {reason}", None, threshold, None)
    pg, lite = statistics.median(postgresql), statistics.median(sqlite)
    value = combine(pg, lite)
    met = value <= threshold if at_most else value >= threshold
    return GoalResult(key, goal, render(pg, lite, value), value, threshold, met)


def _not_in_bench(key: str, goal: str, where: str) -> GoalResult:
    return GoalResult(key, goal, f"not measured by saga bench: {where}", None, None, None)


def evaluate_goals(phases: Sequence[Phase]) -> list[GoalResult]:
    """Every target of issue 15, in its order, from one report's phases (dicts as `PhaseResult.as_dict` gives them).

    Floor and peer targets compare phases of the same round of the all-SQLite setup and take the
    median over rounds; the PostgreSQL targets compare the median of each setup's rounds.
    """
    no_floor = "no floor phase (drop --no-floor)"
    no_restate = "needs --peers restate"
    return [
        _paired(
            "sqlite_c32_share_of_floor", "SQLite, C=32: orchestrator (PlaceOrderAndWait) >= 65% of the floor",
            0.65, False, phases, ORCHESTRATOR, FLOOR, 32, _share, lambda v: f"{v:.1%}", no_floor,
        ),
        _paired(
            "c1_p50_above_floor", "C=1: orchestrator p50 <= floor p50 + 2 ms",
            2.0, True, phases, ORCHESTRATOR, FLOOR, 1, _p50_above, lambda v: f"{v:+.2f} ms", no_floor,
        ),
        _paired(
            "c32_cpu_vs_floor_client", "C=32: orchestrator CPU/saga <= 2x the floor client's CPU/saga",
            2.0, True, phases, ORCHESTRATOR, FLOOR, 32, _cpu_ratio, lambda v: f"{v:.2f}x", no_floor,
        ),
        _across_setups(
            "postgresql_c32_share_of_sqlite", "PostgreSQL, C=32: >= 90% of the all-SQLite throughput",
            0.90, False, phases, 32, _per_s, lambda pg, lite: pg / lite,
            lambda pg, lite, v: f"{pg:.1f} / {lite:.1f} sagas/s = {v:.1%}",
        ),
        _across_setups(
            "postgresql_c1_p50_above_sqlite", "PostgreSQL, C=1: p50 <= all-SQLite p50 + 2 ms",
            2.0, True, phases, 1, _p50, lambda pg, lite: pg - lite,
            lambda pg, lite, v: f"{pg:.2f} - {lite:.2f} ms = {v:+.2f} ms",
        ),
        _paired(
            "restate_c32", "Restate, C=32: orchestrator >= 3x Restate's throughput",
            3.0, False, phases, ORCHESTRATOR, RESTATE, 32, _times, lambda v: f"{v:.2f}x", no_restate,
        ),
        _paired(
            "restate_c1", "Restate, C=1: orchestrator >= 2x Restate's throughput",
            2.0, False, phases, ORCHESTRATOR, RESTATE, 1, _times, lambda v: f"{v:.2f}x", no_restate,
        ),
        _not_in_bench(
            "two_replicas_postgresql", "Two replicas on one PostgreSQL: no loss of total throughput", "not built yet"
        ),
        _not_in_bench("takeover_3s", "A dead replica's sagas taken over within 3 s of its death", "not built yet"),
        _not_in_bench("long_running", "Long-running figures", "python -m bench.long_running"),
    ]  # fmt: skip
