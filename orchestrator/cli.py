"""The `saga` command line: run the demo and the local stack, place orders, inspect and operate sagas."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.render import status_name

app = typer.Typer(help="Sagasuite: run the local stack, place orders, watch and operate sagas.", no_args_is_help=True)


@app.callback()
def root() -> None:
    """Sagasuite: run the local stack, place orders, watch and operate sagas."""


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="where the stack keeps its SQLite files and logs (wiped)")] = Path(
        "var/demo"
    ),
) -> None:
    """Start the local stack, place four demo orders (success, decline, transient failure, out of stock),
    print each saga's outcome and step timeline, then stop everything.

    Example: saga demo --data-dir /tmp/saga-demo
    """
    from orchestrator.demo import run_demo

    sagas = run_demo(data_dir)
    expected = ["COMPLETED", "COMPENSATED", "COMPLETED", "COMPENSATED"]
    if [status_name(s.status) for s in sagas] != expected:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
