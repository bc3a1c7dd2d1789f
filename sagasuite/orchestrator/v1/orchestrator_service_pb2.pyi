import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sagasuite.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SagaStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAGA_STATUS_UNSPECIFIED: _ClassVar[SagaStatus]
    SAGA_STATUS_RUNNING: _ClassVar[SagaStatus]
    SAGA_STATUS_COMPENSATING: _ClassVar[SagaStatus]
    SAGA_STATUS_PAUSED: _ClassVar[SagaStatus]
    SAGA_STATUS_COMPLETED: _ClassVar[SagaStatus]
    SAGA_STATUS_COMPENSATED: _ClassVar[SagaStatus]
    SAGA_STATUS_NEEDS_ATTENTION: _ClassVar[SagaStatus]
    SAGA_STATUS_TERMINATED: _ClassVar[SagaStatus]
SAGA_STATUS_UNSPECIFIED: SagaStatus
SAGA_STATUS_RUNNING: SagaStatus
SAGA_STATUS_COMPENSATING: SagaStatus
SAGA_STATUS_PAUSED: SagaStatus
SAGA_STATUS_COMPLETED: SagaStatus
SAGA_STATUS_COMPENSATED: SagaStatus
SAGA_STATUS_NEEDS_ATTENTION: SagaStatus
SAGA_STATUS_TERMINATED: SagaStatus

class PlaceOrderRequest(_message.Message):
    __slots__ = ("order_id", "customer_email", "items", "amount", "payment_token", "shipping_address", "deadline_seconds")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHIPPING_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    customer_email: str
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.LineItem]
    amount: _common_pb2.Money
    payment_token: str
    shipping_address: _common_pb2.Address
    deadline_seconds: int
    def __init__(self, order_id: _Optional[str] = ..., customer_email: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_common_pb2.LineItem, _Mapping]]] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., payment_token: _Optional[str] = ..., shipping_address: _Optional[_Union[_common_pb2.Address, _Mapping]] = ..., deadline_seconds: _Optional[int] = ...) -> None: ...

class PlaceOrderResponse(_message.Message):
    __slots__ = ("saga_id", "status", "created")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    status: SagaStatus
    created: bool
    def __init__(self, saga_id: _Optional[str] = ..., status: _Optional[_Union[SagaStatus, str]] = ..., created: bool = ...) -> None: ...

class StartSagaRequest(_message.Message):
    __slots__ = ("saga_type", "business_key", "input", "deadline_seconds", "input_struct", "input_json")
    SAGA_TYPE_FIELD_NUMBER: _ClassVar[int]
    BUSINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_STRUCT_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    saga_type: str
    business_key: str
    input: _any_pb2.Any
    deadline_seconds: int
    input_struct: _struct_pb2.Struct
    input_json: str
    def __init__(self, saga_type: _Optional[str] = ..., business_key: _Optional[str] = ..., input: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., deadline_seconds: _Optional[int] = ..., input_struct: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., input_json: _Optional[str] = ...) -> None: ...

class StartSagaResponse(_message.Message):
    __slots__ = ("saga_id", "status", "created", "definition_version", "business_key")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUSINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    status: SagaStatus
    created: bool
    definition_version: int
    business_key: str
    def __init__(self, saga_id: _Optional[str] = ..., status: _Optional[_Union[SagaStatus, str]] = ..., created: bool = ..., definition_version: _Optional[int] = ..., business_key: _Optional[str] = ...) -> None: ...

class GetSagaRequest(_message.Message):
    __slots__ = ("saga_id",)
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    def __init__(self, saga_id: _Optional[str] = ...) -> None: ...

