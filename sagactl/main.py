"""The `saga` entry point: answers --version, --help and the --json read commands before typer and rich load."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["fast_read", "main"]

# The fast path covers `saga ls|show|stats ... --json`: scripts and monitors call these often, and typer
# and rich cost more CPU than grpc's own import. It reads only the options below, the way typer would; any
# argument it is not sure of (--help, a malformed number, an unknown word, "-x5" forms) sends the whole
# command line to typer, so usage errors, help texts and every other command stay in the typer commands alone.

# Options that take a value -> the name the fast path keeps it under; shared by the three commands.
_CONNECTION = {
    "--address": "address",
    "-a": "address",
    "--token": "token",
    "--ca-file": "ca_file",
    "--timeout": "timeout",
}
_VALUE_OPTIONS: dict[str, dict[str, str]] = {
    "ls": {
        **_CONNECTION,
        "--status": "status",
        "-s": "status",
        "--type": "saga_type",
        "--order": "order",
        "--since": "since",
        "--older-than": "older_than",
        "--limit": "limit",
        "-n": "limit",
        "--page-token": "page_token",
    },
    "show": {**_CONNECTION, "--width": "width"},
    "stats": {**_CONNECTION, "--since": "since"},
}
_FLAGS: dict[str, set[str]] = {"ls": {"--json", "--all"}, "show": {"--json", "--history"}, "stats": {"--json"}}
# Integer options and the range typer enforces on them (the values show --width and ls --limit take).
_INT_RANGES = {"limit": (1, 500), "width": (10, 400)}
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclass
class _ReadCall:
    """A --json read command as the fast path understood it."""

    command: str
    values: dict[str, str] = field(default_factory=dict)
    statuses: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    positional: list[str] = field(default_factory=list)


def _understood(args: list[str]) -> _ReadCall | None:
    """The read command these arguments ask for, or None when typer should have them."""
    if not args or args[0] not in _VALUE_OPTIONS:
        return None
    call = _ReadCall(args[0])
    takes_value, flags = _VALUE_OPTIONS[call.command], _FLAGS[call.command]
    rest = iter(args[1:])
    for arg in rest:
        name, equals, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in flags and not equals:
            call.flags.add(name)
        elif name in takes_value:
            value = inline if equals else next(rest, None)
            if value is None or (not equals and value.startswith("-")):
                return None
            if takes_value[name] == "status":
                call.statuses.append(value)
            else:
                call.values[takes_value[name]] = value
        elif arg.startswith("-"):
            return None
        else:
            call.positional.append(arg)
    if "--json" not in call.flags or len(call.positional) != (call.command == "show"):
        return None
    for name, (low, high) in _INT_RANGES.items():
        if name in call.values and not (call.values[name].isascii() and call.values[name].isdigit()):
            return None
        if name in call.values and not low <= int(call.values[name]) <= high:
            return None
    timeout = call.values.get("timeout", "10")
    if not _NUMBER.fullmatch(timeout) or float(timeout) < 0.1:
        return None
    return call


def fast_read(args: list[str]) -> int | None:
    """Run `saga ls|show|stats ... --json` without typer; None when typer should run the command instead."""
    call = _understood(args)
    if call is None:
        return None
    from sagactl.client import (
        BadOption,
        ClientError,
        SagaClient,
        filter_request,
        parse_duration,
        parse_statuses,
        stamp_ago,
    )
    from sagactl.render import error_json, json_text, list_dict, saga_dict, stats_dict
    from sagactl.settings import DEFAULT_ADDRESS, ENV_ADDRESS, ENV_CA_FILE, ENV_TOKEN, ClientConfig
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    values = call.values
    # Click reads an option's environment variable only when it is set and not empty.
    config = ClientConfig(
        address=values.get("address", os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS),
        token=values.get("token", os.environ.get(ENV_TOKEN) or ""),
        ca_file=values.get("ca_file", os.environ.get(ENV_CA_FILE) or ""),
        timeout=float(values.get("timeout", "10")),
    )
    fetch: Callable[[SagaClient], object]
    try:
        if call.command == "ls":
            request = filter_request(
                parse_statuses(call.statuses),
                values.get("saga_type", ""),
                values.get("order", ""),
                values.get("since", ""),
                values.get("older_than", ""),
            )
            request.page_size = int(values.get("limit", "20"))
            request.page_token = values.get("page_token", "")
            every = "--all" in call.flags
            fetch = lambda client: list_dict(*client.list_page(request, all_pages=every))  # noqa: E731
        elif call.command == "show":
            fetch = lambda client: saga_dict(client.resolve(call.positional[0]))  # noqa: E731
        else:
            stats_request = pb.GetSagaStatsRequest()
            if values.get("since"):
                stats_request.created_after.CopyFrom(stamp_ago(parse_duration(values["since"], "--since")))
            fetch = lambda client: stats_dict(client.stats(stats_request))  # noqa: E731
    except BadOption:
        return None  # typer words the usage error
    try:
        with SagaClient(config) as client:
            found = fetch(client)
    except ClientError as error:
        # Every command given --json words its errors so (sagactl.common.report_error): one line of JSON.
        print(error_json(error.message, error.exit_code, error.code_name, error.reason), file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print(error_json("interrupted", 130), file=sys.stderr, flush=True)
        return 130
    print(json_text(found), flush=True)
    return 0


def main() -> None:
    args = sys.argv[1:]
    if args == ["--version"]:
        from sagactl.settings import version_line

        print(version_line())
        return
    # A shell asking for completions runs `saga` with no arguments and _SAGA_COMPLETE set: typer answers it.
    if args in ([], ["--help"]) and not os.environ.get("_SAGA_COMPLETE"):
        from sagactl.roothelp import root_help
        from sagactl.settings import EXIT_OK, EXIT_USAGE

        # What the typer app prints too (its root group formats sagactl.roothelp), exit code included.
        sys.stdout.write(root_help())
        sys.exit(EXIT_USAGE if not args else EXIT_OK)
    exit_code = fast_read(args)
    if exit_code is not None:
        sys.exit(exit_code)
    from sagactl.app import main as run_app

    run_app()


if __name__ == "__main__":
    main()
