"""What the console's pages show, computed from the orchestrator's messages: filters, node states, why a saga waits."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from urllib.parse import urlencode

from google.protobuf.timestamp_pb2 import Timestamp

from sagactl.client import STATUS_WORDS, BadOption, parse_duration
from sagactl.definition_graph import NodeState
from sagactl.render import age, status_name
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = [
    "ENDED",
    "IN_FLIGHT",
    "OPERATION_SPECS",
    "STATUS_NAMES",
    "Attempts",
    "BadFilter",
    "Fact",
    "HistoryRow",
    "ListFilter",
    "OperationSpec",
    "ReasonRule",
    "StatusCount",
    "StepResult",
    "ago",
    "attempts_of",
    "clock",
    "fallback_definition",
    "history_rows",
    "node_states",
    "operations_for",
    "pretty_json",
    "seconds",
    "short_id",
    "status_counts",
    "step_results",
    "took",
    "when",
    "why_stuck",
]

# Every status, in the order the console lists them: in flight first, then what needs a person, then the ends.
STATUS_NAMES = ("RUNNING", "COMPENSATING", "PAUSED", "NEEDS_ATTENTION", "COMPLETED", "COMPENSATED", "TERMINATED")
IN_FLIGHT = frozenset({"RUNNING", "COMPENSATING", "PAUSED"})
ENDED = frozenset({"COMPLETED", "COMPENSATED", "TERMINATED"})


# -- times ----------------------------------------------------------------------------------------


def seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def when(stamp: Timestamp | float | None) -> str:
    """A moment as people read it here: "2026-12-02 07:48:41Z" (UTC, so every reader sees the same); "" when unset."""
    if stamp is None:
        return ""
    moment = stamp if isinstance(stamp, float) else seconds(stamp)
    if moment <= 0:
        return ""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def clock(stamp: Timestamp) -> str:
    """The time of day to the millisecond, UTC: "07:48:41.706"."""
    return datetime.fromtimestamp(seconds(stamp), UTC).strftime("%H:%M:%S.%f")[:-3]


def ago(stamp: Timestamp, now: float) -> str:
    """How long ago a moment was: "12s", "5m 3s"."""
    return age(max(0.0, now - seconds(stamp)))


def took(saga: pb.Saga, now: float) -> str:
    """How long the saga ran, or has run so far ("…" after it while in flight)."""
    end = seconds(saga.ended_at) if saga.HasField("ended_at") else now
    spent = age(max(0.0, end - seconds(saga.created_at)))
    return spent if saga.HasField("ended_at") else f"{spent}…"


def short_id(saga_id: str) -> str:
    """The first 8 characters of an id: enough to tell sagas apart on a page, and accepted by the lookup."""
    return saga_id[:8]


# -- the list: filters and counts -----------------------------------------------------------------


class BadFilter(ValueError):
    """A filter value the console cannot use, with the field it was given in."""

    def __init__(self, message: str, field_name: str) -> None:
        super().__init__(message)
        self.message = message
        self.field_name = field_name


def _moment(text: str, field_name: str, now: float) -> float:
    """Seconds since the epoch of "15m" (that long ago), "2026-12-02T07:00" or "2026-12-02" (UTC unless an offset is
    given); BadFilter otherwise."""
    try:
        return now - parse_duration(text, field_name)
    except BadOption:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise BadFilter(
            f"{text!r} is neither a duration (30s, 10m, 2h, 1d) nor a time (2026-12-02T07:00, UTC)", field_name
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _stamp(moment: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(moment * 1e9))
    return stamp


@dataclass(frozen=True)
class ListFilter:
    """The list page's filter, as the query string carries it."""

    statuses: tuple[str, ...] = ()
    saga_type: str = ""
    key_prefix: str = ""
    current_step: str = ""
    error_code: str = ""
    since: str = ""
    until: str = ""
    page_size: int = 50
    page_token: str = ""

    @classmethod
    def parse(cls, query: Mapping[str, Sequence[str]]) -> ListFilter:
        """The filter of a query string (each name to its values); BadFilter for a value it cannot use."""

        def one(name: str) -> str:
            values = query.get(name) or [""]
            return values[-1].strip()

        statuses: list[str] = []
        for value in query.get("status") or []:
            for word in filter(None, (part.strip().lower() for part in value.split(","))):
                if word not in STATUS_WORDS:
                    raise BadFilter(f"unknown status {word!r}; use one of {', '.join(STATUS_WORDS)}", "status")
                if word not in statuses:
                    statuses.append(word)
        size_text = one("limit") or "50"
        if not size_text.isdigit() or not 1 <= int(size_text) <= 500:
            raise BadFilter(f"{size_text!r} is not a page size from 1 to 500", "limit")
        found = cls(
            statuses=tuple(statuses),
            saga_type=one("type"),
            key_prefix=one("key"),
            current_step=one("step"),
            error_code=one("error").upper(),
            since=one("since"),
            until=one("until"),
            page_size=int(size_text),
            page_token=one("page"),
        )
        found.request(0.0)  # a time that does not parse is refused now, naming its field
        return found

    @property
    def narrowed(self) -> bool:
        """Whether any filter is set (beyond paging)."""
        return any((self.statuses, self.saga_type, self.key_prefix, self.current_step, self.error_code,
                    self.since, self.until))  # fmt: skip

    def status_values(self) -> list[int]:
        values: list[int] = []
        for word in self.statuses:
            values += [status for status in STATUS_WORDS[word] if status not in values]
        return values

    def request(self, now: float, *, statuses: Iterable[int] | None = None) -> pb.ListSagasRequest:
        """The ListSagasRequest for this filter (its statuses, or those given), times read against now."""
        request = pb.ListSagasRequest(
            statuses=list(self.status_values() if statuses is None else statuses),  # type: ignore[arg-type]
            saga_type=self.saga_type,
            business_key_prefix=self.key_prefix,
            current_step=self.current_step,
            error_code=self.error_code,
            page_size=self.page_size,
            page_token=self.page_token,
        )
        if self.since:
            request.created_after.CopyFrom(_stamp(_moment(self.since, "since", now)))
        if self.until:
            request.created_before.CopyFrom(_stamp(_moment(self.until, "until", now)))
        return request

    def query(self, **changes: str | int) -> str:
        """The query string of this filter, with changes (page="" drops the page token; status="" the statuses)."""
        values: dict[str, str | int | tuple[str, ...]] = {
            "status": self.statuses,
            "type": self.saga_type,
            "key": self.key_prefix,
            "step": self.current_step,
            "error": self.error_code,
            "since": self.since,
            "until": self.until,
            "limit": self.page_size if self.page_size != 50 else "",
            "page": self.page_token,
        }
        values.update(changes)
        pairs: list[tuple[str, str | int]] = []
        for name, value in values.items():
            if isinstance(value, tuple):
                pairs += [(name, item) for item in value]
            elif value != "":
                pairs.append((name, value))
        return urlencode(pairs)

    def hidden_fields(self) -> list[tuple[str, str]]:
        """The filter as (name, value) pairs for hidden form fields, without the page token."""
        pairs = [("status", word) for word in self.statuses]
        for name, value in (
            ("type", self.saga_type),
            ("key", self.key_prefix),
            ("step", self.current_step),
            ("error", self.error_code),
            ("since", self.since),
            ("until", self.until),
        ):
            if value:
                pairs.append((name, value))
        return pairs


