"""The Grafana dashboard and the alert rules query only metrics the services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness.observe import metrics_url
from harness.stack import Service

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "observability" / "grafana-dashboard.json"
ALERTS = ROOT / "observability" / "prometheus-alerts.yaml"
OUR_METRIC = re.compile(r"\b((?:dispatcher|consumer)_[a-z_]+)\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


async def exported_names(*services: Service) -> set[str]:
    names: set[str] = set()
    async with httpx.AsyncClient() as http:
        for service in services:
            text = (await http.get(metrics_url(service))).text
            for family in text_string_to_metric_families(text):
                names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [var["query"]["query"] for var in dashboard["templating"]["list"] if var["type"] == "query"]
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


async def test_dashboard_and_alerts_use_exported_metrics(
    sender: Service, consumer: Service, ready_model: str
) -> None:
    exported = await exported_names(sender, consumer)
    for source, queries in (("dashboard", dashboard_queries()), ("alerts", alert_queries())):
        assert queries, f"the {source} has no queries"
        used = {name for query in queries for name in OUR_METRIC.findall(query)}
        assert used, f"the {source} queries none of our metrics"
        assert used <= exported, f"the {source} queries metrics nobody exports: {sorted(used - exported)}"


def test_dashboard_panels_have_unique_ids_and_titles() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["title"] and p["targets"] for p in panels)
