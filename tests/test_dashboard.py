"""The Grafana dashboard (serve/grafana): every query of every panel runs against a real
Prometheus scraping a real TorchServe that served good and malformed requests, and the panels
that traffic feeds show data; the provisioning files point at the dashboard and its datasource."""

from __future__ import annotations

import json
import time

import pytest
import requests
import yaml

from components.core.config.compose import compose
from components.core.config.schema import PORT_KEYS
from components.core.paths import ROOT
from components.deploy import deploy
from components.torchserve import server
from tests.helpers.servers import free_ports, prometheus_server

GRAFANA = ROOT / "serve" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "serving.json").read_text())
QUIET_WHEN_HEALTHY = {"5xx", "server errors (5xx)"}  # no series until a server error happens


@pytest.fixture(scope="module")
def scraped(packaged, tmp_path_factory):
    """TorchServe serving the session's model with some traffic, scraped every second by Prometheus."""
    root = tmp_path_factory.mktemp("dashboard")
    cfg = compose([f"serve.state_dir={root / 'state'}", f"events.log_file={root / 'events.jsonl'}",
                   *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))])
    manifest = packaged["manifest"]
    config = yaml.safe_load((ROOT / "serve" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ROOT / "serve" / "prometheus" / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{cfg.serve.metrics_port}"]}]
    try:
        server.start(cfg)
        deploy(cfg, packaged["out"] / "digits.mar", manifest["version"])
        with prometheus_server(root / "prometheus", config) as url:
            send_traffic(cfg, packaged["out"], manifest["samples"], rounds=30)
            yield url
    finally:
        server.stop(cfg)


def send_traffic(cfg, package_dir, samples: list[dict], rounds: int) -> None:
    """Good images and malformed bodies over a few seconds, so rates over the scrapes are non-zero."""
    endpoint = server.local_endpoint(cfg)
    url, headers = f"{endpoint.inference_url}/predictions/digits", server.bearer(endpoint.inference_token)
    for _ in range(rounds):
        for sample in samples:
            assert requests.post(url, data=(package_dir / sample["file"]).read_bytes(), headers=headers, timeout=30).ok
        assert requests.post(url, data=b"not an image", headers=headers, timeout=30).status_code == 400
        time.sleep(0.2)


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL with the dashboard's variables filled in) for every target."""
    return [(panel["title"], target["legendFormat"], target["expr"].replace("$model", "digits").replace("$__rate_interval", "30s"))
            for panel in DASHBOARD["panels"] for target in panel["targets"]]


def query_until_present(url: str, query: str, timeout_s: float = 60) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()
        assert answer["status"] == "success", (query, answer)
        if answer["data"]["result"] or time.monotonic() > deadline:
            return answer["data"]["result"]
        time.sleep(1)


@pytest.mark.integration
def test_every_panel_query_runs_on_real_prometheus_and_traffic_shows(scraped):
    for title, legend, query in panel_queries():
        result = query_until_present(scraped, query, timeout_s=5 if legend in QUIET_WHEN_HEALTHY else 60)
        if legend not in QUIET_WHEN_HEALTHY:
            assert result, f"panel {title!r} ({legend}): no data for {query}"
    queries = {legend: query for _, legend, query in panel_queries()}
    classes = query_until_present(scraped, queries["{{Class}}"])
    assert abs(sum(float(r["value"][1]) for r in classes) - 1) < 1e-6  # shares of all predictions
    rejected = query_until_present(scraped, queries["rejected {{Status}}"])
    assert {r["metric"].get("Status") for r in rejected} == {"400"}
    variable = DASHBOARD["templating"]["list"][0]["definition"]
    values = requests.get(f"{scraped}/api/v1/label/ModelName/values", timeout=10).json()["data"]
    assert variable == "label_values(PredictionsTotal, ModelName)" and values == ["digits"]


def test_provisioning_points_at_the_dashboard_and_its_datasource():
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "serving.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "$GRAFANA_DASHBOARDS_DIR"
    used = ({p["datasource"]["uid"] for p in DASHBOARD["panels"]}
            | {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p["targets"]})
    assert used == {datasource["uid"]} and datasource["type"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)) and all({"x", "y", "w", "h"} <= p["gridPos"].keys() for p in DASHBOARD["panels"])