@dataclass(frozen=True)
class StatusCount:
    """One status's count on the list page, with the filter word that selects it."""

    name: str
    word: str
    count: int


def status_counts(stats: pb.GetSagaStatsResponse) -> list[StatusCount]:
    counts = {status_name(count.status): count.count for count in stats.counts}
    return [StatusCount(name, name.lower(), counts.get(name, 0)) for name in STATUS_NAMES]


# -- operator calls -------------------------------------------------------------------------------


class ReasonRule(StrEnum):
    """Whether an operator call takes a reason for the history."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True)
class OperationSpec:
    """An operator call as the console offers it: on which statuses, with or without a reason, and what it does."""

    name: str
    label: str
    applies_to: tuple[str, ...]
    reason: ReasonRule
    does: str
    # Undoes or stops work: the console asks before it goes ahead.
    drastic: bool = False
    # The statuses a batch picks when its filter names none (as `saga <operation>` does).
    batch_default: tuple[str, ...] = ()

    @property
    def batch_statuses(self) -> tuple[str, ...]:
        return self.batch_default or self.applies_to


OPERATION_SPECS: dict[str, OperationSpec] = {
    spec.name: spec
    for spec in (
        OperationSpec(
            "retry", "Retry", ("NEEDS_ATTENTION",), ReasonRule.NONE, "runs it again from the step that failed"
        ),
        OperationSpec(
            "pause", "Pause", ("RUNNING", "COMPENSATING"), ReasonRule.OPTIONAL, "holds it after its current call"
        ),
        OperationSpec("resume", "Resume", ("PAUSED",), ReasonRule.NONE, "lets a paused saga go on"),
        OperationSpec(
            "cancel",
            "Cancel",
            ("RUNNING", "PAUSED"),
            ReasonRule.OPTIONAL,
            "compensates it now (only before its pivot step has succeeded)",
            drastic=True,
            batch_default=("RUNNING",),
        ),
        OperationSpec(
            "terminate",
            "Terminate",
            ("RUNNING", "COMPENSATING", "PAUSED", "NEEDS_ATTENTION"),
            ReasonRule.REQUIRED,
            "stops it where it stands without compensating; the reason is recorded",
            drastic=True,
        ),
    )
}


def operations_for(saga: pb.Saga) -> list[OperationSpec]:
    """The operator calls that apply to the saga as it stands."""
    status = status_name(saga.status)
    return [spec for spec in OPERATION_SPECS.values() if status in spec.applies_to]


# -- one saga: the graph's states, why it waits, history and results ------------------------------

_NODE_STATES = {
    "pending": NodeState.PENDING,
    "running": NodeState.RUNNING,
    "compensating": NodeState.RUNNING,
    "waiting": NodeState.WAITING,
    "succeeded": NodeState.DONE,
    "failed": NodeState.FAILED,
    "compensated": NodeState.COMPENSATED,
    "skipped": NodeState.SKIPPED,
}


def node_states(saga: pb.Saga) -> dict[str, NodeState]:
    """Each step's state as the definition graph colours it; a step with a wait open is waiting."""
    waiting = {wait.step for wait in saga.waits}
    states = {step.name: _NODE_STATES.get(step.state, NodeState.PENDING) for step in saga.steps}
    for name in waiting & states.keys():
        states[name] = NodeState.WAITING
    return states


