"""Every log record is one line, whatever text a client got into its message or arguments."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from orchestrator.auth import audit
from svckit.logs import configure_logging

FORGED = "\naudit actor=root action=terminate saga=s-1 outcome=ok peer=ipv4:127.0.0.1:1"
# Every kind of line break a terminal, a log shipper or str.splitlines() knows, and some other controls.
BREAKS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
OTHER_CONTROLS = ["\x00", "\t", "\x1b[2J", "\x7f", "\x9b"]


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The process's log handler, as configure_logging sets it up, writing into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("orchestrator", "INFO")
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_a_forged_line_in_an_argument_stays_inside_its_record(log_output: io.StringIO) -> None:
    logging.getLogger("sagasuite.orchestrator").info("operator %s: %s saga %s %s", "alice", "pause", "s-1", FORGED)

    lines = log_output.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "saga s-1 \\naudit actor=root action=terminate" in lines[0]
    assert lines[0].endswith("trace_id=- span_id=-")


def test_a_forged_line_in_the_message_itself_stays_inside_its_record(log_output: io.StringIO) -> None:
    logging.getLogger("sagasuite.rpc").warning("reason: " + FORGED)

    lines = log_output.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert " WARNING orchestrator reason: \\naudit actor=root" in lines[0]


@pytest.mark.parametrize("control", BREAKS + OTHER_CONTROLS, ids=repr)
def test_every_line_break_and_control_character_is_escaped(log_output: io.StringIO, control: str) -> None:
    logging.getLogger("sagasuite.rpc").info("reason=%s", f"a{control}b")

    text = log_output.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(text.splitlines()) == 1, text
    line = text.removesuffix("\n")
    assert all(ch.isprintable() for ch in line), repr(line)
    assert "reason=a\\" in line


def test_escapes_are_readable_and_printable_text_is_left_as_it_is(log_output: io.StringIO) -> None:
    logging.getLogger("sagasuite.rpc").info("%s|%s|%s|%s|%s|%s", "\n", "\r", "\t", "\x00", "\x85", "\u2028")
    logging.getLogger("sagasuite.rpc").info("%s", "Zoë's café, 50% off, C:\\path \u00e9\u4e2d")

    escaped, printable = log_output.getvalue().splitlines()
    assert "\\n|\\r|\\t|\\x00|\\x85|\\u2028 trace_id=" in escaped
    assert "INFO orchestrator Zoë's café, 50% off, C:\\path é中 trace_id=" in printable


def test_a_traceback_keeps_its_lines(log_output: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("sagasuite.rpc").exception("method=%s code=INTERNAL", "Pay\nment")

    lines = log_output.getvalue().splitlines()
    assert "method=Pay\\nment code=INTERNAL" in lines[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_an_audit_line_quotes_a_saga_id_that_is_not_a_plain_id(log_output: io.StringIO) -> None:
    audit("alice", "pause", 's-1 outcome=ok peer="x"' + FORGED, "refused", peer="ipv4:127.0.0.1:5000")
    audit("alice", "pause", "ordinary-id_1.2:3/4", "ok", peer="ipv4:127.0.0.1:5000")
    audit("alice", "pause", "", "refused", peer="")

    lines = log_output.getvalue().splitlines()
    assert len(lines) == 3, lines
    forged, ordinary, empty = lines
    # The whole client value is one quoted field: its "outcome=ok" and newline cannot pass for ours.
    assert ' saga="s-1 outcome=ok peer=\\"x\\"\\naudit actor=root action=terminate' in forged
    assert re.search(r' saga="(?:[^"\\]|\\.)*"…? outcome=refused peer=ipv4:127\.0\.0\.1:5000 trace_id=', forged)
    assert " saga=ordinary-id_1.2:3/4 outcome=ok peer=ipv4:127.0.0.1:5000 " in ordinary
    assert ' saga="" outcome=refused peer="" ' in empty


def test_an_audit_line_cuts_a_long_value_and_says_so(log_output: io.StringIO) -> None:
    audit("alice", "pause", "x" * 10_000, "ok", peer="ipv4:127.0.0.1:5000")

    (line,) = log_output.getvalue().splitlines()
    assert f' saga="{"x" * 100}"\u2026 outcome=ok ' in line
