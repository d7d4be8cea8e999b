"""What the monitoring files refer to: the metric names in the Grafana dashboard's and
the alert rules' PromQL, and the series names the code exports.

Shared by ``tests/unit/test_deploy_manifests.py`` (every name used exists in the
code) and ``tests/integration/test_metrics_live.py`` (every name used is on a real
worker's or collector's ``/metrics``, and moves). Pure: no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "streamcdp-dashboard.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

#: Prometheus' own series that the dashboard and alerts may use besides the code's.
PROMETHEUS_SERIES = frozenset({"up"})

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
     "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((.*)\)\s*$", re.S)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed).

    >>> sorted(promql_metric_names('sum by (topic) (rate(cdp_x_total{instance=~"$w"}[$__rate_interval])) / on() group_left() up'))
    ['cdp_x_total', 'up']
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("", text)
    while _MATCHERS.search(text):
        text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)  # "sum by (le) (x)" -> "sum  (x)"
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def template_query_metric_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus variable query (``label_values(metric, label)``)."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        return promql_metric_names(query)
    arguments = match.group(1)
    selector, comma, _label = arguments.rpartition(",")
    if not comma:  # label_values(label): no metric
        return set()
    return promql_metric_names(selector)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs(document: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target of the dashboard."""
    document = dashboard() if document is None else document
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in _panels(document.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def dashboard_variable_queries(document: dict | None = None) -> list[tuple[str, str]]:
    document = dashboard() if document is None else document
    out = []
    for variable in document.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        out.append((variable["name"], query or ""))
    return out


def alert_rules(document: dict | None = None) -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text()) if document is None else document
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_metric_names() -> set[str]:
    names = set()
    for _, expr in dashboard_exprs():
        names |= promql_metric_names(expr)
    for _, query in dashboard_variable_queries():
        names |= template_query_metric_names(query)
    return names


def alert_metric_names() -> set[str]:
    names = set()
    for rule in alert_rules():
        names |= promql_metric_names(rule["expr"])
    return names


def series_names(registry: CollectorRegistry) -> dict[str, str]:
    """Series name → metric family name, as the registry exposes them.

    Counters expose ``<name>_total``; histograms ``_bucket``, ``_sum`` and ``_count``;
    gauges their name. (``_created`` series exist too, but nothing should use them.)
    """
    out: dict[str, str] = {}
    for family in registry.collect():
        if family.type == "counter":
            out[f"{family.name}_total"] = family.name
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[f"{family.name}{suffix}"] = family.name
        else:
            out[family.name] = family.name
    return out


def worker_series() -> dict[str, str]:
    from streams.metrics import Metrics

    return series_names(Metrics(CollectorRegistry()).registry)


def collector_series() -> dict[str, str]:
    from streamcdp.collector.metrics import CollectorMetrics

    return series_names(CollectorMetrics(CollectorRegistry()).registry)