def fallback_definition(saga: pb.Saga) -> pb.SagaDefinitionInfo:
    """A definition drawn from the saga's own steps, for a saga whose definition the orchestrator has not loaded:
    the shape and the kinds, without the calls' targets."""
    nodes = [
        pb.DefinitionNode(
            name=step.name, kind=step.kind or "call", index=step.index, group=step.group, branch=step.branch
        )
        for step in saga.steps
    ]
    return pb.SagaDefinitionInfo(name=saga.saga_type, version=saga.definition_version, nodes=nodes)


@dataclass(frozen=True)
class Fact:
    """One line of "why it is where it is": what, since when, until when, and a link to follow."""

    title: str
    detail: str = ""
    since: str = ""
    until: str = ""
    link: str = ""
    link_text: str = ""
    tone: str = "info"  # info, wait, bad


def _last(saga: pb.Saga, *types: str, step: str | None = None) -> pb.HistoryEvent | None:
    for event in reversed(saga.history):
        if event.type in types and (step is None or event.step == step):
            return event
    return None


def _ago(stamp: Timestamp, now: float) -> str:
    return f"{when(stamp)} ({age(max(0.0, now - seconds(stamp)))} ago)"


def _ahead(stamp: Timestamp, now: float) -> str:
    left = seconds(stamp) - now
    return f"{when(stamp)} (in {age(left)})" if left >= 0 else f"{when(stamp)} ({age(-left)} ago)"


def _in_flight_calls(saga: pb.Saga, now: float) -> list[Fact]:
    facts = []
    for step in saga.steps:
        if not step.attempts or step.state not in ("running", "compensating"):
            continue
        last = step.attempts[-1]
        if not last.HasField("ended_at"):
            facts.append(
                Fact(
                    f"{step.name}: {last.direction} attempt {last.attempt} is on the wire",
                    since=_ago(last.started_at, now),
                )
            )
            continue
        retry = _last(saga, "StepRetryScheduled", "CompensationRetryScheduled", step=step.name)
        if retry is not None and seconds(retry.at) >= seconds(last.ended_at):
            facts.append(
                Fact(
                    f"{step.name}: {last.direction} attempt {retry.attempt} is scheduled {retry.message}".rstrip(),
                    detail=f"attempt {last.attempt} failed with {last.code}: {last.message}",
                    since=_ago(retry.at, now),
                    tone="bad",
                )
            )
    return facts


def _wait_fact(saga: pb.Saga, wait: pb.SagaWait, now: float) -> Fact:
    what = {
        "approval": f"an approval of {wait.step} by role {wait.signal}",
        "signal": f"signal {wait.signal} (step {wait.step})",
        "timer": f"timer {wait.step}",
        "child": f"child saga of step {wait.step}",
    }.get(wait.kind, f"{wait.kind} {wait.step}")
    branch = f" on branch {wait.branch}" if wait.branch else ""
    if wait.HasField("until"):
        until = _ahead(wait.until, now)
        until = f"fires {until}" if wait.kind == "timer" else f"times out {until}"
    else:
        until = "no timeout runs while the saga is paused"
    child = wait.child_saga_id
    return Fact(
        f"waits for {what}{branch}",
        since=_ago(wait.since, now) if wait.HasField("since") else "",
        until=until,
        link=f"/sagas/{child}" if child else "",
        link_text=f"child saga {short_id(child)}" if child else "",
        tone="wait",
    )


