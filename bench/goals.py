"""Issue 15's targets checked against the phases of one report: each with what was measured, the goal, met or not."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FLOOR",
    "ORCHESTRATOR",
    "REPLICAS",
    "RESTATE",
    "GoalResult",
    "evaluate_goals",
    "setup_of",
]

FLOOR = "floor (4 calls)"
# The orchestrator as the docs tell a client to wait for the outcome: PlaceOrderAndWait.
ORCHESTRATOR = "orchestrator"
RESTATE = "restate"
# Two orchestrator replicas on one PostgreSQL database, the client alternating (bench.replicas.REPLICAS).
REPLICAS = "orchestrator (2 replicas)"
# Two replicas' total against one's: "no loss", within the noise of one short window on a shared machine.
REPLICAS_SHARE = 0.95
TAKEOVER_SECONDS = 3.0
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


def _split(phase: Phase) -> str:
    """How a two-replica phase's sagas were shared: "orchestrator 1,234 / orchestrator-b 1,200"."""
    replicas = phase.get("replicas") or {}
    parts = []
    for name, figures in replicas.items():
        count = figures.get("completed")
        parts.append(f"{name} {count if count is not None else figures.get('answered', 0):,}")
    return " / ".join(parts)


def _two_replicas(phases: Sequence[Phase], concurrency: int) -> GoalResult:
    """Two replicas' total throughput against one replica's, same PostgreSQL setup, same round; median over rounds."""
    key = "two_replicas_postgresql"
    goal = (
        f"Two replicas on one PostgreSQL, C={concurrency}: total throughput >= one replica's "
        f"(no loss; {1 - REPLICAS_SHARE:.0%} noise allowed)"
    )
    pairs: list[tuple[Phase, Phase]] = []
    for two in phases:
        if two["target"] != REPLICAS or not _closed(two, concurrency):
            continue
        one = next(
            (p for p in phases if p["target"] == ORCHESTRATOR and _closed(p, concurrency)
             and p["round"] == two["round"] and setup_of(p) == setup_of(two)
             and p.get("database") == two.get("database")),
            None,
        )  # fmt: skip
        if one is not None:
            pairs.append((two, one))
    reason = ""
    if not any(p["target"] == REPLICAS for p in phases):
        reason = "needs --replicas and the orchestrator on PostgreSQL (--compare-postgres URL or --db URL)"
    elif not pairs:
        reason = f"no two-replica phase at C={concurrency} beside a one-replica one (-c 1,32)"
    values = [(_per_s(two), _per_s(one), two) for two, one in pairs]
    ratios = [(a / b, a, b, two) for a, b, two in values if a is not None and b is not None]
    if not reason and not ratios:
        reason = f"a replica phase completed no saga at C={concurrency}"
    if reason:
        return GoalResult(key, goal, f"not measured: {reason}", None, REPLICAS_SHARE, None)
    value = statistics.median(r[0] for r in ratios)
    _, both, alone, first = ratios[0]

    def render(v: float) -> str:
        return f"{v:.1%}"

    if len(ratios) == 1:
        measured = f"{both:.1f} (2 replicas) / {alone:.1f} (1) sagas/s = {value:.1%}; split {_split(first)}"
    else:
        measured = render(value) + _spread([r[0] for r in ratios], render) + f"; split (round 1) {_split(first)}"
    return GoalResult(key, goal, measured, value, REPLICAS_SHARE, value >= REPLICAS_SHARE)


def _takeover(takeover: Mapping[str, Any] | None) -> GoalResult:
    """Every saga the killed replica held moved again within 3 s of its death (history timestamps)."""
    key, goal = "takeover_3s", f"A dead replica's sagas taken over within {TAKEOVER_SECONDS:g} s of its death"
    if takeover is None:
        return GoalResult(key, goal, "not measured: needs --takeover and PostgreSQL", None, TAKEOVER_SECONDS, None)
    held, moved = int(takeover["held_at_death"]), int(takeover["moved"])
    if held == 0:
        reason = "not measured: the killed replica held no saga at its death"
        return GoalResult(key, goal, reason, None, TAKEOVER_SECONDS, None)
    if moved == 0:
        measured = f"none of the {held} sagas it held moved within {takeover['not_moved_within_s']['limit_s']:g} s"
        return GoalResult(key, goal, measured, None, TAKEOVER_SECONDS, False)
    worst = float(takeover["gap_max_s"])
    measured = (
        f"{moved} of {held} sagas held at the kill -9 (C={takeover['concurrency']}): "
        f"p50 {takeover['gap_p50_s']:.2f} s, max {worst:.2f} s "
        f"(heartbeat {takeover['heartbeat_interval_s']:g} s, silent after {takeover['replica_silent_after_s']:g} s)"
    )
    return GoalResult(key, goal, measured, worst, TAKEOVER_SECONDS, moved == held and worst <= TAKEOVER_SECONDS)


def _long_running(report: Mapping[str, Any] | None) -> GoalResult:
    """Report only: the short bench.long_running's headline figures, no threshold."""
    key, goal = "long_running", "Long-running figures (report only)"
    if report is None:
        return GoalResult(key, goal, "not measured: needs --long-running N (e.g. 2000)", None, None, None)
    parked, signalled, timers = report["parked"], report["signalled"], report["timers"]
    bytes_each = parked.get("bytes_per_parked_saga")
    measured = (
        f"{parked['started']:,} parked: {parked['per_s']:,.0f} starts/s, "
        f"{bytes_each:,.0f} B RSS a saga, idle CPU {parked['idle_cpu_percent_of_core']:.2f} %; "
        f"{signalled['completions_per_s']:,.0f} completions/s after signals; {timers['fired']:,} timers, "
        f"lateness p99 {timers['lateness_p99_ms']:,.0f} ms"
        if bytes_each is not None
        else f"{parked['started']:,} parked at {parked['per_s']:,.0f} starts/s"
    )
    return GoalResult(key, goal, measured, None, None, None)


def evaluate_goals(
    phases: Sequence[Phase],
    *,
    takeover: Mapping[str, Any] | None = None,
    long_running: Mapping[str, Any] | None = None,
) -> list[GoalResult]:
    """Every target of issue 15, in its order, from one report's phases (dicts as `PhaseResult.as_dict` gives them).

    Floor and peer targets compare phases of the same round of the all-SQLite setup and take the
    median over rounds; the PostgreSQL targets compare the median of each setup's rounds; the
    replica targets come from the two-replica phases, the takeover and long-running figures from
    the report's `takeover` and `long_running` sections. A report-only target has met None and a
    measured text that does not start with "not measured".
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
        _two_replicas(phases, 32),
        _takeover(takeover),
        _long_running(long_running),
    ]  # fmt: skip
