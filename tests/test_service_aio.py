"""The service tests again, on the grpc.aio server (`server = "asyncio"`)."""

from __future__ import annotations

import functools
import os

import grpc
import pytest

from tests.test_service import *  # noqa: F403  (the same tests, collected here again)


@pytest.fixture(scope="module", autouse=True)
def _asyncio_server():
    before = os.environ.get("RECSERVE_TEST_SERVER")
    os.environ["RECSERVE_TEST_SERVER"] = "asyncio"
    yield
    if before is None:
        os.environ.pop("RECSERVE_TEST_SERVER", None)
    else:
        os.environ["RECSERVE_TEST_SERVER"] = before


class PollerCompletionQueue:  # the qualified name of grpc.aio's reader callback's class
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def _handle_events(self, loop) -> None:
        raise self.exc


def test_grpc_events_for_a_closed_loop_are_not_logged_as_errors(published, caplog):
    """grpc.aio reads its one completion queue from every loop that ran gRPC in
    the process; a late event of a server stopped earlier (its loop closed)
    raised "Event loop is closed" in the next server's loop, logged as an
    ERROR with a traceback (a full `make test` run failed so in
    test_a_request_stream_broken_off_is_the_caller_gone_not_an_error, and once
    more after the first fix: grpc.aio's reader is a functools.partial of the
    method, which that fix did not match). The transport's loop drops exactly
    that noise; other errors still log."""
    import asyncio

    from recserve.service.grpc_aio import quiet_stale_grpc_events

    root, _ = published
    with running(root, server="asyncio") as s:  # noqa: F405
        assert s.app.transport.loop.get_exception_handler() is quiet_stale_grpc_events

    def elsewhere() -> None:
        raise RuntimeError("Event loop is closed")

    async def readers() -> list:
        """The reader callbacks grpc.aio registers on a loop running a server."""
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            keys = asyncio.get_running_loop()._selector.get_map().values()
            return [k.data[0]._callback for k in keys if k.data[0] is not None]
        finally:
            await server.stop(0)

    # As grpc.aio registers it: functools.partial(queue._handle_events, loop)
    # (matching the bare method only, the handler let every such event through)
    (real,) = [c for c in asyncio.run(readers()) if isinstance(c, functools.partial)]
    assert real.func.__qualname__ == "PollerCompletionQueue._handle_events"
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(quiet_stale_grpc_events)
    try:
        for exc in (RuntimeError("Event loop is closed"), BlockingIOError(11, "again")):
            loop.call_soon(functools.partial(PollerCompletionQueue(exc)._handle_events, loop))
            loop.call_soon(PollerCompletionQueue(exc)._handle_events, loop)
        loop.call_soon(PollerCompletionQueue(RuntimeError("something else"))._handle_events, loop)
        loop.call_soon(
            functools.partial(PollerCompletionQueue(ValueError("bad"))._handle_events, loop)
        )
        loop.call_soon(elsewhere)
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3, errors


def test_a_probe_that_raises_probes_on_and_leaves_no_backlog(published, caplog, monkeypatch):
    """The loop probe feeds queue-time admission; an exception in it used to end
    it (it rescheduled itself last), leaving a backlog it had seen in place, so
    that every call would be refused (cause queue) for good. Now it logs once,
    clears the backlog and probes on."""
    import time

    from recserve.service import grpc_aio
    from recserve.v1 import recommender_pb2 as pb

    root, _ = published
    with running(root, server="asyncio", queue_budget_ms=50) as s:  # noqa: F405
        transport, core = s.app.transport, s.app.core
        probes = []

        def broken(due: float, now: float) -> None:
            probes.append(now)
            core._backlog_since = time.monotonic() - 1.0  # a backlog it had seen
            raise RuntimeError("probe broke")

        with caplog.at_level("ERROR", logger=grpc_aio.log.name):
            monkeypatch.setattr(transport, "_measure", broken)
            wait_for(lambda: len(probes) >= 20, what="20 probes after the first failure")  # noqa: F405
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        assert len(s.rec.Recommend(req, timeout=10).items) == 3
        failed = [r for r in caplog.records if "the loop probe failed" in r.getMessage()]
        assert len(failed) == 1


def test_a_refusal_past_its_deadline_sends_nothing():
    """Past the call's deadline a refusal is not sent: gRPC core ends the call
    itself, and a status sent to it could fail in core, logged by grpc.aio as an
    ERROR with a traceback (seen under overload). The handler ends as grpc.aio's
    own cancellation does; within the deadline the status goes out."""
    import asyncio

    from recserve.service.core import Code, Failure
    from recserve.service.grpc_aio import _abort

    class Context:
        def __init__(self, left):
            self.left, self.aborted = left, []

        def time_remaining(self):
            return self.left

        async def abort(self, code, details, trailers=()):
            self.aborted.append(code)
            raise grpc.aio.AbortError()

    refusal = Failure(Code.UNAVAILABLE, "server: busy", reason="OVERLOADED", retry_ms=50)
    late = Context(-0.002)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_abort(late, refusal))
    assert late.aborted == []
    for left in (0.5, None):  # time left, or no deadline: the status is sent
        ctx = Context(left)
        with pytest.raises(grpc.aio.AbortError):
            asyncio.run(_abort(ctx, refusal))
        assert ctx.aborted == [grpc.StatusCode.UNAVAILABLE]
    gone = Context(0.5)  # a caller that went away: nothing, and no exception
    assert asyncio.run(_abort(gone, Failure(Code.CANCELLED, "gone"))) == b""
    assert gone.aborted == []
