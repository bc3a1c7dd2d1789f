"""`saga definitions`: the saga definitions the orchestrator has loaded, as a list and one by one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import Json_, calls_orchestrator, fail, new_console, print_json
from sagactl.settings import EXIT_REFUSED, ClientConfig

if TYPE_CHECKING:
    from sagactl.client import SagaClient
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["DEFINITIONS_HELP", "definitions_app"]

# The first paragraph is what `saga --help` lists for the group (sagactl.roothelp.COMMANDS).
DEFINITIONS_HELP = (
    "The saga definitions the orchestrator has loaded: each version with its source, whether new sagas start "
    "on it, how many of its sagas run, and its steps."
)

# Other modules add their own subcommands to this group: `@definitions_app.command("graph")`.
definitions_app = typer.Typer(
    help=DEFINITIONS_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    epilog="[bold]Examples[/]\n\n"
    "  saga definitions list\n\n"
    "  saga definitions show OrderSaga\n\n"
    "  saga definitions show OrderSaga --version 1 --json",
)

Name_ = Annotated[str, typer.Argument(metavar="NAME", help="the definition's name, e.g. OrderSaga", show_default=False)]


@definitions_app.command(
    "list",
    epilog="[bold]Examples[/]\n\n  saga definitions list\n\n  saga definitions list --name OrderSaga --json",
)
@calls_orchestrator
def list_definitions(
    name: Annotated[str, typer.Option("--name", help="only the versions of this name", show_default=False)] = "",
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """List the loaded definitions, a row per version: name, version, source, latest, running and steps.

    The source is Python code or a YAML file; latest marks the version new sagas of the name start on (for
    OrderSaga, ORDER_SAGA_VERSION when set); running counts its sagas that have not ended.
    """
    from sagactl.client import SagaClient
    from sagactl.render import definition_dict, definition_list

    with SagaClient(config) as client:
        definitions = client.definitions(name)
    if as_json:
        print_json({"definitions": [definition_dict(info) for info in definitions]})
        return
    console = new_console()
    if not definitions:
        none = f"no definition named {name!r} is loaded" if name else "no definitions are loaded"
        console.print(none, style="dim", markup=False)
        return
    console.print(definition_list(definitions))


def _chosen(client: SagaClient, name: str, version: int | None) -> pb.SagaDefinitionInfo:
    """The version asked for, or the one new sagas start on; a refusal naming what is loaded otherwise."""
    versions = client.definitions(name)
    if not versions:
        loaded = sorted({info.name for info in client.definitions()})
        fail(f"no definition named {name!r} is loaded; loaded: {', '.join(loaded) or 'none'}", EXIT_REFUSED)
    if version is None:
        return next((info for info in versions if info.latest), versions[-1])
    found = next((info for info in versions if info.version == version), None)
    if found is None:
        numbers = ", ".join(str(info.version) for info in versions)
        fail(f"{name} v{version} is not loaded; loaded versions: {numbers}", EXIT_REFUSED)
    return found


@definitions_app.command(
    "show",
    epilog="The pivot (◆) is the last step that can be compensated: once it succeeded, the saga only goes "
    "forward. Exits 4 when no such definition (or version) is loaded.\n\n"
    "[bold]Examples[/]\n\n"
    "  saga definitions show OrderSaga\n\n"
    "  saga definitions show OrderSaga --version 2\n\n"
    "  saga definitions show OrderSaga --json | jq '.nodes[] | {name, action, compensation}'",
)
@calls_orchestrator
def show_definition(
    name: Name_,
    version: Annotated[
        int | None, typer.Option(min=1, help="the version (default: the one new sagas start on)", show_default=False)
    ] = None,
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Describe one loaded definition version: its source, input, hashes, and its steps with the pivot marked.

    Then each step in order (a parallel group's branches under it): its kind, its action and compensation as
    service/Service/Method, its timeouts (a call's per try and in all; a wait's or timer's), and notes: the
    pivot, a condition, what a wait's timeout does. Without --version, the version new sagas start on.
    """
    from rich.text import Text

    from sagactl.client import SagaClient
    from sagactl.render import definition_dict, definition_nodes, definition_summary

    with SagaClient(config) as client:
        info = _chosen(client, name, version)
    if as_json:
        print_json(definition_dict(info))
        return
    console = new_console()
    console.print(definition_summary(info))
    console.print()
    console.print(Text("steps", style="bold underline"))
    console.print(definition_nodes(info))
