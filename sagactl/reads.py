"""The read commands: `saga ls`, `saga show`, `saga watch` and `saga stats`."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from sagactl.common import (
    Json_,
    OlderThan_,
    Order_,
    Since_,
    Statuses_,
    Type_,
    calls_orchestrator,
    ended_well,
    filter_request,
    new_console,
    parse_duration,
    parse_statuses,
    print_events,
    print_json,
)
from sagactl.completion import complete_saga_id
from sagactl.settings import EXIT_FAILED, ClientConfig

__all__ = ["commands"]

commands = typer.Typer()


@commands.command(
    "ls",
    epilog="[bold]Examples[/]\n\n"
    "  saga ls\n\n"
    "  saga ls --status needs_attention --since 1h\n\n"
    "  saga ls --status in_flight --older-than 10m --type OrderSaga\n\n"
    "  saga ls --order ord-42 --json\n\n"
    "  saga ls --limit 100 --page-token <token printed under the previous page>\n\n"
    "  saga ls --all --json",
)
@calls_orchestrator
def list_sagas(
    status: Statuses_ = None,
    saga_type: Type_ = "",
    order: Order_ = "",
    since: Since_ = "",
    older_than: OlderThan_ = "",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=500, help="sagas per page")] = 20,
    page_token: Annotated[str, typer.Option(help="continue after a previous page")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="every page, not just one")] = False,
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """List sagas, newest first, filtered by status, type, age and order id; one page at a time.

    Ids are short: their first 8 characters, more where two on the page start alike; every command that
    takes an id takes any unique start of one (--json gives them whole). Ages and durations are compact
    (850ms, 2.1s, 3m, 5h); a saga in flight took "-" so far. A child saga (one another saga started, e.g. the
    FulfilmentSaga of an OrderSaga v2) has its type marked ↳; `saga show` names its parent. The table fits
    the terminal without cutting anything: on 80 columns the types lose their "Saga" ending and long order
    ids wrap in their column (or go, on narrower ones).
    """
    from sagactl.client import SagaClient
    from sagactl.render import list_dict, saga_list

    request = filter_request(parse_statuses(status), saga_type, order, since, older_than)
    request.page_size = limit
    request.page_token = page_token
    with SagaClient(config) as client:
        sagas, next_token = client.list_page(request, all_pages=all_pages)
    if as_json:
        print_json(list_dict(sagas, next_token))
        return
    console = new_console()
    if not sagas:
        console.print("no sagas match", style="dim")
        return
    console.print(saga_list(sagas, time.time()))
    if next_token:
        console.print(f"more: add --page-token {next_token}", style="dim", soft_wrap=True)


@commands.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga show 3f2a9c0e                (any unique start of an id, as saga ls shows them)\n\n"
    "  saga show ord-42                 (an order id works too)\n\n"
    "  saga show ord-42 --history\n\n"
    "  saga show ord-42 --json | jq '.waits, .children'\n\n"
    "  saga show ord-42 --json | jq '.input, (.steps[] | {name, result})'"
)
@calls_orchestrator
def show(
    saga_ref: Annotated[
        str,
        typer.Argument(
            metavar="ID",
            help="saga id (or any unique start of one), or the order id of one saga",
            autocompletion=complete_saga_id,
        ),
    ],
    history: Annotated[bool, typer.Option("--history", help="also print every history event")] = False,
    width: Annotated[int, typer.Option(min=10, max=400, help="width of the time bars")] = 50,
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Describe one saga: its header, each step's state and tries, every call as a timeline table
    (attempts, durations, codes, messages, compensations), and the calls as bars on the saga's time axis,
    so a slow step or a retry storm stands out.

    Its input and each step's result (a call's response, a signal's payload, a child's outcome) are printed as
    compact JSON, one line each, cut to the terminal's width; --json gives them whole (up to the orchestrator's
    64 KiB cap). A saga that waits says for what (a timer, a signal, an approval, a child) and which command ends the
    wait; a saga that started others lists its children (step, id, type, status), and a child names its
    parent. An order id of OrderSaga v2 names the order's saga and its FulfilmentSaga child: it shows the
    order's.
    """
    from sagactl.client import SagaClient
    from sagactl.render import (
        saga_bars,
        saga_children,
        saga_dict,
        saga_header,
        saga_history,
        saga_input,
        saga_results,
        saga_steps,
        saga_timeline,
        saga_waits,
    )

    with SagaClient(config) as client:
        saga = client.resolve(saga_ref)
    if as_json:
        print_json(saga_dict(saga))
        return
    from rich.text import Text

    console = new_console()
    console.print(saga_header(saga))
    console.print()
    console.print(Text("input", style="bold underline"))
    # One line, cut to the terminal: --json has it whole.
    console.print(saga_input(saga), no_wrap=True, overflow="ellipsis")
    if saga.waits:
        console.print()
        console.print(Text("waiting for", style="bold underline"))
        console.print(saga_waits(saga))
    console.print()
    console.print(Text("steps", style="bold underline"))
    console.print(saga_steps(saga))
    if any(step.result_json or step.result_truncated for step in saga.steps):
        console.print()
        console.print(Text("results", style="bold underline"))
        console.print(saga_results(saga))
    if saga.children:
        console.print()
        console.print(Text("children", style="bold underline"))
        console.print(saga_children(saga))
    console.print()
    console.print(Text("timeline", style="bold underline"))
    console.print(saga_timeline(saga))
    console.print()
    console.print(Text("time bars", style="bold underline"))
    console.print(saga_bars(saga, width), soft_wrap=True)
    if history:
        console.print()
        console.print(Text("history", style="bold underline"))
        console.print(saga_history(saga))


