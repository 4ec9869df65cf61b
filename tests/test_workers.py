"""`recserve serve --workers 2`: one port, two processes, metrics and feedback shared."""

from __future__ import annotations

import re
import signal
import time

import pytest

from recserve.clients.client import RecommenderClient
from recserve.metrics import FLUSH_SECONDS
from tests.service_helpers import publish_models
from tests.test_metrics import free_port, scrape
from tests.test_serve_process import Proc, wait_serving


@pytest.fixture(scope="module")
def models_dir(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    publish_models(small, root)
    return root


def test_two_workers_share_port_metrics_and_feedback(models_dir, tmp_path):
    mport = free_port()
    p = Proc(
        "--models",
        str(models_dir),
        "--port",
        "0",
        "--metrics-port",
        str(mport),
        "--workers",
        "2",
        "--feedback-db",
        str(tmp_path / "fb.sqlite"),
    )
    try:
        target = p.target()
        for name in ("", "model/als"):
            wait_serving(target, name)
        # Every worker has ALS loaded: model_serving is the minimum over live workers.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fams = scrape(mport)
            workers = [s.value for s in fams.get("recserve_worker_processes", [])]
            als = [
                s.value
                for s in fams.get("recserve_model_serving", [])
                if s.labels.get("model") == "als"
            ]
            if workers == [2] and als == [1]:
                break
            time.sleep(0.1)
        assert workers == [2] and als == [1]
        # New connections spread over the workers; all answer the same.
        before = set()
        for _ in range(12):
            with RecommenderClient(target) as rc:
                before.add(tuple(rc.recommend("33", 10, model="als").item_ids))
        assert len(before) == 1
        with RecommenderClient(target) as rc:
            assert rc.record("33", ["1", "2", "3", "4"]) == (4, 0)
        after = set()
        for _ in range(12):
            with RecommenderClient(target) as rc:
                after.add(tuple(rc.recommend("33", 10, model="als").item_ids))
        assert len(after) == 1 and after != before  # every worker saw the events
        # Workers apply their metric updates every FLUSH_SECONDS (to their files).
        deadline = time.monotonic() + 10 * FLUSH_SECONDS + 5
        while True:
            fams = scrape(mport)
            count = [
                s.value
                for s in fams["recserve_rpc_duration_seconds"]
                if s.name.endswith("_count") and s.labels == {"method": "Recommend", "code": "OK"}
            ]
            if count == [24.0] or time.monotonic() > deadline:
                break
            time.sleep(FLUSH_SECONDS / 2)
        assert count == [24.0]  # summed over both workers
        assert [s.value for s in fams["recserve_inflight_requests"]] == [0.0]
        pss = fams["recserve_process_proportional_memory_bytes"][0].value
        rss = fams["recserve_process_resident_memory_bytes"][0].value
        assert 0 < pss <= rss
    except BaseException:
        print("server log:\n" + "".join(p.lines)[-6000:])  # for a failure's report
        raise
    finally:
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(30) == 0
    assert sum(bool(re.search(r"worker \d \(pid \d+\) serving", x)) for x in p.lines) == 2
