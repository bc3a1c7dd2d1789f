"""Command-line entry points of the benchmark and the chaos harness: `bench_command` and `chaos_command`.

The `saga` CLI registers them as `saga bench` and `saga chaos`; `python -m bench.cli bench ...`
and `python -m bench.cli chaos ...` run them without it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["app", "bench_command", "chaos_command", "comparisons", "render_bench", "render_targets"]


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _database_label(phase: dict[str, Any]) -> str:
    ours, services = phase.get("database", "sqlite"), phase.get("services_database", "sqlite")
    return str(ours) if ours == services else f"{ours} (orchestrator only)"


def comparisons(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per database, load and round: the orchestrator (PlaceOrderAndWait) against the floor and every peer."""
    rows: list[dict[str, Any]] = []
    by_key: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for phase in report["phases"]:
        load = phase["load"]
        label = f"rate={load['rate']:g}/s" if load["rate"] else f"C={load['concurrency']}"
        by_key.setdefault((_database_label(phase), label, phase["round"]), {})[phase["target"]] = phase
    for (database, label, round_number), phases in by_key.items():
        ours = phases.get("orchestrator")
        if ours is None:
            continue
        row: dict[str, Any] = {
            "db": database,
            "load": label,
            "round": round_number,
            "orchestrator_per_s": ours["completed_per_s"],
        }
        floor = next((p for name, p in phases.items() if name.startswith("floor")), None)
        if floor is not None and floor["completed_per_s"]:
            row["floor_per_s"] = floor["completed_per_s"]
            row["share_of_floor"] = round(ours["completed_per_s"] / floor["completed_per_s"], 3)
            ours_p50, floor_p50 = ours["completion_latency"]["p50_ms"], floor["completion_latency"]["p50_ms"]
            if ours_p50 is not None and floor_p50 is not None:
                row["p50_above_floor_ms"] = round(ours_p50 - floor_p50, 3)
        for name, phase in phases.items():
            if name.startswith(("temporal", "dbos", "restate")) and phase["completed_per_s"]:
                row[f"x_{name}"] = round(ours["completed_per_s"] / phase["completed_per_s"], 1)
        rows.append(row)
    return rows


def render_bench(report: dict[str, Any], console: Console) -> None:
    """The report as tables: throughput and latency per phase, then CPU and memory per process, then ratios."""
    main = Table(title="Order saga: throughput and latency", title_justify="left")
    for column in ("target", "db", "load", "round", "sagas/s", "start p50/p95/p99 ms", "completion p50/p95/p99 ms"):
        main.add_column(column, justify="left" if column in ("target", "db", "load") else "right")
    main.add_column("CPU ms/saga", justify="right")
    main.add_column("other outcomes")
    main.add_column("load avg", justify="right")
    for phase in report["phases"]:
        load = phase["load"]
        label = f"rate={load['rate']:g}/s" if load["rate"] else f"C={load['concurrency']}"
        start = phase["start_latency"]
        done = phase["completion_latency"]
        other = {k: v for k, v in phase["outcomes"].items() if k != "COMPLETED"}
        main.add_row(
            phase["target"],
            _database_label(phase),
            label,
            str(phase["round"]),
            _fmt(phase["completed_per_s"]),
            " / ".join(_fmt(start[k], 2) for k in ("p50_ms", "p95_ms", "p99_ms")) if start else "-",
            " / ".join(_fmt(done[k], 2) for k in ("p50_ms", "p95_ms", "p99_ms")),
            _fmt(phase["cpu_ms_per_saga_total"], 2),
            ", ".join(f"{k}={v}" for k, v in other.items()) or "-",
            f"{_fmt(phase['load_average_1m']['start'], 2)}→{_fmt(phase['load_average_1m']['end'], 2)}",
        )
    console.print(main)
    procs = Table(title="Per process: CPU ms per completed saga, peak RSS (MiB), RSS start→end", title_justify="left")
    for column in ("target", "db", "load", "round", "process", "CPU ms/saga", "CPU % of a core", "peak RSS", "RSS"):
        procs.add_column(column, justify="left" if column in ("target", "db", "load", "process") else "right")
    for phase in report["phases"]:
        load = phase["load"]
        label = f"rate={load['rate']:g}/s" if load["rate"] else f"C={load['concurrency']}"
        for name, figures in phase["processes"].items():
            share = figures["cpu_share_of_one_core"]
            procs.add_row(
                phase["target"],
                _database_label(phase),
                label,
                str(phase["round"]),
                name,
                _fmt(figures["cpu_ms_per_saga"], 3),
                _fmt(share * 100 if share is not None else None, 0),
                _fmt(figures["peak_rss_mib"]),
                f"{_fmt(figures['rss_start_mib'])}→{_fmt(figures['rss_end_mib'])}",
            )
    console.print(procs)
    rows = comparisons(report)
    if rows:
        ratios = Table(title="Orchestrator against the floor and the peers (same run)", title_justify="left")
        keys = list(dict.fromkeys(k for row in rows for k in row))
        for key in keys:
            ratios.add_column(key, justify="right")
        for row in rows:
            ratios.add_row(*(str(row.get(key, "-")) for key in keys))
        console.print(ratios)
    render_replicas(report, console)
    render_long_running(report, console)
    render_targets(report, console)
    for note in report.get("notes", []):
        # Not markup: a note may name a pass in brackets ("[postgresql]").
        console.print(f"note: {note}", markup=False)


