"""`recserve serve --workers 2`: one port, two processes, metrics and feedback shared."""

from __future__ import annotations

import contextlib
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from recserve import contract
from recserve.clients.client import RecommenderClient
from recserve.metrics import FLUSH_SECONDS
from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc
from tests.service_helpers import free_port, publish_models
from tests.test_metrics import scrape
from tests.test_serve_process import Proc, wait_serving

calls_made: list[int] = []


def answers_by_worker(target: str, tries: int = 200) -> dict[str, tuple[str, ...]]:
    """ALS's answer for user 33 by answering worker (x-recserve-worker), each call
    over a fresh connection, until two workers answered (or `tries` calls)."""
    out: dict[str, tuple[str, ...]] = {}
    for _ in range(tries):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            request = pb.RecommendRequest(user_id="33", k=10, model="als")
            resp, call = stub.Recommend.with_call(request, timeout=10)
        calls_made.append(1)
        worker = dict(call.trailing_metadata())[contract.WORKER]
        out.setdefault(worker, tuple(i.item_id for i in resp.items))
        if len(out) == 2:
            break
    return out


def worker_pids(p: Proc) -> list[int]:
    """The worker pids a `serve --workers 2` launcher logged."""
    deadline = time.monotonic() + 30
    while not (found := re.search(r"2 workers: \[(\d+), (\d+)\]", "".join(p.lines))):
        assert time.monotonic() < deadline, "".join(p.lines)
        time.sleep(0.05)
    return [int(x) for x in found.groups()]