class GetSagaResponse(_message.Message):
    __slots__ = ("saga",)
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class StepAttempt(_message.Message):
    __slots__ = ("direction", "attempt", "started_at", "ended_at", "code", "message")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    direction: str
    attempt: int
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    code: str
    message: str
    def __init__(self, direction: _Optional[str] = ..., attempt: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SagaStep(_message.Message):
    __slots__ = ("name", "index", "state", "attempts", "last_error", "kind", "group", "branch", "child_saga_id", "result_json", "result_truncated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    CHILD_SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    state: str
    attempts: _containers.RepeatedCompositeFieldContainer[StepAttempt]
    last_error: str
    kind: str
    group: str
    branch: int
    child_saga_id: str
    result_json: str
    result_truncated: bool
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., state: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[StepAttempt, _Mapping]]] = ..., last_error: _Optional[str] = ..., kind: _Optional[str] = ..., group: _Optional[str] = ..., branch: _Optional[int] = ..., child_saga_id: _Optional[str] = ..., result_json: _Optional[str] = ..., result_truncated: bool = ...) -> None: ...

class SagaWait(_message.Message):
    __slots__ = ("kind", "step", "branch", "signal", "since", "until", "child_saga_id", "description")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    CHILD_SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step: str
    branch: int
    signal: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    child_saga_id: str
    description: str
    def __init__(self, kind: _Optional[str] = ..., step: _Optional[str] = ..., branch: _Optional[int] = ..., signal: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., child_saga_id: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ChildLink(_message.Message):
    __slots__ = ("step", "saga_id", "saga_type", "status")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    SAGA_TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    step: str
    saga_id: str
    saga_type: str
    status: SagaStatus
    def __init__(self, step: _Optional[str] = ..., saga_id: _Optional[str] = ..., saga_type: _Optional[str] = ..., status: _Optional[_Union[SagaStatus, str]] = ...) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("seq", "at", "type", "step", "attempt", "code", "message", "actor")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    type: str
    step: str
    attempt: int
    code: str
    message: str
    actor: str
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., type: _Optional[str] = ..., step: _Optional[str] = ..., attempt: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class Saga(_message.Message):
    __slots__ = ("saga_id", "saga_type", "definition_version", "business_key", "status", "created_at", "updated_at", "ended_at", "deadline_at", "current_step", "last_error", "steps", "history", "trace_id", "steps_maybe_applied", "waits", "parent_saga_id", "children", "input_json", "input_truncated", "contract_hash")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    SAGA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUSINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_AT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_MAYBE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WAITS_FIELD_NUMBER: _ClassVar[int]
    PARENT_SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_HASH_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    saga_type: str
    definition_version: int
    business_key: str
    status: SagaStatus
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    deadline_at: _timestamp_pb2.Timestamp
    current_step: str
    last_error: str
    steps: _containers.RepeatedCompositeFieldContainer[SagaStep]
    history: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    trace_id: str
    steps_maybe_applied: _containers.RepeatedScalarFieldContainer[str]
    waits: _containers.RepeatedCompositeFieldContainer[SagaWait]
    parent_saga_id: str
    children: _containers.RepeatedCompositeFieldContainer[ChildLink]
    input_json: str
    input_truncated: bool
    contract_hash: str
    def __init__(self, saga_id: _Optional[str] = ..., saga_type: _Optional[str] = ..., definition_version: _Optional[int] = ..., business_key: _Optional[str] = ..., status: _Optional[_Union[SagaStatus, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., current_step: _Optional[str] = ..., last_error: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[SagaStep, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ..., trace_id: _Optional[str] = ..., steps_maybe_applied: _Optional[_Iterable[str]] = ..., waits: _Optional[_Iterable[_Union[SagaWait, _Mapping]]] = ..., parent_saga_id: _Optional[str] = ..., children: _Optional[_Iterable[_Union[ChildLink, _Mapping]]] = ..., input_json: _Optional[str] = ..., input_truncated: bool = ..., contract_hash: _Optional[str] = ...) -> None: ...

class ListSagasRequest(_message.Message):
    __slots__ = ("statuses", "saga_type", "created_after", "created_before", "business_key", "page_size", "page_token", "saga_id_prefix", "business_key_prefix", "current_step", "error_code")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    SAGA_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BUSINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SAGA_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BUSINESS_KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[SagaStatus]
    saga_type: str
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    business_key: str
    page_size: int
    page_token: str
    saga_id_prefix: str
    business_key_prefix: str
    current_step: str
    error_code: str
    def __init__(self, statuses: _Optional[_Iterable[_Union[SagaStatus, str]]] = ..., saga_type: _Optional[str] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., business_key: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., saga_id_prefix: _Optional[str] = ..., business_key_prefix: _Optional[str] = ..., current_step: _Optional[str] = ..., error_code: _Optional[str] = ...) -> None: ...

class ListSagasResponse(_message.Message):
    __slots__ = ("sagas", "next_page_token")
    SAGAS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sagas: _containers.RepeatedCompositeFieldContainer[Saga]
    next_page_token: str
    def __init__(self, sagas: _Optional[_Iterable[_Union[Saga, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchSagaRequest(_message.Message):
    __slots__ = ("saga_id", "after_seq")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    after_seq: int
    def __init__(self, saga_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class WatchSagaResponse(_message.Message):
    __slots__ = ("event", "status")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    event: HistoryEvent
    status: SagaStatus
    def __init__(self, event: _Optional[_Union[HistoryEvent, _Mapping]] = ..., status: _Optional[_Union[SagaStatus, str]] = ...) -> None: ...

class RetrySagaRequest(_message.Message):
    __slots__ = ("saga_id",)
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    def __init__(self, saga_id: _Optional[str] = ...) -> None: ...

class RetrySagaResponse(_message.Message):
    __slots__ = ("saga",)
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class PauseSagaRequest(_message.Message):
    __slots__ = ("saga_id", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseSagaResponse(_message.Message):
    __slots__ = ("saga",)
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class ResumeSagaRequest(_message.Message):
    __slots__ = ("saga_id",)
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    def __init__(self, saga_id: _Optional[str] = ...) -> None: ...

class ResumeSagaResponse(_message.Message):
    __slots__ = ("saga",)
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class CancelSagaRequest(_message.Message):
    __slots__ = ("saga_id", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelSagaResponse(_message.Message):
    __slots__ = ("saga",)
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class TerminateSagaRequest(_message.Message):
    __slots__ = ("saga_id", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TerminateSagaResponse(_message.Message):
    __slots__ = ("saga", "steps_maybe_applied")
    SAGA_FIELD_NUMBER: _ClassVar[int]
    STEPS_MAYBE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    steps_maybe_applied: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ..., steps_maybe_applied: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSagaStatsRequest(_message.Message):
    __slots__ = ("created_after",)
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    created_after: _timestamp_pb2.Timestamp
    def __init__(self, created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StatusCount(_message.Message):
    __slots__ = ("status", "count")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    status: SagaStatus
    count: int
    def __init__(self, status: _Optional[_Union[SagaStatus, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetSagaStatsResponse(_message.Message):
    __slots__ = ("counts", "completion_p50_ms", "completion_p95_ms", "completion_p99_ms", "oldest_in_flight", "in_flight", "needs_attention", "oldest_needs_attention")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_P50_MS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_P95_MS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_P99_MS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    NEEDS_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    OLDEST_NEEDS_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedCompositeFieldContainer[StatusCount]
    completion_p50_ms: float
    completion_p95_ms: float
    completion_p99_ms: float
    oldest_in_flight: Saga
    in_flight: int
    needs_attention: int
    oldest_needs_attention: Saga
    def __init__(self, counts: _Optional[_Iterable[_Union[StatusCount, _Mapping]]] = ..., completion_p50_ms: _Optional[float] = ..., completion_p95_ms: _Optional[float] = ..., completion_p99_ms: _Optional[float] = ..., oldest_in_flight: _Optional[_Union[Saga, _Mapping]] = ..., in_flight: _Optional[int] = ..., needs_attention: _Optional[int] = ..., oldest_needs_attention: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class SignalSagaRequest(_message.Message):
    __slots__ = ("saga_id", "saga_type", "business_key", "name", "signal_id", "payload")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    SAGA_TYPE_FIELD_NUMBER: _ClassVar[int]
    BUSINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    saga_type: str
    business_key: str
    name: str
    signal_id: str
    payload: _struct_pb2.Struct
    def __init__(self, saga_id: _Optional[str] = ..., saga_type: _Optional[str] = ..., business_key: _Optional[str] = ..., name: _Optional[str] = ..., signal_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class SignalSagaResponse(_message.Message):
    __slots__ = ("saga_id", "received_at", "duplicate")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    received_at: _timestamp_pb2.Timestamp
    duplicate: bool
    def __init__(self, saga_id: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duplicate: bool = ...) -> None: ...

class DecideApprovalRequest(_message.Message):
    __slots__ = ("saga_id", "step", "approve", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    step: str
    approve: bool
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., step: _Optional[str] = ..., approve: bool = ..., reason: _Optional[str] = ...) -> None: ...

class DecideApprovalResponse(_message.Message):
    __slots__ = ("saga", "duplicate")
    SAGA_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    duplicate: bool
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ..., duplicate: bool = ...) -> None: ...

class ListDefinitionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDefinitionsResponse(_message.Message):
    __slots__ = ("definitions",)
    DEFINITIONS_FIELD_NUMBER: _ClassVar[int]
    definitions: _containers.RepeatedCompositeFieldContainer[SagaDefinitionInfo]
    def __init__(self, definitions: _Optional[_Iterable[_Union[SagaDefinitionInfo, _Mapping]]] = ...) -> None: ...

class SagaDefinitionInfo(_message.Message):
    __slots__ = ("name", "version", "source", "input_type", "fingerprint", "contract_hash", "deadline_seconds", "services", "nodes", "running", "latest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_HASH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    source: str
    input_type: str
    fingerprint: str
    contract_hash: str
    deadline_seconds: float
    services: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedCompositeFieldContainer[DefinitionNode]
    running: int
    latest: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., source: _Optional[str] = ..., input_type: _Optional[str] = ..., fingerprint: _Optional[str] = ..., contract_hash: _Optional[str] = ..., deadline_seconds: _Optional[float] = ..., services: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[_Union[DefinitionNode, _Mapping]]] = ..., running: _Optional[int] = ..., latest: bool = ...) -> None: ...

class DefinitionNode(_message.Message):
    __slots__ = ("name", "kind", "index", "group", "branch", "step_kind", "action", "compensation", "conditional", "timeout_seconds", "signal", "child", "pivot", "on_timeout", "call_timeout_seconds", "budget_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    STEP_KIND_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    CHILD_FIELD_NUMBER: _ClassVar[int]
    PIVOT_FIELD_NUMBER: _ClassVar[int]
    ON_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CALL_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    index: int
    group: str
    branch: int
    step_kind: str
    action: str
    compensation: str
    conditional: bool
    timeout_seconds: float
    signal: str
    child: str
    pivot: bool
    on_timeout: str
    call_timeout_seconds: float
    budget_seconds: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., index: _Optional[int] = ..., group: _Optional[str] = ..., branch: _Optional[int] = ..., step_kind: _Optional[str] = ..., action: _Optional[str] = ..., compensation: _Optional[str] = ..., conditional: bool = ..., timeout_seconds: _Optional[float] = ..., signal: _Optional[str] = ..., child: _Optional[str] = ..., pivot: bool = ..., on_timeout: _Optional[str] = ..., call_timeout_seconds: _Optional[float] = ..., budget_seconds: _Optional[float] = ...) -> None: ...

class PlaceOrderAndWaitRequest(_message.Message):
    __slots__ = ("order",)
    ORDER_FIELD_NUMBER: _ClassVar[int]
    order: PlaceOrderRequest
    def __init__(self, order: _Optional[_Union[PlaceOrderRequest, _Mapping]] = ...) -> None: ...

class StartSagaAndWaitRequest(_message.Message):
    __slots__ = ("start",)
    START_FIELD_NUMBER: _ClassVar[int]
    start: StartSagaRequest
    def __init__(self, start: _Optional[_Union[StartSagaRequest, _Mapping]] = ...) -> None: ...

class PlaceOrderAndWaitResponse(_message.Message):
    __slots__ = ("saga_id", "created", "saga")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    created: bool
    saga: Saga
    def __init__(self, saga_id: _Optional[str] = ..., created: bool = ..., saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class StartSagaAndWaitResponse(_message.Message):
    __slots__ = ("saga_id", "created", "definition_version", "saga")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    created: bool
    definition_version: int
    saga: Saga
    def __init__(self, saga_id: _Optional[str] = ..., created: bool = ..., definition_version: _Optional[int] = ..., saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...