def why_stuck(saga: pb.Saga, now: float) -> list[Fact]:
    """Why an unfinished saga is where it is: paused or needing attention (by whom, why), what it waits for and until
    when, calls on the wire or retries scheduled, its last error, and its deadline. Empty once it has ended."""
    status = status_name(saga.status)
    if status in ENDED:
        return []
    facts: list[Fact] = []
    if status == "PAUSED":
        paused = _last(saga, "SagaPaused")
        by = f" by {paused.actor}" if paused and paused.actor else ""
        facts.append(
            Fact(
                f"paused{by}: no call is made until it is resumed",
                detail=paused.message if paused else "",
                since=_ago(paused.at, now) if paused else "",
                tone="bad",
            )
        )
    if status == "NEEDS_ATTENTION":
        needs = _last(saga, "SagaNeedsAttention")
        code = f" ({needs.code})" if needs and needs.code else ""
        facts.append(
            Fact(
                f"needs attention{code}: an operator must retry or terminate it",
                detail=(needs.message if needs and needs.message else saga.last_error),
                since=_ago(needs.at, now) if needs else "",
                tone="bad",
            )
        )
    facts += [_wait_fact(saga, wait, now) for wait in saga.waits]
    facts += _in_flight_calls(saga, now)
    if saga.last_error and status != "NEEDS_ATTENTION":
        facts.append(Fact("last error", detail=saga.last_error, tone="bad"))
    if saga.HasField("deadline_at"):
        facts.append(Fact("deadline: compensated if not done by then", until=_ahead(saga.deadline_at, now)))
    return facts


# Event types that report something going wrong, and those that report progress.
_BAD_EVENTS = frozenset(
    {"StepFailed", "CompensationFailed", "SagaNeedsAttention", "SagaTerminated", "EffectAfterTerminate", "WaitTimedOut"}
)
_GOOD_EVENTS = frozenset({"StepSucceeded", "CompensationSucceeded", "SagaCompleted", "ChildEnded", "BranchesCompleted"})


@dataclass(frozen=True)
class HistoryRow:
    """One history event as the table shows it."""

    seq: int
    at: str
    offset: str
    type: str
    step: str
    attempt: str
    code: str
    message: str
    actor: str
    tone: str


def history_rows(saga: pb.Saga) -> list[HistoryRow]:
    origin = seconds(saga.created_at)
    rows = []
    for event in saga.history:
        bad = event.type in _BAD_EVENTS or event.code in ("REJECTED",)
        tone = "bad" if bad else "good" if event.type in _GOOD_EVENTS else ""
        rows.append(
            HistoryRow(
                seq=event.seq,
                at=clock(event.at),
                offset=f"+{(seconds(event.at) - origin) * 1000:.1f} ms",
                type=event.type,
                step=event.step,
                attempt=str(event.attempt) if event.attempt else "",
                code=event.code,
                message=event.message,
                actor=event.actor,
                tone=tone,
            )
        )
    return rows


def pretty_json(text: str) -> str:
    """JSON text indented for reading; the text itself should it not parse."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


@dataclass(frozen=True)
class StepResult:
    step: str
    text: str


def step_results(saga: pb.Saga) -> list[StepResult]:
    """Each step's stored result, indented JSON (or why it is not shown)."""
    found = []
    for step in saga.steps:
        if step.result_truncated:
            found.append(StepResult(step.name, "(larger than the orchestrator shows, 64 KiB: not shown)"))
        elif step.result_json:
            found.append(StepResult(step.name, pretty_json(step.result_json)))
    return found


@dataclass(frozen=True)
class Attempts:
    """A step's calls in numbers, for the steps table."""

    tries: int
    undos: int
    spent_ms: float
    running: bool = False
    codes: list[str] = field(default_factory=list)


def attempts_of(step: pb.SagaStep) -> Attempts:
    tries = sum(1 for attempt in step.attempts if attempt.direction == "action")
    undos = sum(1 for attempt in step.attempts if attempt.direction == "compensation")
    spent = sum(
        seconds(attempt.ended_at) - seconds(attempt.started_at) for attempt in step.attempts
        if attempt.HasField("ended_at")
    )  # fmt: skip
    running = any(not attempt.HasField("ended_at") for attempt in step.attempts)
    spent_ms = spent * 1000 if math.isfinite(spent) else 0.0
    return Attempts(tries, undos, spent_ms, running, [attempt.code for attempt in step.attempts if attempt.code])
