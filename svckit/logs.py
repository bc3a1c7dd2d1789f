"""Process logging: one line per event, with the trace and span ids of the current span."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace

__all__ = ["OneLineFormatter", "configure_logging", "escape_controls"]


def _escape(code_point: int) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(chr(code_point))
    if named is not None:
        return named
    return f"\\x{code_point:02x}" if code_point < 0x100 else f"\\u{code_point:04x}"


# C0, DEL, C1 (NEL, U+0085, among them) and the Unicode line and paragraph separators: every
# character a terminal, a log shipper or str.splitlines() may take for the end of a line.
_CONTROLS = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = str.maketrans({code_point: _escape(code_point) for code_point in _CONTROLS})


def escape_controls(text: str) -> str:
    """text with every control character written as a visible escape (\\n, \\x1b, \\u2028), so it stays one line."""
    # Nearly every line is printable as it is; isprintable() says so far faster than translate() finds out.
    return text if text.isprintable() else text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """A Formatter whose records are one line each, whatever text a client got into the message.

    The message is escaped after the %-arguments are put in, so a newline in any argument, or in
    the message itself, cannot start a forged line. Tracebacks are appended as they are: they are
    the process's own multi-line output.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class _TraceIdsFilter(logging.Filter):
    """Adds trace_id and span_id to every record so a log line can be found in Jaeger."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        record.span_id = format(context.span_id, "016x") if context.is_valid else "-"
        return True


def configure_logging(process_name: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceIdsFilter())
    # The name goes into the format string itself: no "%" may start a field there.
    name = escape_controls(process_name).replace("%", "%%")
    handler.setFormatter(
        OneLineFormatter(f"%(asctime)s %(levelname)s {name} %(message)s trace_id=%(trace_id)s span_id=%(span_id)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
