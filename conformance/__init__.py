"""The participant conformance kit: checks that a service honours what the orchestrator relies on."""

from conformance._checks import (
    COMMITTED_LIMIT,
    DEADLINE_ROUNDS,
    DUPLICATES,
    EXPIRED_CALLS,
    EXPIRED_GRPC_TIMEOUT,
    run_conformance,
)
from conformance._load import DEFAULT_KEY_FIELD, DefinitionSource, json_inputs, load_definition
from conformance._report import Check, CheckResult, Outcome, Report
from conformance._wire import TargetUnreachable

__all__ = [
    "COMMITTED_LIMIT",
    "DEADLINE_ROUNDS",
    "DEFAULT_KEY_FIELD",
    "DUPLICATES",
    "EXPIRED_CALLS",
    "EXPIRED_GRPC_TIMEOUT",
    "Check",
    "CheckResult",
    "DefinitionSource",
    "Outcome",
    "Report",
    "TargetUnreachable",
    "json_inputs",
    "load_definition",
    "run_conformance",
]