@pytest.fixture(scope="module")
def models_dir(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    publish_models(small, root)
    return root


def test_two_workers_share_port_metrics_and_feedback(models_dir, tmp_path):
    mport = free_port()
    calls_made.clear()
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
        # New connections spread over the workers; every worker answers, and the same.
        before = answers_by_worker(target)
        assert len(before) == 2, before  # both worker processes served
        assert len(set(before.values())) == 1
        # Events for the user's top two items: once a worker has them, they are
        # seen and leave its answer, whatever weight the model gives new events.
        top = next(iter(before.values()))[:2]
        with RecommenderClient(target) as rc:
            assert rc.record("33", list(top)) == (2, 0, 0)
        after = answers_by_worker(target)
        assert set(after) == set(before)
        assert len(set(after.values())) == 1
        assert not set(top) & set(next(iter(after.values())))  # every worker saw the events
        calls = sum(calls_made)
        # Workers apply their metric updates every FLUSH_SECONDS (to their files).
        deadline = time.monotonic() + 10 * FLUSH_SECONDS + 5
        while True:
            fams = scrape(mport)
            count = [
                s.value
                for s in fams["recserve_rpc_duration_seconds"]
                if s.name.endswith("_count") and s.labels == {"method": "Recommend", "code": "OK"}
            ]
            if count == [float(calls)] or time.monotonic() > deadline:
                break
            time.sleep(FLUSH_SECONDS / 2)
        assert count == [float(calls)]  # summed over both workers
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
    pids = {m[1] for x in p.lines if (m := re.search(r"worker \d \(pid (\d+)\) serving", x))}
    assert len(pids) == 2
    assert set(before) == pids  # the answering processes are the two workers


def test_a_sigterm_right_after_listening_stops_the_launcher_and_its_workers(tmp_path):
    """The launcher installed its handlers after "listening on" and the metrics
    server's start: a SIGTERM in between killed it (-15) and left its workers
    running, orphaned. Here the SIGTERM comes the moment it announces itself."""
    import os
    import subprocess
    import sys

    from tests.test_serve_process import ROOT

    script = f"""
import logging, os, signal
import recserve.launch as launch
from recserve.config import ServerConfig

logging.basicConfig(level=logging.INFO)
launch._announce = lambda cfg, port: os.kill(os.getpid(), signal.SIGTERM)
launch.serve(ServerConfig(models={str(tmp_path / "none")!r}, port=0, metrics_port=0,
                          state_dir={str(tmp_path)!r}, grace_seconds=0.5, workers=2))
print("stopped", flush=True)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    found = re.search(r"2 workers: \[(\d+), (\d+)\]", out.stderr)
    assert found, out.stderr
    pids = [int(p) for p in found.groups()]
    alive = []
    for pid in pids:  # the workers are gone (cleaned up here if not: the old bug)
        try:
            os.kill(pid, signal.SIGKILL)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert out.returncode == 0 and not alive, (out.returncode, alive, out.stderr)
    assert "all workers stopped" in out.stderr and out.stdout == "stopped\n"


def test_a_sigterm_while_a_worker_is_forked_reaches_that_worker(tmp_path):
    """A SIGTERM that arrives as the launcher forks (here: just before each
    fork) was forwarded to the workers already on its list, not to the one
    being forked, and the launcher then waited for that worker forever. The
    signal is held across the fork: the new worker gets it and drains."""
    import os
    import subprocess
    import sys

    from tests.test_serve_process import ROOT

    script = f"""
import logging, os, signal
import recserve.launch as launch
from recserve.config import ServerConfig

logging.basicConfig(level=logging.INFO)
real_fork = os.fork
def fork():
    os.kill(os.getpid(), signal.SIGTERM)
    return real_fork()
launch.os.fork = fork
launch.serve(ServerConfig(models={str(tmp_path / "none")!r}, port=0, metrics_port=0,
                          state_dir={str(tmp_path)!r}, grace_seconds=0.5, workers=2))
print("stopped", flush=True)
"""
    p = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its forgotten worker
        out, err = p.communicate()
        raise AssertionError("the launcher waited for a worker it never stopped:\n" + err) from None
    assert p.returncode == 0, err
    assert re.search(r"\(1 workers: \[\d+\]\)", err), err  # told to stop: forked no more
    assert "all workers stopped" in err and out == "stopped\n"


def versions_by_worker(target: str, tries: int = 200) -> dict[str, str]:
    """The ALS version each worker answers with (x-recserve-worker), each call
    over a fresh connection, until two workers answered (or `tries` calls). A
    worker still loading its first version answers UNAVAILABLE (health checks
    are per worker: the one a wait reached may not be this one); that call
    is tried again."""
    out: dict[str, str] = {}
    for _ in range(tries):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            request = pb.RecommendRequest(user_id="33", k=3, model="als")
            try:
                resp, call = stub.Recommend.with_call(request, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or "not loaded yet" not in str(
                    exc.details()
                ):
                    raise
                time.sleep(0.05)
                continue
        out[dict(call.trailing_metadata())[contract.WORKER]] = resp.version
        if len(out) == 2:
            break
    return out


def test_a_reload_reaches_every_worker(small, tmp_path):
    # Admin.ReloadModels lands on one worker: the other went on serving the old
    # version, and answers alternated between versions for good. That worker
    # now has the launcher pass SIGHUP on to every worker; SIGHUP to the
    # launcher (an operator's reload) does the same.
    from recserve.models import create

    root = tmp_path / "models"
    als = create("als", factors=8, iterations=3).fit(small)
    first = als.save(root, "als").name
    p = Proc("--models", str(root), "--port", "0", "--metrics-port", "0", "--workers", "2")
    try:
        target = p.target()
        wait_serving(target, "model/als")
        seen = versions_by_worker(target)
        assert len(seen) == 2 and set(seen.values()) == {first}, seen
        second = als.save(root, "als").name
        with RecommenderClient(target) as rc:
            reloaded, refused = rc.reload()
        assert [m.version for m in reloaded] == [second] and not refused

        def every_worker_on(version: str) -> bool:
            seen = versions_by_worker(target)
            return len(seen) == 2 and set(seen.values()) == {version}

        deadline = time.monotonic() + 20
        while not every_worker_on(second):
            assert time.monotonic() < deadline, versions_by_worker(target)
            time.sleep(0.2)
        third = als.save(root, "als").name
        p.proc.send_signal(signal.SIGHUP)  # the launcher
        deadline = time.monotonic() + 20
        while not every_worker_on(third):
            assert time.monotonic() < deadline, versions_by_worker(target)
            time.sleep(0.2)
    except BaseException:
        print("server log:\n" + "".join(p.lines)[-6000:])
        raise
    finally:
        assert p.stop() == 0
    assert sum("SIGHUP: reloaded als@" in line for line in p.lines) == 3  # 1 + 2 workers


def test_workers_stop_when_their_launcher_is_killed(models_dir):
    """A launcher killed outright (SIGKILL, the OOM killer) cannot pass a
    SIGTERM on: its workers went on serving as orphans, holding the port. The
    kernel now sends each worker SIGTERM when its launcher dies, and they drain."""
    import os

    p = Proc("--models", str(models_dir), "--port", "0", "--metrics-port", "0", "--workers", "2")
    pids: list[int] = []
    try:
        wait_serving(p.target(), "")
        pids = worker_pids(p)
        p.proc.kill()
        p.proc.wait(10)
        deadline = time.monotonic() + 30
        while True:
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            if not alive:
                break
            assert time.monotonic() < deadline, f"workers {alive} outlived their launcher"
            time.sleep(0.05)
    finally:
        for pid in pids:  # never leave one behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _open_files_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) open-descriptor limits of a process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


def test_the_open_files_limit_is_raised_for_launcher_and_workers(models_dir):
    """Many systems set a soft limit of 1,024 descriptors; a server past it can
    accept no more connections. `serve` raises its soft limit to the hard one
    before forking, so the workers have it too."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise to")

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    p = Proc(
        "--models",
        str(models_dir),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--workers",
        "2",
        preexec_fn=low,
    )
    try:
        wait_serving(p.target(), "")
        for pid in (p.proc.pid, *worker_pids(p)):
            got_soft, got_hard = _open_files_limit(pid)
            assert got_soft == got_hard > 256, (pid, got_soft, got_hard)
        assert any("soft limit raised from 256" in line for line in p.lines), "".join(p.lines)
    finally:
        assert p.stop() == 0
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