@commands.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga watch 3f2a9c0e\n\n"
    "  saga watch ord-42 --json | jq .type\n\n"
    "  saga watch ord-42 --after 12"
)
@calls_orchestrator
def watch(
    saga_ref: Annotated[
        str,
        typer.Argument(
            metavar="ID",
            help="saga id (or any unique start of one), or the order id of one saga",
            autocompletion=complete_saga_id,
        ),
    ],
    after: Annotated[int, typer.Option(min=0, help="only events after this sequence number")] = 0,
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Print a saga's events as they happen (its history so far first) until it ends or needs attention.

    Each line gives the event's UTC time of day and its offset from the saga's start. The history records a
    call when it ends; the watch adds a StepStarted line when a step begins, derived from the events before
    it (the step after one that succeeded, the first of each branch, the held step of a resumed saga). With
    --json, one JSON object per history event and line (no derived ones). Exits 0 when the saga completed,
    1 when it ended otherwise.
    """
    from sagactl.client import SagaClient
    from sagactl.render import saga_header

    console = new_console()
    with SagaClient(config) as client:
        saga = client.resolve(saga_ref)
        if not as_json:
            console.print(
                f"watching saga {saga.saga_id} (order {saga.business_key}); times are UTC; Ctrl-C stops watching"
            )
        print_events(client, saga, after, console, as_json=as_json)
        saga = client.get_saga(saga.saga_id)
    if not as_json:
        console.print(saga_header(saga))
    if not ended_well(saga):
        raise typer.Exit(EXIT_FAILED)


@commands.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga stats\n\n"
    "  saga stats --since 1h\n\n"
    "  saga stats --json | jq '.in_flight, .needs_attention'\n\n"
    "  saga stats --json | jq -r '.oldest_needs_attention.saga_id // empty'"
)
@calls_orchestrator
def stats(
    since: Annotated[str, typer.Option(help="only sagas created within this long, e.g. 1h")] = "",
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Saga counts by status, the sagas in flight and those needing attention with the oldest of each, and
    completion-latency percentiles (p50, p95, p99).

    In flight means running, compensating or paused; the oldest in flight is the oldest running or compensating
    saga (a paused one is counted, not named). Every figure is over the same sagas: all of them, or with --since
    those created within that long.
    """
    from sagactl.client import SagaClient, stamp_ago
    from sagactl.render import stats_dict, stats_view
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    request = pb.GetSagaStatsRequest()
    if since:
        request.created_after.CopyFrom(stamp_ago(parse_duration(since, "--since")))
    with SagaClient(config) as client:
        response = client.stats(request)
    if as_json:
        print_json(stats_dict(response))
    else:
        new_console().print(stats_view(response, time.time()))
