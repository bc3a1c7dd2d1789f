"""Benchmark arithmetic and process probes: percentiles, rates, and CPU time and memory read from /proc."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CLOCK_TICKS",
    "LatencySummary",
    "ProcessSample",
    "clear_peak_rss",
    "cpu_ms_per_item",
    "percentile",
    "read_process",
    "summarize",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with at least `fraction` of the values at or below it.

    `values` need not be sorted; an empty sequence gives NaN. fraction is within 0..1 (0.5 for p50).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


@dataclass(frozen=True)
class LatencySummary:
    """p50, p95 and p99 of a set of latencies in milliseconds, with their count and mean."""

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "p50_ms": _rounded(self.p50_ms),
            "p95_ms": _rounded(self.p95_ms),
            "p99_ms": _rounded(self.p99_ms),
            "mean_ms": _rounded(self.mean_ms),
        }


def _rounded(value: float) -> float | None:
    """Three decimals; None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else round(value, 3)


def summarize(seconds: Iterable[float]) -> LatencySummary:
    """Summarize latencies given in seconds as milliseconds."""
    values = [s * 1000.0 for s in seconds]
    if not values:
        return LatencySummary(0, math.nan, math.nan, math.nan, math.nan)
    return LatencySummary(
        count=len(values),
        p50_ms=percentile(values, 0.50),
        p95_ms=percentile(values, 0.95),
        p99_ms=percentile(values, 0.99),
        mean_ms=sum(values) / len(values),
    )


@dataclass(frozen=True)
class ProcessSample:
    """CPU time used so far (user + system, in ms), resident and peak resident memory (KiB) of one process."""

    pid: int
    cpu_ms: float
    rss_kib: int
    peak_rss_kib: int
    threads: int = 0
    extra: Mapping[str, int] = field(default_factory=dict)


def parse_stat_cpu_ms(stat_text: str, ticks_per_second: int = CLOCK_TICKS) -> float:
    """utime + stime of a /proc/<pid>/stat line, in milliseconds.

    The command name (field 2) is in parentheses and may hold spaces, so fields are counted after
    its closing parenthesis: utime and stime are fields 14 and 15 of the whole line.
    """
    after_name = stat_text[stat_text.rindex(")") + 2 :].split()
    # after_name[0] is field 3 (state), so field n is after_name[n - 3].
    utime, stime = int(after_name[14 - 3]), int(after_name[15 - 3])
    return (utime + stime) * 1000.0 / ticks_per_second


def parse_status_kib(status_text: str, key: str) -> int:
    """A "Key:   1234 kB" line of /proc/<pid>/status, in KiB (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def read_process(pid: int) -> ProcessSample | None:
    """Sample a live process from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat_text = stat_file.read()
        with open(f"/proc/{pid}/status") as status_file:
            status_text = status_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return ProcessSample(
        pid=pid,
        cpu_ms=parse_stat_cpu_ms(stat_text),
        rss_kib=parse_status_kib(status_text, "VmRSS"),
        peak_rss_kib=parse_status_kib(status_text, "VmHWM"),
        threads=parse_status_kib(status_text, "Threads"),
    )


def clear_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux 4.0+: write 5 to clear_refs); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_ms_per_item(before: ProcessSample | None, after: ProcessSample | None, items: int) -> float:
    """CPU ms the process spent per item between two samples; NaN without both samples or items."""
    if before is None or after is None or items <= 0 or before.pid != after.pid:
        return math.nan
    return (after.cpu_ms - before.cpu_ms) / items
