"""Feedback shared by replicas through Redis: two real `recserve serve` processes on
one real `redis-server` (started here on a free loopback port, AOF with
`appendfsync always`). An event recorded through one replica changes the other's
next answer; an acknowledged event survives SIGKILL; with Redis down, recording
is refused with UNAVAILABLE while answers go on, and both replicas catch up
when it returns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import grpc
import pytest

from recserve.clients.client import RecommenderClient, RecserveError
from recserve.clients.health import check
from tests.service_helpers import free_port, publish_models, wait_for
from tests.test_serve_process import Proc, wait_serving

if shutil.which("redis-server") is None:
    pytest.skip(
        "redis-server is not installed (Debian: apt-get install redis-server; .ci/run does)",
        allow_module_level=True,
    )


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1, durable (AOF, fsync per write)."""

    def __init__(self, folder) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), 20, "redis-server answering")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="module")
def models(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("redis-models")
    publish_models(small, root)
    return root


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def replica(models, redis_server) -> tuple[Proc, str]:
    p = Proc(
        "--models",
        str(models),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--feedback",
        redis_server.url,
    )
    target = p.target()
    wait_serving(target, "model/popularity")
    wait_serving(target, "feedback")
    return p, target


def top(target: str, user: str = "7") -> list[str]:
    with RecommenderClient(target) as rc:
        return rc.recommend(user, 5, model="popularity").item_ids


def test_an_event_through_one_replica_changes_the_others_next_answer(models, redis_server):
    a, ta = replica(models, redis_server)
    b, tb = replica(models, redis_server)
    try:
        before = top(tb)
        with RecommenderClient(ta) as rc:
            assert rc.record("7", [before[0]]) == (1, 0, 0)  # acknowledged: in Redis
        t = time.monotonic()
        wait_for(lambda: before[0] not in top(tb), 10, "replica B to exclude the item")
        print(f"\nB answered without the item {1000 * (time.monotonic() - t):.1f} ms after A's ack")
    finally:
        assert a.stop() == 0 and b.stop() == 0


def test_an_acknowledged_event_survives_sigkill(models, redis_server):
    a, ta = replica(models, redis_server)
    before = top(ta)
    with RecommenderClient(ta) as rc:
        assert rc.record("7", before[:2]) == (2, 0, 0)
    os.kill(a.proc.pid, signal.SIGKILL)  # right after the acknowledgement
    a.proc.wait(30)
    a2, ta2 = replica(models, redis_server)
    try:
        assert not set(top(ta2)) & set(before[:2])
        assert any("replayed 2 feedback events" in line for line in a2.lines)
    finally:
        assert a2.stop() == 0


def test_with_redis_down_recording_is_refused_answers_go_on_and_replicas_converge(
    models, redis_server
):
    a, ta = replica(models, redis_server)
    b, tb = replica(models, redis_server)
    try:
        redis_server.stop()
        with RecommenderClient(ta) as rc, pytest.raises(RecserveError) as info:
            rc.record("7", ["1"])
        assert info.value.code == "UNAVAILABLE" and "feedback" in info.value.message
        for target in (ta, tb):
            assert len(top(target)) == 5  # Recommend still answers
            wait_for(
                lambda t=target: _health(t, "feedback") == "NOT_SERVING",
                10,
                "feedback health to report the store down",
            )
        assert any("unreachable" in line for line in a.lines)
        redis_server.start()  # same port, same AOF: the stored events come back
        for target in (ta, tb):
            wait_for(
                lambda t=target: _health(t, "feedback") == "SERVING",
                20,
                "the replica to reconnect without a restart",
            )
        before = top(tb)
        with RecommenderClient(ta) as rc:
            assert rc.record("7", [before[0]]) == (1, 0, 0)
        wait_for(lambda: before[0] not in top(tb), 10, "B to see A's event after Redis returned")
    finally:
        assert a.stop() == 0 and b.stop() == 0


def _health(target: str, service: str) -> str:
    try:
        return check(target, service, 1.0)
    except grpc.RpcError:
        return "UNREACHABLE"


def test_event_ids_are_stored_once_across_replicas_and_restarts(models, redis_server):
    """A retried stream with event ids stores each event once, whichever replica
    it reaches, and after Redis itself restarts (the markers are in its AOF)."""
    from recserve.clients.client import Event
    from recserve.feedback import RedisFeedbackStore

    evs = [Event("1", event_id="r-1"), Event("2", event_id="r-2"), Event("3")]
    a, ta = replica(models, redis_server)
    b, tb = replica(models, redis_server)
    try:
        with RecommenderClient(ta) as ra, RecommenderClient(tb) as rb:
            assert ra.record("dedup-u", evs[:2]) == (2, 0, 0)
            assert rb.record("dedup-u", evs) == (1, 0, 2)  # the retry, through B
    finally:
        assert a.stop() == 0 and b.stop() == 0
    redis_server.stop()
    redis_server.start()
    store = RedisFeedbackStore(redis_server.url)
    try:
        from recserve.feedback import Event as Stored

        again = [
            Stored("dedup-u", "1", 1.0, 1, event_id="r-1"),
            Stored("dedup-v", "1", 1.0, 1, event_id="r-1"),
        ]
        assert store.append(again) == 1  # r-1 of another user is another event
        stored = [e for e in store.replay("0-0") if e.user_id.startswith("dedup-")]
        assert sorted((e.user_id, e.event_id) for e in stored) == [
            ("dedup-u", ""),
            ("dedup-u", "r-1"),
            ("dedup-u", "r-2"),
            ("dedup-v", "r-1"),
        ]
    finally:
        store.close()


def test_an_event_without_a_value_is_kept_unrated_and_an_older_reader_sees_1(redis_server):
    """NaN (sent without a value) is stored as v=1 plus the field n=1: an older
    replica reading the stream reads the 1 it always stored; this one reads NaN."""
    import math

    import redis

    from recserve.feedback import Event as Stored
    from recserve.feedback import RedisFeedbackStore

    store = RedisFeedbackStore(redis_server.url)
    try:
        evs = [Stored("u", "a", math.nan, 1), Stored("u", "b", 2.5, 2, event_id="x")]
        assert store.append(evs) == 2
        got = list(store.replay("0-0"))
        assert [e.item_id for e in got] == ["a", "b"]
        assert math.isnan(got[0].value) and got[1].value == 2.5 and got[1].event_id == "x"
        raw = redis.Redis.from_url(redis_server.url)
        fields = [f for _, f in raw.xrange(store.key)]
        raw.close()
        assert float(fields[0][b"v"]) == 1.0 and fields[0][b"n"] == b"1"
        assert b"n" not in fields[1] and float(fields[1][b"v"]) == 2.5
    finally:
        store.close()
