"""deploy/: the Grafana dashboard and scrape config refer only to metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


def exported_names() -> set[str]:
    names = set()
    for metric in Metrics(CollectorRegistry()).registry.collect():
        names.add(metric.name)
        names |= {metric.name + s for s in ("_total", "_bucket", "_count", "_sum")}
    return names


def test_dashboard_queries_use_existing_metrics():
    doc = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    known = exported_names()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"\b(recserve_[a-z_]+)", e)}
    assert used and used <= known, used - known
    families = {n.removesuffix("_total") for n in used}
    for required in (
        "recserve_rpc_duration_seconds_bucket",
        "recserve_model_bytes",
        "recserve_process_resident_memory_bytes",
        "recserve_stage_duration_seconds_bucket",
    ):
        assert required in used or required in families


def test_scrape_config_targets_the_metrics_port():
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert "job_name: recserve" in text and "localhost:9090" in text
