"""The shipped Prometheus job and Grafana dashboard match what the router's /metrics exposes."""

from __future__ import annotations

import json
import re

import yaml

from clearml_umem.events import EventBus
from clearml_umem.metrics import Metrics
from tests.clearml_env import REPO

SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed_series() -> set[str]:
    """Every sample name the router's /metrics can hold, from the same Metrics object it renders."""
    text = Metrics(EventBus()).render().decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        if kind == "counter":  # the TYPE line names the family with or without _total, by client version
            names.add(name if name.endswith("_total") else f"{name}_total")
        else:
            names.update(name + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def test_the_grafana_dashboard_asks_only_for_series_the_router_exposes() -> None:
    dashboard = json.loads((REPO / "serving" / "grafana-umem.json").read_text())
    exposed = exposed_series()
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\bumem_[a-z_]+", target["expr"])}
    asked |= set(re.findall(r"\bumem_[a-z_]+", json.dumps(dashboard["templating"])))
    assert asked, "the dashboard queries the router's metrics"
    assert asked <= exposed, f"not exposed by the router: {sorted(asked - exposed)}"
    assert {p["title"] for p in dashboard["panels"]} >= {"Time to first token by tier (p50, p95)",
                                                         "Swap-in seconds (p95)", "Swap speed (GB/s, last move)"}


def test_the_prometheus_job_scrapes_the_router_with_its_key_beside_clearml_servings_jobs() -> None:
    config = yaml.safe_load((REPO / "serving" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"prometheus", "clearml-inference-stats"} <= set(jobs), "clearml-serving's own jobs are kept"
    router = jobs["clearml-umem-router"]
    assert router["metrics_path"] == "/metrics"
    assert router["authorization"]["type"] == "Bearer" and router["authorization"]["credentials_file"]
    assert router["static_configs"][0]["targets"]