def render_replicas(report: dict[str, Any], console: Console) -> None:
    """The two-replica phases' split (sagas each replica ran), then the takeover after a kill -9."""
    split = Table(title="Two replicas on one PostgreSQL: sagas each ran in the window", title_justify="left")
    for column in ("db", "load", "round", "sagas/s (both)", "replica", "REPLICA_ID", "completed", "answered"):
        split.add_column(column, justify="left" if column in ("db", "load", "replica", "REPLICA_ID") else "right")
    for phase in report["phases"]:
        load = phase["load"]
        label = f"rate={load['rate']:g}/s" if load["rate"] else f"C={load['concurrency']}"
        for name, figures in (phase.get("replicas") or {}).items():
            completed = figures["completed"]
            split.add_row(
                _database_label(phase), label, str(phase["round"]), _fmt(phase["completed_per_s"]), name,
                figures["replica_id"], "-" if completed is None else f"{completed:,}", f"{figures['answered']:,}",
            )  # fmt: skip
    if split.row_count:
        console.print(split)
    takeover = report.get("takeover")
    if takeover:
        console.print(
            f"takeover: kill -9 of {takeover['killed']} ({takeover['killed_replica_id']}) under C="
            f"{takeover['concurrency']} on two replicas: it held {takeover['held_at_death']} sagas; "
            f"{takeover['moved']} moved again on the survivor, death to next transition p50 "
            f"{_fmt(takeover['gap_p50_s'], 2)} s, max {_fmt(takeover['gap_max_s'], 2)} s (heartbeat "
            f"{takeover['heartbeat_interval_s']:g} s, silent after {takeover['replica_silent_after_s']:g} s, lease "
            f"{takeover['lease_seconds']:g} s); client errors {takeover['client']['errors'] or 'none'}",
            highlight=False,
        )


def render_long_running(report: dict[str, Any], console: Console) -> None:
    """The short long-running run's figures, as bench.long_running prints them."""
    long_running = report.get("long_running")
    if long_running:
        from bench.long_running import render

        console.print("Long-running sagas (a short bench.long_running run, on a stack of its own)", highlight=False)
        console.print(render(long_running), highlight=False)


def render_targets(report: dict[str, Any], console: Console) -> None:
    """Issue 15's targets as one table: each with what this run measured, and met, missed, measured or not measured.

    "measured" is a report-only target (no threshold) that this run measured.
    """
    table = Table(title="Targets (issue 15), this run", title_justify="left")
    for column in ("target", "measured", "met"):
        table.add_column(column)
    for goal in report.get("targets", []):
        not_measured = goal["measured"].startswith("not measured")
        met = {True: "yes", False: "[bold]NO[/bold]", None: "not measured" if not_measured else "measured"}[goal["met"]]
        measured = goal["measured"].removeprefix("not measured: ")
        table.add_row(goal["goal"], measured, met)
    console.print(table)


