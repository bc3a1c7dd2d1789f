"""Process logging: one line per event, with the trace and span ids of the current span."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace

__all__ = ["configure_logging"]


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
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {process_name} %(message)s trace_id=%(trace_id)s span_id=%(span_id)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
