"""The text of `saga --help`, laid out without typer or rich so the entry point can print it at once."""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
from collections.abc import Sequence

from sagactl.settings import (
    DEFAULT_ADDRESS,
    ENV_ADDRESS,
    ENV_CA_FILE,
    ENV_TOKEN,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

__all__ = ["COMMANDS", "OPTIONAL_PACKAGES", "OPTIONS", "SUMMARY", "root_help", "summary"]

# typer renders its help through rich, which costs about twice grpc's own import: `saga --help` is this text
# instead, printed by sagactl.main before typer loads and by the typer app's root group alike.
# tests/unit/test_sagactl_help.py holds it to the typer app: every command with the first paragraph of its own
# help, every root option with its help.

SUMMARY = "Sagasuite: run the local stack, place orders, watch and operate sagas."
_DESCRIPTION = (
    f"Every command but up and demo talks to the orchestrator at --address (env {ENV_ADDRESS}, default "
    f'{DEFAULT_ADDRESS}). With {ENV_TOKEN} (or --token) set, calls carry "authorization: Bearer <token>"; with '
    f"{ENV_CA_FILE} (or --ca-file) naming a PEM CA bundle, they use TLS. Read commands take --json."
)
_EXIT_CODES = (
    (str(EXIT_OK), "ok"),
    (
        str(EXIT_FAILED),
        "the saga ended badly (compensated, needs attention, terminated), or some calls of a batch were refused",
    ),
    (str(EXIT_USAGE), "usage error (bad option or argument)"),
    (str(EXIT_UNREACHABLE), "the orchestrator is unreachable (or did not answer in time)"),
    (
        str(EXIT_REFUSED),
        "refused by the orchestrator (invalid argument, not found, failed precondition, permission denied, "
        "unauthenticated)",
    ),
)
_EXAMPLES = (
    ("saga up", "run the local stack (Ctrl-C stops it)"),
    ("saga order --item BOOK-001:2", "place an order and follow its saga"),
    ("saga start OrderSaga --input order.json", "start a saga from JSON input"),
    ("saga ls --status needs_attention", "sagas waiting for an operator"),
    ("saga show ord-1234", "one saga: steps, timeline, time bars"),
    ("saga retry --status needs_attention --yes", ""),
    ("saga approve ord-1234", "let an order waiting for its fraud review go on"),
)
# The root options: sagactl.app's --version, and typer's own --install-completion, --show-completion and --help.
OPTIONS = (
    ("--version", "print the sagasuite version and exit"),
    ("--install-completion", "Install completion for the current shell."),
    ("--show-completion", "Show completion for the current shell, to copy it or customize the installation."),
    ("--help", "Show this message and exit."),
)
# Every command, in the order the help lists them, with the first paragraph of its help.
COMMANDS = {
    "demo": "Start the local stack with OrderSaga v2, place demo orders (success, decline, transient failure, out "
    "of stock, and two that wait for a fraud review: one approved with saga approve, one rejected with saga "
    "reject), print each saga's outcome, steps and timeline and the order's child saga, then stop everything.",
    "up": "Run the local stack in the foreground: the four services and the orchestrator on loopback, with a live "
    "status panel (each process, its port, health, sagas in flight). Ctrl-C stops everything.",
    "order": "Place an order: print the saga id, then follow the saga to its end.",
    "start": "Start a saga of any loaded type from JSON input: print its id, and with --watch follow it to its end.",
    "ls": "List sagas, newest first, filtered by status, type, age and order id; one page at a time.",
    "show": "Describe one saga: its header, each step's state and tries, every call as a timeline table (attempts, "
    "durations, codes, messages, compensations), and the calls as bars on the saga's time axis, so a slow step or "
    "a retry storm stands out.",
    "watch": "Print a saga's events as they happen (its history so far first) until it ends or needs attention.",
    "stats": "Saga counts by status, the sagas in flight and those needing attention with the oldest of each, and "
    "completion-latency percentiles (p50, p95, p99).",
    "retry": "Run a saga that needs attention again from the step that failed.",
    "pause": "Hold a running (or compensating) saga after its current call, until it is resumed.",
    "resume": "Let a paused saga go on.",
    "cancel": "Compensate a running saga now (only before its pivot step, the shipment, has succeeded).",
    "terminate": "Stop a saga where it stands, without compensating; the reason is recorded.",
    "approve": "Approve a saga's approval step (OrderSaga v2's fraud_review, say): the saga goes on, with your "
    "token's name on record as the decider.",
    "reject": "Reject a saga's approval step: the saga compensates, with your token's name and the reason on record.",
    "signal": "Send a named signal with a JSON payload to a saga that waits for it (or will), by id or by type and "
    "business key; each signal id is delivered once.",
    "definitions": "The saga definitions the orchestrator has loaded: each version with its source, whether new "
    "sagas start on it, how many of its sagas run, and its steps.",
    "conformance": "Check that the services a saga definition calls honour the participant contract, for each "
    "call step's action and compensation: replays byte for byte, key reuse refused, 20 concurrent duplicates run "
    "once, compensation before action, refusals with a reason, health, reflection, expired deadlines.",
    "web": "Serve the web console: list and filter sagas, follow one live (its graph, timeline, history and why it "
    "waits), and operate them after a login with an operator token.",
    "bench": "Benchmark the order saga through the orchestrator against the four calls alone (and peers).",
    "chaos": "Run sagas while killing processes, then check every invariant from the services' own records.",
}
# Commands whose code is in a package an installation may leave out (the Docker image copies no bench/).
OPTIONAL_PACKAGES = {"bench": "bench", "chaos": "bench"}

_WIDEST = 80
_NARROWEST = 50
# Below this many columns a description goes under its name rather than beside it.
_DESCRIPTION_COLUMNS = 24


def summary(name: str) -> str:
    """The line the root help gives a command, with a note when the package it needs is not installed."""
    package = OPTIONAL_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        return f"{COMMANDS[name]} (needs the {package} package: not installed here)"
    return COMMANDS[name]


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    # Options and variables (--ca-file, SAGA_CA_FILE) stay whole.
    return textwrap.wrap(
        text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False
    )


def _rows(rows: Sequence[tuple[str, str]], inner: int) -> list[str]:
    """Two columns, names and descriptions, wrapped within inner columns."""
    described = [name for name, text in rows if text]
    names = max(map(len, described)) + 2 if described else 0
    beside = inner - names >= _DESCRIPTION_COLUMNS
    lines: list[str] = []
    for name, text in rows:
        if not text:
            lines += _wrap(name, inner)
        elif beside:
            wrapped = _wrap(text, inner - names)
            lines.append(name.ljust(names) + wrapped[0])
            lines += [" " * names + more for more in wrapped[1:]]
        else:
            lines.append(name)
            lines += _wrap(text, inner, indent="    ")
    return lines


def _panel(title: str, lines: list[str], width: int) -> list[str]:
    """Lines in a box, as typer draws its panels."""
    inner = width - 4
    top = f"╭─ {title} " + "─" * (width - len(title) - 5) + "╮"
    middle = [f"│ {line.ljust(inner)} │" for line in lines]
    return [top, *middle, "╰" + "─" * (width - 2) + "╯"]


def root_help(width: int | None = None) -> str:
    """The root help at width columns (default: the terminal's; at least 50, at most 80), ending in a newline."""
    if width is None:
        width = shutil.get_terminal_size((_WIDEST, 24)).columns
    width = max(_NARROWEST, min(_WIDEST, width))
    inner = width - 4
    commands = [(name, summary(name)) for name in COMMANDS]
    text = [" Usage: saga [OPTIONS] COMMAND [ARGS]...", ""]
    for paragraph in (SUMMARY, _DESCRIPTION):
        text += _wrap(paragraph, width - 1, indent=" ")
        text.append("")
    text += _panel("Exit codes", _rows(_EXIT_CODES, inner), width)
    text += _panel("Examples", _rows(_EXAMPLES, inner), width)
    text += _panel("Options", _rows(OPTIONS, inner), width)
    text += _panel("Commands", _rows(commands, inner), width)
    return "\n".join(text) + "\n"
