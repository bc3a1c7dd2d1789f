"""The kit's vocabulary and its report: which check, on which step and direction, with what outcome and why."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["Check", "CheckResult", "Outcome", "Report"]


class Check(enum.Enum):
    """What the orchestrator relies on from a participant, one rule each (docs/participant-contract.md)."""

    REPLAY = "same key replays the answer"
    KEY_REUSE = "same key, other request refused"
    CONCURRENT = "20 concurrent duplicates run once"
    COMPENSATION_FIRST = "compensation before its action"
    LATE_ACTION = "late action refused"
    REASONS = "refusals carry a reason"
    DEADLINE = "expired deadline commits nothing"
    HEALTH = "health answers"
    REFLECTION = "reflection describes the method"
    NOT_A_CALL = "not a call"


class Outcome(enum.Enum):
    """A check passed, failed, or could not be made (and says why)."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One row of the report: a check of one step in one direction ("action", "compensation", or "-")."""

    check: Check
    step: str
    direction: str
    outcome: Outcome
    reason: str
    service: str = ""

    def line(self) -> str:
        """The row as one plain line, e.g. `FAIL award_points action: same key replays the answer: ...`."""
        where = f"{self.step} {self.direction}" if self.direction != "-" else self.step
        return f"{self.outcome.name} {where}: {self.check.value}: {self.reason}"


_STYLE = {Outcome.PASS: "green", Outcome.FAIL: "bold red", Outcome.SKIP: "yellow"}


@dataclass(frozen=True)
class Report:
    """Every check made on a definition's steps, in the order they were made."""

    definition: str
    results: Sequence[CheckResult]

    def __iter__(self) -> Iterator[CheckResult]:
        return iter(self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if result.outcome is Outcome.FAIL]

    @property
    def passed(self) -> bool:
        """No check failed, and at least one was made."""
        return not self.failures and any(result.outcome is Outcome.PASS for result in self.results)

    @property
    def exit_code(self) -> int:
        """0 when every check made passed, 1 otherwise (a failure, or nothing checked at all)."""
        return 0 if self.passed else 1

    def find(self, check: Check, step: str, direction: str) -> CheckResult:
        """The row of one check of one step and direction; LookupError when it was not made."""
        for result in self.results:
            if (result.check, result.step, result.direction) == (check, step, direction):
                return result
        raise LookupError(f"no {check.name} row for {step} {direction}")

    def summary(self) -> str:
        counts = {outcome: sum(r.outcome is outcome for r in self.results) for outcome in Outcome}
        verdict = "conforms" if self.passed else "does NOT conform"
        return (
            f"{self.definition}: {verdict} ({counts[Outcome.PASS]} passed, {counts[Outcome.FAIL]} failed, "
            f"{counts[Outcome.SKIP]} skipped)"
        )

    def table(self, width: int | None = None) -> Table:
        """The report as a rich table: check x step x direction, outcome and a one-line reason."""
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"Participant conformance: {self.definition}", title_justify="left")
        for column in ("step", "service", "direction", "check", "result"):
            table.add_column(column, no_wrap=True)
        # Below 120 columns the reasons would wrap word by word: they are left out of the table (each
        # failure is printed again in full below it, and --json holds every reason).
        with_reason = width is None or width >= 120
        if with_reason:
            table.add_column("reason", overflow="fold")
        previous = ""
        for result in self.results:
            # The step and its service once per group of rows, as a reader scans them.
            shown = (result.step, result.service) if result.step != previous else ("", "")
            previous = result.step
            outcome = Text(result.outcome.name, style=_STYLE[result.outcome])
            reason = (result.reason,) if with_reason else ()
            table.add_row(*shown, result.direction, result.check.value, outcome, *reason)
        return table

    def print(self, console: Console) -> None:
        """The table, then each failure again as one plain line (for logs), then the summary."""
        console.print(self.table(console.width))
        for failure in self.failures:
            console.print(failure.line(), markup=False, highlight=False, soft_wrap=True)
        console.print(self.summary(), markup=False, highlight=False, style="green" if self.passed else "bold red")
