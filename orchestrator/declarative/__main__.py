"""`python -m orchestrator.declarative describe FILE...`: check YAML definitions offline and print them as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf import json_format

from orchestrator.declarative.compiler import DefinitionFileError, Problem
from orchestrator.declarative.folder import compile_files
from orchestrator.sagas.order import FULFILMENT_SAGA, ORDER_SAGA
from orchestrator.views import definition_info_pb


def describe(paths: list[Path]) -> dict[str, object]:
    """The problems of the files (all of them), or each definition they hold as a SagaDefinitionInfo."""
    # A file may start a built-in definition as its child (FulfilmentSaga v1), as the orchestrator allows.
    known = {(d.name, d.version): d for d in (ORDER_SAGA, FULFILMENT_SAGA)}
    missing = [path for path in paths if not path.is_file()]
    if missing:
        problems = [Problem(str(path), 0, 0, "no such file") for path in missing]
        return {"problems": [vars(problem) for problem in problems], "definitions": []}
    try:
        loaded = compile_files(paths, known)
    except DefinitionFileError as error:
        return {"problems": [vars(problem) for problem in error.problems], "definitions": []}
    definitions = [
        json_format.MessageToDict(definition_info_pb(item.definition, running=0, latest=False)) for item in loaded
    ]
    return {"problems": [], "definitions": definitions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.declarative", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    describe_command = commands.add_parser("describe", help="check files and print their definitions as JSON")
    describe_command.add_argument("files", nargs="+", type=Path)
    options = parser.parse_args(argv)
    result = describe(options.files)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