def _wide_console() -> Console:
    """stdout, at least 160 columns wide when it is not a terminal (so a saved table is not cut)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def bench_command(
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="closed loop: sagas in flight; several as 1,32")
    ] = "32",
    rate: Annotated[float, typer.Option(help="open loop: sagas started per second (replaces --concurrency)")] = 0.0,
    duration: Annotated[float, typer.Option(help="seconds measured per phase")] = 10.0,
    warmup: Annotated[float, typer.Option(help="seconds of load before each measured window")] = 2.0,
    rounds: Annotated[int, typer.Option(help="times every target runs, alternating, per load")] = 1,
    db: Annotated[str, typer.Option(help="orchestrator database: empty for SQLite, or postgresql+psycopg://...")] = "",
    floor: Annotated[bool, typer.Option(help="also measure the four calls alone")] = True,
    yaml: Annotated[bool, typer.Option(help="also measure the order saga from its YAML definition (SQLite)")] = True,
    watch: Annotated[
        bool, typer.Option(help="also measure the old client way: PlaceOrder, then WatchSaga (orchestrator-watch)")
    ] = False,
    peers: Annotated[
        str,
        typer.Option(
            help="peer engines, each run only for its own phases: temporal,dbos,restate (pip install -e '.\\[bench]')"
        ),
    ] = "",
    compare_postgres: Annotated[
        str,
        typer.Option(
            help="then run again with the orchestrator and the services each on a fresh database of this "
            "PostgreSQL server (postgresql+psycopg://user@host:port/db to connect to), for the PostgreSQL targets"
        ),
    ] = "",
    replicas: Annotated[
        bool,
        typer.Option(
            help="on the PostgreSQL pass (--compare-postgres, or --db), also two orchestrator replicas on its "
            "database, the client alternating between them: total throughput and the split"
        ),
    ] = False,
    takeover: Annotated[
        bool,
        typer.Option(
            help="on the PostgreSQL pass, then kill -9 one of two loaded replicas and time the takeover of its sagas"
        ),
    ] = False,
    takeover_concurrency: Annotated[int, typer.Option(help="sagas in flight on the two replicas of --takeover")] = 8,
    long_running: Annotated[
        int,
        typer.Option(
            help="last, a short python -m bench.long_running on a stack of its own: this many parked sagas (and "
            "half as many timers); 2000 takes under a minute; 0 skips it",
            metavar="SAGAS",
        ),
    ] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="where the stack keeps files and logs (default: temp)")] = None,
    log_level: Annotated[str, typer.Option(help="LOG_LEVEL of every process")] = "WARNING",
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON instead of tables")] = False,
    output: Annotated[Path | None, typer.Option(help="also write the JSON report to this file")] = None,
) -> None:
    """Benchmark the order saga through the orchestrator against the four calls alone (and peers).

    Starts the local stack (four services and the orchestrator, SQLite files unless --db), then
    for every load, round after round, runs each target for a warm-up and a measured window; a
    peer's processes run only for its own phases. Ends with the table of issue 15's targets.

    Every target in one run (PostgreSQL for the replica ones):
    saga bench -c 1,32 --peers restate --compare-postgres URL --replicas --takeover --long-running 2000

    The full long-running benchmark (100,000 parked sagas): python -m bench.long_running
    """
    from bench.loadgen import KNOWN_PEERS, BenchConfig, Load, run_benchmark
    from bench.targets import PeerUnavailable

    try:
        levels = [int(part) for part in concurrency.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter("must be integers separated by commas", param_hint="--concurrency") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--concurrency")
    peer_names = [p.strip() for p in peers.split(",") if p.strip()]
    unknown = sorted(set(peer_names) - set(KNOWN_PEERS))
    if unknown:
        raise typer.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(KNOWN_PEERS)}", param_hint="--peers")
    if compare_postgres and not compare_postgres.startswith("postgresql"):
        raise typer.BadParameter("must be a postgresql+psycopg://... URL", param_hint="--compare-postgres")
    on_postgresql = bool(compare_postgres) or db.startswith("postgresql")
    for flag, wanted in (("--replicas", replicas), ("--takeover", takeover)):
        if wanted and not on_postgresql:
            raise typer.BadParameter("needs PostgreSQL: --compare-postgres URL or --db URL", param_hint=flag)
    if takeover_concurrency < 2:
        raise typer.BadParameter("must be at least 2 (one per replica)", param_hint="--takeover-concurrency")
    if long_running < 0:
        raise typer.BadParameter("must be 0 (skip) or more", param_hint="--long-running")
    config = BenchConfig(
        concurrencies=levels,
        rate=rate or None,
        duration=duration,
        warmup=warmup,
        rounds=rounds,
        database_url=db,
        data_dir=data_dir,
        floor=floor,
        yaml=yaml,
        watch=watch,
        peers=peer_names,
        compare_postgres=compare_postgres,
        replicas=replicas,
        takeover=takeover,
        takeover_concurrency=takeover_concurrency,
        long_running=long_running,
        log_level=log_level,
    )
    err = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]} sagas"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:

        def on_phase(target: str, load: Load, round_number: int):  # type: ignore[no-untyped-def]
            label = escape(f"{target:18s} {load.label:10s} round {round_number}")
            task = progress.add_task(label, total=1.0, done=0)

            def update(fraction: float, done: int) -> None:
                progress.update(task, completed=fraction, done=done)

            return update

        err.print(f"load average before the run: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
        try:
            report = run_benchmark(config, on_phase).as_dict()
        except PeerUnavailable as error:
            progress.stop()
            err.print(f"saga bench: {error}", highlight=False)
            raise typer.Exit(2) from None
    document = json.dumps(report, indent=2, allow_nan=False, default=str)
    if output is not None:
        output.write_text(document + "\n")
    if json_output:
        sys.stdout.write(document + "\n")
    else:
        render_bench(report, _wide_console())


def chaos_command(
    sagas: Annotated[int, typer.Option(help="sagas to run")] = 300,
    orchestrator_kills: Annotated[int, typer.Option(help="kill -9 and restart the orchestrator this many times")] = 5,
    service_kills: Annotated[int, typer.Option(help="then kill -9 and restart each service this many times")] = 1,
    replica_kills: Annotated[int, typer.Option(help="with --db postgresql: kills of the second replica")] = 3,
    after_commit_kills: Annotated[
        int, typer.Option(help="kill -9 each service this many times right after a commit whose reply it holds")
    ] = 1,
    two_instances: Annotated[
        str, typer.Option(help="with --db postgresql: services run twice on one database (comma-separated)")
    ] = "inventory,payment",
    instance_kills: Annotated[int, typer.Option(help="with --db postgresql: kills of each second instance")] = 1,
    lost_commits: Annotated[
        int, typer.Option(help="with --db postgresql: COMMITs of inventory and payment whose reply is lost")
    ] = 2,
    db: Annotated[str, typer.Option(help="orchestrator database: empty for SQLite, or postgresql+psycopg://...")] = "",
    concurrency: Annotated[int, typer.Option(help="PlaceOrder calls in flight at once")] = 16,
    rate: Annotated[float, typer.Option(help="sagas placed per second (0: spread over the faults)")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed of the outcome mix and the fault timing")] = 1,
    drain_timeout: Annotated[float, typer.Option(help="seconds to wait for every saga to end")] = 180.0,
    delivery_timeout: Annotated[
        float, typer.Option(help="then seconds to wait for every confirmation to be delivered")
    ] = 60.0,
    orchestrator: Annotated[
        str, typer.Option(help="point at a running stack: orchestrator address (no process is killed)")
    ] = "",
    services: Annotated[
        str, typer.Option(help="with --orchestrator: inventory=ADDR,payment=ADDR,shipping=ADDR,notify=ADDR")
    ] = "",
    data_dir: Annotated[Path | None, typer.Option(help="where the stack keeps files and logs (default: temp)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Run sagas while killing processes, then check every invariant from the services' own records.

    Exits 1 when any invariant is violated. Example: saga chaos --sagas 10000 --orchestrator-kills 20.
    docs/chaos.md describes the faults and the invariants.
    """
    from devstack.chaos import ChaosConfig, run_chaos
    from svckit.discovery import SUITE_SERVICES

    external: dict[str, str] = {}
    if orchestrator:
        external["orchestrator"] = orchestrator
        for part in filter(None, (p.strip() for p in services.split(","))):
            name, _, address = part.partition("=")
            external[name.strip()] = address.strip()
        missing = set(SUITE_SERVICES) - set(external)
        if missing:
            raise typer.BadParameter(f"missing {', '.join(sorted(missing))}", param_hint="--services")
    second_instances = tuple(name.strip() for name in two_instances.split(",") if name.strip())
    unknown = sorted(set(second_instances) - set(SUITE_SERVICES))
    if unknown:
        raise typer.BadParameter(f"unknown service {', '.join(unknown)}", param_hint="--two-instances")
    config = ChaosConfig(
        sagas=sagas,
        orchestrator_kills=orchestrator_kills,
        service_kills=service_kills,
        replica_kills=replica_kills,
        after_commit_kills=after_commit_kills,
        second_instances=second_instances,
        instance_kills=instance_kills,
        lost_commits=lost_commits,
        database_url=db,
        concurrency=concurrency,
        rate=rate,
        seed=seed,
        drain_timeout=drain_timeout,
        delivery_timeout=delivery_timeout,
        external=external,
        data_dir=data_dir,
    )
    err = Console(stderr=True)
    report = run_chaos(config, log=lambda line: err.print(line, highlight=False))
    if json_output:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        _wide_console().print(report.render())
    if report.violations:
        raise typer.Exit(1)


app = typer.Typer(help="Benchmark and chaos harness of the saga orchestrator.", no_args_is_help=True)
app.command("bench")(bench_command)
app.command("chaos")(chaos_command)


if __name__ == "__main__":
    app()
