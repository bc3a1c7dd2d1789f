"""The Grafana dashboard in deploy/ asks only for metrics and labels the code exports, from the provisioned source."""

from __future__ import annotations

import ast
import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# The project's own packages whose modules may define metrics (the services, the orchestrator, svckit).
PACKAGES = ("svckit", "orchestrator", "inventory_svc", "payment_svc", "shipping_svc", "notify_svc")
# Series Prometheus writes itself for every target, and the labels its scrape adds (prometheus.yml).
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"})
TARGET_LABELS = frozenset({"job", "instance", "compose_service"})
# What a series' name ends with, by metric type, as prometheus_client exposes it (no _created: svckit.metrics).
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}

# -- reading PromQL: enough of it to find every metric a query selects, and every label it names ----------

# PromQL's keywords and binary operators that are spelled as words; functions and aggregations are
# recognised by the "(" after them.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
    | {"inf", "nan", "atan2", "start", "end"}
)
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
# An identifier that does not continue a number or a duration (the "m" of "5m", the "e" of "1e3").
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?")


@dataclass
class Query:
    """What one PromQL expression selects: metric names, labels it matches on and labels it groups by."""

    expression: str
    metrics: set[str] = field(default_factory=set)
    matched_labels: set[str] = field(default_factory=set)
    grouping_labels: set[str] = field(default_factory=set)


def read_promql(expression: str) -> Query:
    """The metric names and labels of a PromQL expression (Grafana's $variables allowed in it)."""
    query = Query(expression)
    text = _GRAFANA_VARIABLE.sub("1m", expression)
    # Strings first (a matcher's value may hold braces or brackets), then what names labels, not metrics.
    text = _STRING.sub('""', text)
    for matchers in _MATCHERS.findall(text):
        query.matched_labels |= set(_MATCHER_LABEL.findall(matchers))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for _, labels in _GROUPING.findall(text):
        query.grouping_labels |= {label.strip() for label in labels.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    for name, call in _IDENTIFIER.findall(text):
        if not call and name.lower() not in _KEYWORDS:
            query.metrics.add(name)
    return query


def test_the_promql_reader_finds_metrics_and_labels() -> None:
    """Guards the reader itself, on the shapes the dashboard uses."""
    query = read_promql(
        'histogram_quantile(0.95, sum by (le, step) (rate(a_seconds_bucket{status="COMPLETED",x=~"{[1]}"}'
        "[$__rate_interval]))) / on (step) group_left b_total offset 5m or vector(0) and 1e3 > bool c:d"
    )
    assert query.metrics == {"a_seconds_bucket", "b_total", "c:d"}
    assert query.matched_labels == {"status", "x"}
    assert query.grouping_labels == {"le", "step"}
    assert read_promql("count(max by (service) (up{job='s'}) == 1) or vector(0)").metrics == {"up"}
    assert read_promql("sum without (instance) (rate(x_total[${interval}]))").grouping_labels == {"instance"}


# -- what the code exports ----------------------------------------------------------------------------


def _metric_modules() -> Iterator[str]:
    """Modules of the project's packages that import prometheus_client: those that define metrics."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            imported = {
                alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
            } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
            if any(name.split(".")[0] == "prometheus_client" for name in imported):
                yield ".".join(path.relative_to(ROOT).with_suffix("").parts)


@dataclass(frozen=True)
class Exported:
    """A series name a process exposes, with the label names of its metric."""

    name: str
    labels: frozenset[str]


def exported_series() -> dict[str, Exported]:
    """Every series name the project's metrics expose (`_total`, `_bucket`, ...), by name."""
    found: dict[str, Exported] = {}
    for module_name in _metric_modules():
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if not isinstance(value, MetricWrapperBase):
                continue
            (family,) = value.describe()
            # Label names are not part of prometheus_client's public face; every metric class keeps them here.
            labels = frozenset(value._labelnames)
            for suffix in SERIES_SUFFIXES[family.type]:
                name = family.name + suffix
                found[name] = Exported(name, labels | ({"le"} if suffix == "_bucket" else set()))
    return found


def test_the_exported_metrics_are_found_in_every_module_that_defines_some() -> None:
    """Guards the listing itself: the metrics of svckit, the orchestrator and notify are all in it."""
    modules = set(_metric_modules())
    assert {"svckit.metrics", "orchestrator.observability", "notify_svc.delivery"} <= modules, modules
    series = exported_series()
    assert series["sagasuite_rpc_calls_total"].labels == {"service", "method", "code"}
    assert {"sagasuite_saga_completion_seconds_bucket", "sagasuite_sagas_needing_attention"} <= set(series)
    assert not [name for name in series if name.endswith("_created")]


# -- the dashboard ------------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of the dashboard in path."""
    dashboard = json.loads(path.read_text())
    return [
        (panel.get("title", ""), target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def dashboard_metric_names() -> set[str]:
    """Every series name any dashboard in deploy/ selects."""
    return {
        name for path in dashboard_files() for _, expr in dashboard_queries(path) for name in read_promql(expr).metrics
    }


def test_there_is_a_dashboard_with_the_panels_an_operator_needs() -> None:
    (path,) = dashboard_files()
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] == "Sagasuite"
    titles = {panel["title"] for panel in panels(dashboard) if panel["type"] != "row"}
    assert {
        "Sagas by outcome",
        "Saga completion latency",
        "Retries by step",
        "Outbox lag",
        "Waiting sagas by kind",
        "Needs attention",
        "Calls by service and code",
    } <= titles, titles
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "two panels share an id"


def test_every_query_of_the_dashboard_names_metrics_and_labels_the_code_exports() -> None:
    exported = exported_series()
    problems = []
    for path in dashboard_files():
        for title, expression in dashboard_queries(path):
            query = read_promql(expression)
            if not query.metrics:
                problems.append(f"{path.name} {title!r}: no metric found in {expression}")
            unknown = {name for name in query.metrics if name not in exported and name not in PROMETHEUS_SERIES}
            if unknown:
                problems.append(f"{path.name} {title!r}: {sorted(unknown)} not exported by the code: {expression}")
                continue
            labels = set(TARGET_LABELS)
            for name in query.metrics:
                labels |= exported[name].labels if name in exported else set()
            missing = (query.matched_labels | query.grouping_labels) - labels
            if missing:
                problems.append(f"{path.name} {title!r}: labels {sorted(missing)} on none of its metrics: {expression}")
    assert not problems, "\n".join(problems)


def test_every_panel_reads_the_provisioned_data_source() -> None:
    (datasources,) = sorted((PROVISIONING / "datasources").glob("*.yml"))
    (source,) = YAML(typ="safe").load(datasources.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for path in dashboard_files():
        for panel in panels(json.loads(path.read_text())):
            if panel["type"] == "row":
                continue
            for where in [panel, *panel.get("targets", [])]:
                assert where.get("datasource") == {"type": "prometheus", "uid": source["uid"]}, (
                    path.name,
                    panel["title"],
                )


def test_the_dashboard_provider_loads_the_folder_compose_mounts() -> None:
    compose = YAML(typ="safe").load((ROOT / "compose.yaml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    (providers,) = sorted((PROVISIONING / "dashboards").glob("*.yml"))
    (provider,) = YAML(typ="safe").load(providers.read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = environment_of(compose["services"]["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in {f"{provider['options']['path']}/{path.name}" for path in dashboard_files()}


def environment_of(spec: dict[str, Any]) -> dict[str, str]:
    return {str(key): str(value) for key, value in (spec.get("environment") or {}).items()}
