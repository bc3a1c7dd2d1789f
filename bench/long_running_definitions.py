"""The saga definitions bench.long_running loads into the orchestrator (SAGA_DEFINITIONS=module:attribute).

Each saga's only node is the wait it measures, so no service call is in the figures: they are the
orchestrator's cost of parking a saga, waking it and ending it. The input is a JSON object
(`google.protobuf.Struct`): `key`, the business key, and for the timer `wake_at`, epoch seconds.
"""

from __future__ import annotations

from google.protobuf import struct_pb2

from orchestrator.definition import OnTimeout, SagaContext, SagaDefinition, Timer, WaitForSignal

__all__ = [
    "LONG_RUNNING_DEFINITIONS",
    "PARKED_SAGA",
    "PARKED_SIGNAL",
    "PARKED_TIMEOUT_SECONDS",
    "TIMER_SAGA",
    "input_key",
]

# How long a parked saga waits for its signal: far longer than any run of the benchmark.
PARKED_TIMEOUT_SECONDS = 3600.0
PARKED_SIGNAL = "go"


def input_key(payload: struct_pb2.Struct) -> str:
    """The business key of a benchmark saga: its input's `key`."""
    return str(payload["key"])


def _wake_at(s: SagaContext) -> float:
    return float(s.input["wake_at"])


# A saga has no compensatable step here, so its waits come after the (absent) pivot: a timeout
# would leave the saga to an operator rather than compensate, which a benchmark never reaches.
PARKED_SAGA = SagaDefinition(
    name="BenchParked",
    version=1,
    input_type=struct_pb2.Struct,
    steps=(WaitForSignal("parked", signal=PARKED_SIGNAL, timeout=PARKED_TIMEOUT_SECONDS, on_timeout=OnTimeout.FAIL),),
    business_key=input_key,
    deadline=2 * PARKED_TIMEOUT_SECONDS,
)

TIMER_SAGA = SagaDefinition(
    name="BenchTimer",
    version=1,
    input_type=struct_pb2.Struct,
    steps=(Timer("wake", until=_wake_at),),
    business_key=input_key,
    deadline=PARKED_TIMEOUT_SECONDS,
)

LONG_RUNNING_DEFINITIONS = [PARKED_SAGA, TIMER_SAGA]
