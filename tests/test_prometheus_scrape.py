"""A real Prometheus server scrapes recserve; PromQL answers p99 latency and memory.

`.ci/run` installs the Debian `prometheus` package; elsewhere the test skips
with a message when the binary is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from recserve.clients.client import RecommenderClient
from recserve.metrics import LATENCY_BUCKETS
from tests.service_helpers import free_port, publish_models, running

P99 = (
    "histogram_quantile(0.99, sum by (le) "
    '(rate(recserve_rpc_duration_seconds_bucket{method="Recommend"}[1m])))'
)
MEMORY = "sum(recserve_process_resident_memory_bytes)"


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_prometheus_scrapes_and_answers_promql(small, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    publish_models(small, tmp_path / "models")
    mport, pport = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: recserve\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n"
    )
    with running(tmp_path / "models", metrics_port=mport) as srv:
        prom = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{pport}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            p99 = memory = None
            deadline = time.monotonic() + 60
            with RecommenderClient(srv.target) as rc:
                while time.monotonic() < deadline and (not p99 or not memory):
                    for u in range(1, 21):
                        rc.recommend(str(u), 10, model="als")
                    srv.app.sample_memory()
                    time.sleep(0.5)
                    try:
                        p99 = query(pport, P99)
                        memory = query(pport, MEMORY)
                    except OSError:
                        continue  # Prometheus still starting
                    p99 = [r for r in p99 if r["value"][1] not in ("NaN", "+Inf")]
            assert p99, "no p99 latency from Prometheus within 60 s"
            # histogram_quantile interpolates within the buckets: never past the last.
            assert 0 < float(p99[0]["value"][1]) <= LATENCY_BUCKETS[-1]
            assert memory and float(memory[0]["value"][1]) > 10e6
            up = query(pport, 'up{job="recserve"}')
            assert up and up[0]["value"][1] == "1"
        finally:
            prom.terminate()
            prom.wait(30)
