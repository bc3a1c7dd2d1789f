"""The `saga` command line: the typer app, its root options, and the commands of each module registered on it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from sagactl import conformance, definition_graph, definitions, operate, order, reads, stack, waiting, web_command
from sagactl.common import fail, run_reporting_errors
from sagactl.roothelp import SUMMARY, root_help, summary
from sagactl.settings import EXIT_USAGE, version_line

if TYPE_CHECKING:
    # Typer vendors Click (there is no click dependency); its classes are what TyperGroup's methods take.
    from typer._click import Command, Context, HelpFormatter

__all__ = ["app", "main"]


@dataclass(frozen=True)
class _OptionalCommand:
    """A command whose code is in a package an installation may leave out: imported only when it runs."""

    module: str
    function: str

    @property
    def package(self) -> str:
        return self.module.partition(".")[0]


# The benchmark and the chaos harness live in bench/, which the Docker image does not copy (.dockerignore).
_OPTIONAL_COMMANDS = {
    "bench": _OptionalCommand("bench.cli", "bench_command"),
    "chaos": _OptionalCommand("bench.cli", "chaos_command"),
}


def _load_optional(name: str, optional: _OptionalCommand) -> Command:
    """The real `saga <name>` command; a one-line error (exit 2) when its package is not installed."""
    try:
        function = getattr(importlib.import_module(optional.module), optional.function)
    except ModuleNotFoundError as error:
        missing = (error.name or optional.package).partition(".")[0]
        where = (
            f"(the Docker image leaves {missing}/ out): run it from a source checkout after pip install -e '.[dev]'"
            if missing == optional.package
            else "(one of its own dependencies): install it, e.g. pip install -e '.[dev,bench]' in a checkout"
        )
        fail(f"saga {name} needs the {missing!r} package, which this installation does not have {where}", EXIT_USAGE)
    single = typer.Typer(add_completion=False, rich_markup_mode="rich")
    single.command(name)(function)
    return typer.main.get_command(single)


class _SagaGroup(TyperGroup):
    """The root command: prints sagactl.roothelp's text as its help, and imports an optional command only to run it."""

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        formatter.write(root_help())

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # As typer does: the help on stdout, and the exit code of a usage error.
            typer.echo(ctx.get_help())
            ctx.exit(EXIT_USAGE)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: Context) -> list[str]:
        listed = super().list_commands(ctx)
        return [*listed, *(name for name in _OPTIONAL_COMMANDS if name not in listed)]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in _OPTIONAL_COMMANDS:
            return command
        # A stand-in for listings (shell completion) only: resolve_command builds the real one.
        return TyperCommand(cmd_name, help=summary(cmd_name))

    def main(  # type: ignore[override]  # the same parameters, typed more loosely by typer
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """As typer's, but a usage error is one line on stderr (JSON with --json): common.run_reporting_errors."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        given = sys.argv[1:] if args is None else list(args)
        typer_main = super().main
        sys.exit(run_reporting_errors(lambda: typer_main(given, prog_name, complete_var, False, **extra), given))

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Command | None, list[str]]:
        optional = _OPTIONAL_COMMANDS.get(args[0]) if args else None
        if optional is None or args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return args[0], _load_optional(args[0], optional), args[1:]


def _flags_shown_bare() -> None:
    """A flag (--json, --yes, --help) is listed bare in every command's help, as Click does.

    Typer's rich help gives each option its type, a flag's `<bool>` too, which reads as if it took a value;
    TyperOption is the class of every option (each command's, and the --help typer adds), so this is the one place.
    """
    shown_type = TyperOption.display_type_rich
    if getattr(shown_type, "sagactl_bare_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: Context) -> str | None:
        return None if self.is_flag else shown_type(self, ctx)

    display_type_rich.sagactl_bare_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_shown_bare()


def _reflowed(text: str) -> str:
    """A docstring with each paragraph on one line, so the help fills the terminal, however wide.

    Typer's rich help keeps a docstring's own line breaks after its first paragraph: at 80 columns each source
    line of 110 characters came out as one long line and one short one. A paragraph typer is told to keep as it
    is (`\b`), or whose lines are indented or bulleted, is kept.
    """

    def joined(paragraph: str) -> str:
        lines = paragraph.splitlines()
        kept = paragraph.startswith("\b") or any(line[:1].isspace() or line[:2] in ("- ", "* ") for line in lines)
        return paragraph if kept else " ".join(line.strip() for line in lines)

    return "\n\n".join(joined(paragraph) for paragraph in inspect.cleandoc(text).split("\n\n"))


def _help_reflowed(group: typer.Typer) -> None:
    """Every command of the group (its subgroups' too) gets its docstring, reflowed, as its help."""
    for info in group.registered_commands:
        doc = info.help if info.help is not None else inspect.getdoc(info.callback)
        if doc:
            info.help = _reflowed(doc)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _help_reflowed(sub.typer_instance)


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    typer.echo(version_line())
    raise typer.Exit()


app = typer.Typer(cls=_SagaGroup, help=SUMMARY, no_args_is_help=True, rich_markup_mode="rich")


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="print the sagasuite version and exit"),
    ] = False,
) -> None:
    """Sagasuite: run the local stack, place orders, watch and operate sagas."""


# Each module's commands join the root group unnamed, in the order the help lists them.
for _commands in (stack.commands, order.commands, reads.commands, operate.commands, waiting.commands):
    app.add_typer(_commands)
# A group of its own: list and show from sagactl.definitions, graph and validate from sagactl.definition_graph.
definition_graph.register(definitions.definitions_app)
app.add_typer(definitions.definitions_app, name="definitions")
app.add_typer(conformance.commands)
app.add_typer(web_command.commands)
_help_reflowed(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
